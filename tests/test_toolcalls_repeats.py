"""``RepeatWatch``: a call already run is told the moment its closing brace streams, at every
chunking, in every way small models write it; never inside the reasoning, never for another call."""

from __future__ import annotations

import json
from typing import Any

import pytest

from qwenrun.engines.scripted import tool_call_text
from qwenrun.events import ParsedCall
from qwenrun.toolcalls import OutputParser
from qwenrun.toolcalls.repeats import RepeatWatch

RUN = ("get_current_weather", {"city": "广州"})
CALL = json.dumps({"name": RUN[0], "arguments": RUN[1]}, ensure_ascii=False)
OTHER = json.dumps({"name": RUN[0], "arguments": {"city": "深圳"}}, ensure_ascii=False)


def seen(name: str, arguments: dict[str, Any]) -> bool:
    return (name, arguments) == RUN


def stops(text: str, size: int, *, starts_in_reasoning: bool = False) -> int | None:
    """Where the piece ends at which the watch said "repeated" (None: never), ``text`` fed in
    pieces of ``size`` characters."""
    watch = RepeatWatch(seen)
    for start in range(0, len(text), size):
        end = min(start + size, len(text))
        if watch.feed(text[start:end], starts_in_reasoning=starts_in_reasoning and start == 0):
            assert watch.call == RUN
            return end
    return None


def check(text: str, close: int, *, starts_in_reasoning: bool = False) -> None:
    """At every chunking the watch fires on the piece holding the character at ``close``."""
    for size in range(1, len(text) + 1):
        end = stops(text, size, starts_in_reasoning=starts_in_reasoning)
        assert end is not None, (size, text)
        assert end - size <= close < end, (size, end, text)


REPEATS = {
    "bare lines, as Qwen2.5-Coder-0.5B writes them": f'{CALL}\n{CALL}\n{CALL}\n{{"name"',
    "tagged": tool_call_text(*RUN) + tool_call_text(*RUN),
    "fenced": f"```json\n{CALL}\n```",
    "after prose": f"Let me check again: {CALL} and then",
    "in a list": f"[{CALL}, {CALL}]",
    "after another call": f"{OTHER}\n{CALL}",
    "arguments as a JSON string": json.dumps({"name": RUN[0], "arguments": json.dumps(RUN[1])}),
    "OpenAI style": json.dumps({"type": "function", "function": {"name": RUN[0], "parameters": RUN[1]}}),
    "after an unclosed brace and a quote in prose": f'Use {{ and " with care.\n{CALL}',
    "after the reasoning": f"<think>\nI called {CALL} before.\n</think>\n\n{CALL}",
    "after a JSON answer": f'{{"answer": "多云", "n": [1, {{"x": "}}"}}]}} {CALL}',
}


@pytest.mark.parametrize("text", REPEATS.values(), ids=REPEATS.keys())
def test_a_repeat_is_told_when_its_closing_brace_comes(text: str) -> None:
    if CALL in text:  # the closing brace of the first CALL after the reasoning
        close = text.index(CALL, max(text.rfind("</think>"), 0)) + len(CALL) - 1
    elif "function" in text:  # OpenAI style: its "function" object is the call, one brace earlier
        close = len(text) - 2
    else:  # the whole text is the call
        close = len(text) - 1
    check(text, close)


def test_braces_and_quotes_inside_strings_are_text() -> None:
    odd = ("get_current_weather", {"city": 'a}"{b\\'})
    text = json.dumps({"name": odd[0], "arguments": odd[1]})
    for size in range(1, len(text) + 1):
        watch = RepeatWatch(lambda name, arguments: (name, arguments) == odd)
        told = [watch.feed(text[at : at + size]) for at in range(0, len(text), size)]
        assert told[-1] and told.count(True) == 1, size


NOT_REPEATS = {
    "another city": f"{OTHER}\n{OTHER}",
    "a cut call": CALL[:-1],
    "inside the reasoning": f"<think>\nI called {CALL} already, so I answer.\n</think>\n\n广州多云。",
    "inside an open think block": f"<think>\n{CALL}",
    "prose": "广州多云到晴，气温28~31℃。",
    "another tool": json.dumps({"name": "get_time", "arguments": RUN[1]}),
    "arguments that are no object": json.dumps({"name": RUN[0], "arguments": ["广州"]}),
}


@pytest.mark.parametrize("text", NOT_REPEATS.values(), ids=NOT_REPEATS.keys())
def test_anything_else_is_never_a_repeat(text: str) -> None:
    for size in range(1, len(text) + 1):
        assert stops(text, size) is None, size


def test_a_completion_that_starts_in_reasoning_is_read_after_its_close() -> None:
    text = f"I called {CALL}; once more?\n</think>\n\n{CALL}"
    check(text, len(text) - 1, starts_in_reasoning=True)
    assert stops(f"I called {CALL}", 4, starts_in_reasoning=True) is None


def test_a_call_the_parser_read_in_any_format() -> None:
    """Qwen3-Coder XML holds no JSON object: the parser's complete call tells it (``saw``)."""
    text = tool_call_text(*RUN, format="qwen3_coder")
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    parser = OutputParser(
        "qwen3_coder", tools=[{"type": "function", "function": {"name": RUN[0], "parameters": schema}}]
    )
    watch = RepeatWatch(seen)
    told = []
    for at in range(0, len(text), 5):
        piece = text[at : at + 5]
        calls = [item for item in parser.feed(piece) if isinstance(item, ParsedCall)]
        told.append(watch.feed(piece) or any(watch.saw(call) for call in calls))
    assert told[-1] and not any(told[:-1]) and watch.call == RUN

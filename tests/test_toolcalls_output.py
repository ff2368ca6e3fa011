"""qwenrun.toolcalls.output: thinking first, then the calls of each format; the vLLM failure cases."""

from __future__ import annotations

import json
from typing import Any

import pytest
from chunking import check_events, feed_cuts, feed_sized, ids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from weather import weather_tool

from qwenrun.events import Reasoning
from qwenrun.toolcalls import OutputParser, ParsedOutput, parse_output

FORECAST = {
    "name": "forecast",
    "parameters": {"properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
}
TOOLS = [weather_tool(), {"type": "function", "function": FORECAST}]
HERMES = '<tool_call>\n{"name": "get_current_weather", "arguments": {"city": "广州"}}\n</tool_call>'
XML = "<tool_call>\n<function=get_current_weather>\n<parameter=city>\n广州\n</parameter>\n</function>\n</tool_call>"
XML2 = "<tool_call>\n<function=forecast>\n<parameter=city>\n北京\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
THINK = "<think>\nThe user wants the weather. I should call <tool_call> for 广州.\n</think>\n\n"
GZ = ("get_current_weather", {"city": "广州"}, None)

# (id, format, start_in_reasoning, text, content, reasoning, calls)
CASES: list[tuple[str, str, bool, str, str, str, list[tuple[str, dict[str, Any], str | None]]]] = [
    ("hermes_after_think", "hermes", False, THINK + HERMES, "",
     "The user wants the weather. I should call <tool_call> for 广州.", [GZ]),
    ("xml_after_think", "qwen3_coder", False, THINK + "Checking.\n" + XML, "Checking.",
     "The user wants the weather. I should call <tool_call> for 广州.", [GZ]),
    # vLLM #39056: a call inside <think> is reasoning, never run; the one after </think> runs.
    ("xml_inside_think_is_not_run", "qwen3_coder", False, f"<think>\n{XML2}\n</think>\n\n{XML}", "",
     XML2, [GZ]),
    ("hermes_inside_think_is_not_run", "hermes", False, f"<think>\n{HERMES}\n</think>\nNo call.", "No call.",
     HERMES, []),
    # vLLM #42021: thinking on (prompt opened the block), calls after </think> are calls.
    ("xml_prompt_opened_think", "qwen3_coder", True, "Let me call it.\n</think>\n\n" + XML + "\n" + XML2, "",
     "Let me call it.", [GZ, ("forecast", {"city": "北京", "days": 3}, None)]),
    ("hermes_prompt_opened_think", "hermes", True, "ok\n</think>\n\n" + HERMES, "", "ok", [GZ]),
    ("unclosed_think_is_all_reasoning", "qwen3_coder", True, "Thinking about " + XML, "",
     "Thinking about " + XML, []),
    ("thinking_disabled_prompt", "hermes", False, "Sure.\n" + HERMES, "Sure.", "", [GZ]),
    ("think_tag_in_argument_after_block", "qwen3_coder", False,
     "<think>x</think>" + XML.replace("广州", "<think>广州</think>"), "", "x",
     [("get_current_weather", {"city": "<think>广州</think>"}, None)]),
]  # fmt: skip


def expected_of(case: tuple[Any, ...]) -> tuple[str, str, list[tuple[str, dict[str, Any], str | None]]]:
    return case[4], case[5], case[6]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_case(
    case: tuple[str, str, bool, str, str, str, list[tuple[str, dict[str, Any], str | None]]],
) -> None:
    _, fmt, start, text, content, reasoning, calls = case
    result = parse_output(text, fmt, tools=TOOLS, start_in_reasoning=start, new_id=ids())
    assert (result.content, result.reasoning) == (content, reasoning)
    assert [(c.name, c.arguments, c.error) for c in result.tool_calls] == calls
    for size in range(1, len(text) + 1, 3):
        parser = OutputParser(fmt, tools=TOOLS, start_in_reasoning=start, new_id=ids())
        events = feed_sized(parser, text, size)
        assert parser.result() == result, size
        check_events(events, content, result.tool_calls, reasoning)


def test_call_in_reasoning_is_reported() -> None:
    assert parse_output(f"<think>{HERMES}</think>").call_in_reasoning
    assert not parse_output(f"<think>hm</think>{HERMES}").call_in_reasoning


def test_thinking_off_reads_think_as_text() -> None:
    result = parse_output(f"<think>{HERMES}</think>", thinking=False, new_id=ids())
    assert result.reasoning == "" and result.content == "<think></think>"
    assert [c.name for c in result.tool_calls] == ["get_current_weather"]


def test_to_dict_and_json() -> None:
    text = "<think>hm</think>ok " + XML + "<tool_call>\n<function=x y>\n</tool_call>"
    result = parse_output(text, "qwen3_coder", new_id=ids())
    assert result.to_dict() == {
        "content": "ok",
        "reasoning": "hm",
        "tool_calls": [
            {"id": "id0", "type": "function",
             "function": {"name": "get_current_weather", "arguments": '{"city": "广州"}'}},
            {"id": "id1", "type": "function", "function": {"name": "", "arguments": "{}"},
             "error": "malformed <function=NAME> tag", "raw": "\n<function=x y>\n"},
        ],
    }  # fmt: skip
    assert json.loads(result.to_json()) == result.to_dict()
    assert result.malformed == [result.tool_calls[1]]


def test_empty_output() -> None:
    assert parse_output("") == ParsedOutput("", "", [])
    parser = OutputParser("qwen3_coder")
    assert parser.finish() == [] and parser.result() == ParsedOutput("", "", [])
    with pytest.raises(RuntimeError):
        parser.feed("x")


def test_events_in_order() -> None:
    parser = OutputParser("qwen3_coder", tools=TOOLS, new_id=ids())
    events = parser.feed("<think>\nhm\n</think>\n\nok\n" + XML[:60]) + parser.feed(XML[60:]) + parser.finish()
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "Reasoning" and kinds[-1] == "ParsedCall"
    assert kinds.index("str") < kinds.index("CallDelta")


TOKENS = ["<think>", "</think>", "\n", " ", "x", "<tool_call>", "</tool_call>", HERMES, XML, XML2,
          "<function=forecast>", "<parameter=days>", "</parameter>", "</function>", "{", '"', "<", "Sure: ",
          '{"name": "forecast", "arguments": {"days": 2}}', "```json\n", "```"]  # fmt: skip
texts = st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=3)), max_size=25).map("".join)


@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    texts,
    st.sampled_from(["hermes", "qwen3_coder"]),
    st.sampled_from([False, True, None]),
    st.booleans(),
    st.lists(st.integers(0, 5000), max_size=10),
)
def test_streaming_equals_one_shot(text: str, fmt: str, start: bool | None, lenient: bool, cuts: list[int]) -> None:
    expected = parse_output(text, fmt, tools=TOOLS, lenient=lenient, start_in_reasoning=start, new_id=ids())
    for chunking in (cuts, list(range(1, len(text)))):
        parser = OutputParser(fmt, tools=TOOLS, lenient=lenient, start_in_reasoning=start, new_id=ids())
        events = feed_cuts(parser, text, chunking)
        assert parser.result() == expected
        check_events(events, expected.content, expected.tool_calls, expected.reasoning)
        assert all(isinstance(e, Reasoning) or e for e in events)

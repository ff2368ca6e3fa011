"""qwenrun.toolcalls.thinking: <think> blocks read as reasoning, at every chunking, and a fuzz."""

from __future__ import annotations

import pytest
from chunking import feed_cuts, feed_sized
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenrun.events import Reasoning
from qwenrun.toolcalls import ThinkingParser, ThinkingResult, prompt_opens_thinking, split_thinking

# (id, start_in_reasoning, text, reasoning, content)
CASES: list[tuple[str, bool | None, str, str, str]] = [
    (
        "qwen3_thinking",
        False,
        "<think>\nLet me see.\n</think>\n\nIt is sunny.",
        "Let me see.",
        "It is sunny.",
    ),
    ("no_block", False, "It is sunny.", "", "It is sunny."),
    ("empty", False, "", "", ""),
    ("blank", False, " \n ", "", ""),
    ("empty_block", False, "<think>\n\n</think>\n\nHi", "", "Hi"),
    ("leading_blank_before_block", False, "\n <think>a</think>b", "a", "b"),
    ("unclosed_block", False, "<think>\nstill thinking", "still thinking", ""),
    ("only_open_tag", False, "<think>", "", ""),
    ("partial_open_tag", False, "<thi", "", "<thi"),
    ("partial_close_tag_at_end", False, "<think>a</thi", "a</thi", ""),
    ("text_before_block_is_no_block", False, "Hi <think>x</think> y", "", "Hi <think>x</think> y"),
    ("second_block_is_answer_text", False, "<think>a</think>b<think>c</think>", "a", "b<think>c</think>"),
    ("think_tag_inside_reasoning", False, "<think>a <think> b</think>c", "a <think> b", "c"),
    ("stray_close_tag", False, "a</think>b", "", "a</think>b"),
    (
        "call_inside_reasoning_is_reasoning",
        False,
        '<think>\nI will write <tool_call>{"name": "f"}</tool_call>\n</think>\n\n<tool_call>\n{}\n</tool_call>',
        'I will write <tool_call>{"name": "f"}</tool_call>',
        "<tool_call>\n{}\n</tool_call>",
    ),
    ("inner_blank_kept", False, "<think>\na\n\n b \n</think>c \n", "a\n\n b", "c \n"),
    # The prompt ended with "<think>\n": the output starts inside the block.
    ("opened_by_prompt", True, "Let me see.\n</think>\n\nSunny.", "Let me see.", "Sunny."),
    ("opened_by_prompt_and_again", True, "\n<think>\nx\n</think>y", "x", "y"),
    ("opened_by_prompt_unclosed", True, "all reasoning", "all reasoning", ""),
    ("opened_by_prompt_call_unclosed", True, "a <tool_call>\nx", "a <tool_call>\nx", ""),
    ("opened_by_prompt_empty", True, "", "", ""),
    ("opened_by_prompt_blank_block", True, "\n\n</think>\n\nHi", "", "Hi"),
    # Nobody can tell whether the prompt opened the block (None): a lone </think> closes it.
    ("unknown_lone_close", None, "Let me see.\n</think>\n\nSunny.", "Let me see.", "Sunny."),
    ("unknown_lone_close_at_once", None, "</think>\n\nSunny.", "", "Sunny."),
    ("unknown_leading_blank", None, " \n a \n\n</think> b", "a", "b"),
    ("unknown_only_the_first_close", None, "a</think>b</think>c", "a", "b</think>c"),
    ("unknown_open_tag_first", None, "<think>a</think>b", "a", "b"),
    ("unknown_no_tag_is_answer", None, "It is sunny.", "", "It is sunny."),
    ("unknown_partial_close_at_end", None, "a</thi", "", "a</thi"),
    ("unknown_open_tag_later_is_no_lone_close", None, "Hi <think>x</think> y", "", "Hi <think>x</think> y"),
    (
        "unknown_call_first_is_the_answer",
        None,
        "a <tool_call>\n{}\n</tool_call></think>",
        "",
        "a <tool_call>\n{}\n</tool_call></think>",
    ),
    ("unknown_blank", None, " \n", "", ""),
    (
        "unknown_call_after_the_block",
        None,
        'hm</think>\n<tool_call>\n{"name": "f"}\n</tool_call>',
        "hm",
        '<tool_call>\n{"name": "f"}\n</tool_call>',
    ),
]


@pytest.mark.parametrize(
    ("start", "text", "reasoning", "content"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_case(start: bool | None, text: str, reasoning: str, content: str) -> None:
    assert split_thinking(text, start_in_reasoning=start) == ThinkingResult(reasoning, content)
    for size in range(1, len(text) + 1):
        parser = ThinkingParser(start_in_reasoning=start)
        events = feed_sized(parser, text, size)
        assert parser.result() == ThinkingResult(reasoning, content), size
        assert "".join(e.text for e in events if isinstance(e, Reasoning)) == reasoning
        assert "".join(e for e in events if isinstance(e, str)) == content
        assert all(e.text if isinstance(e, Reasoning) else e for e in events)


def test_reasoning_streams_and_holds_only_what_it_must() -> None:
    parser = ThinkingParser()
    assert parser.feed("  <thi") == []
    assert parser.feed("nk>\nI think") == [Reasoning("I think")]
    assert parser.feed(" so. \n</th") == [Reasoning(" so.")]  # trailing blank and "</th" wait
    assert parser.feed("ink>\n\nYes") == ["Yes"]
    assert parser.feed(" <think>") == [" <think>"]
    assert parser.finish() == []
    assert parser.result() == ThinkingResult("I think so.", "Yes <think>")


def test_undecided_text_is_held_until_a_tag_or_the_end_decides() -> None:
    """Where nobody can tell (None), text before the first tag may be reasoning or answer: held back,
    then released at once as what it turned out to be, so that streaming equals one-shot."""
    parser = ThinkingParser(start_in_reasoning=None)
    assert parser.feed("Let me ") == []
    assert parser.feed("see. </thi") == []
    assert parser.feed("nk>\n\nSun") == [Reasoning("Let me see."), "Sun"]
    assert parser.feed("ny <think>") == ["ny <think>"]  # the answer: streamed as it comes
    assert parser.finish() == []
    parser = ThinkingParser(start_in_reasoning=None)
    assert parser.feed("Sure. <tool") == []
    assert parser.feed("_call>") == ["Sure. ", "<tool_call>"]  # a call begins the answer
    parser = ThinkingParser(start_in_reasoning=None)
    assert parser.feed("It is sunny.") == []
    assert parser.finish() == ["It is sunny."]  # no tag came: answer text
    assert parser.result() == ThinkingResult("", "It is sunny.")


def test_feed_after_finish_is_an_error() -> None:
    parser = ThinkingParser()
    parser.finish()
    assert parser.finish() == []
    with pytest.raises(RuntimeError):
        parser.feed("x")


@pytest.mark.parametrize(
    ("prompt", "opens"),
    [
        ("<|im_start|>assistant\n<think>\n", True),  # Qwen3 Thinking-2507
        ("<|im_start|>assistant\n", False),  # Qwen3 with thinking on: the model opens the block
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),  # enable_thinking=False
        ("", False),
    ],
)
def test_prompt_opens_thinking(prompt: str, opens: bool) -> None:
    assert prompt_opens_thinking(prompt) is opens


TOKENS = ["<think>", "</think>", "<thi", "nk>", "</th", "<", ">", "\n", " ", "x", "思考", "<tool_call>", "<tool"]
texts = st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=3)), max_size=30).map("".join)


@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts, st.sampled_from([False, True, None]), st.lists(st.integers(0, 1000), max_size=10))
def test_streaming_equals_one_shot(text: str, start: bool | None, cuts: list[int]) -> None:
    expected = split_thinking(text, start_in_reasoning=start)
    assert expected.reasoning == expected.reasoning.strip()
    assert expected.content == expected.content.lstrip()
    for chunking in (cuts, list(range(1, len(text)))):
        parser = ThinkingParser(start_in_reasoning=start)
        events = feed_cuts(parser, text, chunking)
        assert parser.result() == expected
        assert "".join(e.text for e in events if isinstance(e, Reasoning)) == expected.reasoning
        assert "".join(e for e in events if isinstance(e, str)) == expected.content

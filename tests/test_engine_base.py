"""``qwenrun.engines.base``: the OutputReader that the agent loop, the server's pass-through and
``qwenrun parse`` share, and the Constraint and Request types."""

from __future__ import annotations

import pytest
from chunking import ids

from qwenrun.engines.base import Constraint, Delta, OutputReader, Request
from qwenrun.events import CallDelta, ParsedCall, Reasoning
from qwenrun.toolcalls import parse_output

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}}}}]  # fmt: skip
XML = "<tool_call>\n<function=f>\n<parameter=n>\n3\n</parameter>\n<parameter=s>\nhello world\n</parameter>\n</function>\n</tool_call>"
HERMES = '<tool_call>\n{"name": "f", "arguments": {"n": 3}}\n</tool_call>'


def read(reader: OutputReader, *deltas: Delta) -> list[object]:
    events = [event for delta in deltas for event in reader.feed(delta)]
    return events + reader.finish()


@pytest.mark.parametrize(("fmt", "call"), [("hermes", HERMES), ("qwen3_coder", XML)])
def test_reads_reasoning_text_and_calls_of_the_format(fmt: str, call: str) -> None:
    text = f"<think>\nplan\n</think>\n\nChecking.\n{call}"
    reader = OutputReader(fmt, tools=TOOLS)
    pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
    events = read(reader, *(Delta(piece) for piece in pieces[:-1]), Delta(pieces[-1], "stop", 10, 7))
    result = reader.result()
    assert result == parse_output(text, fmt, tools=TOOLS, new_id=lambda: result.tool_calls[0].id)
    assert (result.reasoning, result.content) == ("plan", "Checking.")
    assert "".join(e.text for e in events if isinstance(e, Reasoning)) == "plan"
    assert [e for e in events if isinstance(e, ParsedCall)] == result.tool_calls
    deltas = [e for e in events if isinstance(e, CallDelta)]
    assert "".join(d.arguments for d in deltas) == result.tool_calls[0].arguments_json()
    assert len(deltas) > 1 if fmt == "qwen3_coder" else len(deltas) == 1  # XML streams its arguments
    assert (reader.prompt_tokens, reader.completion_tokens, reader.finish_reason) == (10, 7, "stop")


def test_the_first_delta_says_the_text_starts_inside_a_think_block() -> None:
    reader = OutputReader()
    read(reader, Delta("plan\n</think>\n\n", starts_in_reasoning=True), Delta("answer", "stop"))
    assert (reader.result().reasoning, reader.result().content) == ("plan", "answer")
    later = OutputReader()  # only the first delta counts
    read(later, Delta("answer "), Delta("plan</think>", starts_in_reasoning=True))
    assert (later.result().reasoning, later.result().content) == ("", "answer plan</think>")


def test_reasoning_and_calls_an_engine_received_apart_are_added() -> None:
    call = ParsedCall("call_1", "f", {"n": 1}, "{}")
    reader = OutputReader(tools=TOOLS)
    events = read(reader, Delta("", reasoning="first "), Delta("ok", reasoning="second"),
                  Delta("", "stop", tool_calls=(call,)))  # fmt: skip
    assert events == [Reasoning("first "), Reasoning("second"), "ok", call]
    result = reader.result()
    assert (result.reasoning, result.content, result.tool_calls) == ("first second", "ok", [call])


def test_without_calls_only_the_reasoning_is_split_off() -> None:
    reader = OutputReader(calls=False)
    read(reader, Delta(f"<think>\nx\n</think>\n\n{HERMES}", "stop"))
    assert (reader.result().reasoning, reader.result().content, reader.result().tool_calls) == (
        "x",
        HERMES,
        [],
    )


def test_lenient_reads_bare_json_calls_of_the_tools_and_thinking_can_be_off() -> None:
    bare = '{"name": "f", "arguments": {"n": 2}}'
    strict, lenient = OutputReader(tools=TOOLS), OutputReader(tools=TOOLS, lenient=True)
    read(strict, Delta(bare, "stop"))
    read(lenient, Delta(bare, "stop"))
    assert strict.result().content == bare and not strict.result().tool_calls
    assert [(c.name, c.arguments, c.bare) for c in lenient.result().tool_calls] == [("f", {"n": 2}, True)]
    plain = OutputReader(thinking=False)
    read(plain, Delta("<think>x</think>", "stop"))
    assert (plain.result().reasoning, plain.result().content) == ("", "<think>x</think>")


def test_finish_without_any_delta() -> None:
    reader = OutputReader("qwen3_coder", tools=TOOLS)
    assert reader.finish() == [] and reader.result() == parse_output("", "qwen3_coder", new_id=ids())


def test_constraint_takes_exactly_one_kind_and_request_defaults() -> None:
    tag = {"type": "structural_tag", "format": {"type": "const_string", "value": "x"}}
    assert Constraint(structural_tag=tag).structural_tag == tag
    with pytest.raises(ValueError, match="exactly one of regex, json, grammar, choice, structural_tag"):
        Constraint(regex="a", structural_tag=tag)
    request = Request(messages=[])
    assert (request.chat_template_kwargs, request.tool_choice, request.prefill) == ({}, "auto", "")

"""Table tests for qwenrun.toolcalls.qwen3_coder: exact results, every chunk size, argument deltas."""

from __future__ import annotations

import json
from typing import Any

import pytest
from chunking import check_events, feed_sized, ids

from qwenrun.events import CallDelta, ParsedCall
from qwenrun.toolcalls import Qwen3CoderParser
from qwenrun.toolcalls.qwen3_coder import parse

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {
                    "s": {"type": "string"},
                    "t": {"type": "string"},
                    "n": {"type": "integer"},
                    "x": {"type": "number"},
                    "b": {"type": "boolean"},
                    "o": {"type": "object"},
                    "a": {"type": "array", "items": {"type": "integer"}},
                    "ns": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                    "ni": {"type": ["integer", "null"]},
                    "e": {"enum": [1, 2, 3]},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
    {"name": "get_current_weather", "parameters": {"properties": {"city": {"type": "string"}}}},  # bare
]


def call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def run(text: str, size: int) -> tuple[list[Any], Any]:
    parser = Qwen3CoderParser(TOOLS, ids())
    events = feed_sized(parser, text, size)
    return events, parser.result()


def assert_stream_agrees(text: str, sizes: range | list[int] | None = None) -> None:
    expected = parse(text, TOOLS, ids())
    for size in sizes if sizes is not None else range(1, len(text) + 1):
        events, result = run(text, size)
        assert result == expected, size
        check_events(events, expected.content, expected.tool_calls)


WEATHER = call("get_current_weather", city="广州")
OK = None
CASES: list[tuple[str, str, str, list[tuple[str, dict[str, Any], str | None]]]] = [
    (
        "weather",
        "Let me check.\n" + WEATHER,
        "Let me check.",
        [("get_current_weather", {"city": "广州"}, OK)],
    ),
    ("no_call", "  Hello, 世界. x < y > z <b>  ", "Hello, 世界. x < y > z <b>", []),
    ("empty_text", "", "", []),
    (
        "two_calls_text_around",
        f"Before\n{call('f', n='1')}\nBetween\n{call('get_time')}\nAfter\n",
        "Before\n\nBetween\n\nAfter",
        [("f", {"n": 1}, OK), ("get_time", {}, OK)],
    ),
    ("back_to_back", call("f", s="a") + call("f", s="b"), "", [("f", {"s": "a"}, OK), ("f", {"s": "b"}, OK)]),
    (
        "typed_values",
        call("f", n="-42", x="3.5", b="True", o="{'k': (1, None)}", a="[1, 2]", e="2", ni="None", t="007"),
        "",
        [
            (
                "f",
                {
                    "n": -42,
                    "x": 3.5,
                    "b": True,
                    "o": {"k": [1, None]},
                    "a": [1, 2],
                    "e": 2,
                    "ni": None,
                    "t": "007",
                },
                OK,
            )
        ],
    ),
    (
        "json_values",
        call("f", o='{"a": {"b": [true, null]}}', a=" [3]  ", x="2.0", b="false"),
        "",
        [("f", {"o": {"a": {"b": [True, None]}}, "a": [3], "x": 2, "b": False}, OK)],
    ),
    (
        "unconvertible_values_stay_text",
        call("f", n="abc", x="nan", b="yes", o="{not json", a="1e999"),
        "",
        [("f", {"n": "abc", "x": "nan", "b": "yes", "o": "{not json", "a": "1e999"}, OK)],
    ),
    ("json_quoted_python_repr", call("f", o="\"{'k': 'v'}\""), "", [("f", {"o": {"k": "v"}}, OK)]),
    ("null_for_typed", call("f", n="null", o="None"), "", [("f", {"n": None, "o": None}, OK)]),
    (
        "nullable_string",
        call("f", ns="NULL", s="null", t="nullify"),
        "",
        [("f", {"ns": None, "s": "null", "t": "nullify"}, OK)],
    ),
    ("nullable_string_text", call("f", ns="nu ll"), "", [("f", {"ns": "nu ll"}, OK)]),
    ("empty_typed_value_omitted", call("f", n="", s=""), "", [("f", {"s": ""}, OK)]),
    (
        "strip_exactly_one_newline",
        call("f", s="\n  two lines\n  indented\n", t=" "),
        "",
        [("f", {"s": "\n  two lines\n  indented\n", "t": " "}, OK)],
    ),
    (
        "inline_value",
        "<tool_call><function=f><parameter=s>abc</parameter><parameter=n>5</parameter></function></tool_call>",
        "",
        [("f", {"s": "abc", "n": 5}, OK)],
    ),
    ("tool_without_parameters", call("get_time"), "", [("get_time", {}, OK)]),  # vLLM #28806
    ("unknown_parameter_is_text", call("f", zzz="12"), "", [("f", {"zzz": "12"}, OK)]),
    ("unknown_tool_values_are_text", call("g", n="12", b="true"), "", [("g", {"n": "12", "b": "true"}, OK)]),
    # Closing tags quoted inside a value (the XML analogue of vLLM PR #45310).
    (
        "closing_tags_in_code",
        call("f", s='if tag == "</tool_call>":\n    end = "</parameter>"\n    x = "</function>"') + "\nok",
        "ok",
        [("f", {"s": 'if tag == "</tool_call>":\n    end = "</parameter>"\n    x = "</function>"'}, OK)],
    ),
    (
        "closing_tags_on_own_lines_in_text",
        call("f", s="a\n</parameter>\nb\n</function>\nc\n</tool_call>\nd"),
        "",
        [("f", {"s": "a\n</parameter>\nb\n</function>\nc\n</tool_call>\nd"}, OK)],
    ),
    (
        "nested_example_in_value",
        call("f", s=call("f", n="1") + "\nand " + call("g", s="x")[:-12], n="2"),
        "",
        [("f", {"s": call("f", n="1") + "\nand " + call("g", s="x")[:-12], "n": 2}, OK)],
    ),
    (
        "comparisons_in_value",
        call("f", s="a < b and c<d; <tool <x> </ >"),
        "",
        [("f", {"s": "a < b and c<d; <tool <x> </ >"}, OK)],
    ),
    # Malformed output.
    (
        "unclosed_value",
        "Hi " + call("f", s="abc")[:-35],
        "Hi",
        [("f", {}, "parameter 's' is not closed (the output was cut?)")],
    ),
    (
        "unclosed_function",
        "<tool_call>\n<function=f>\n<parameter=n>\n1\n</parameter>\n",
        "",
        [("f", {}, "<function=f> is not closed (the output was cut?)")],
    ),
    (
        "missing_close_tag_at_end",
        "<tool_call>\n<function=get_time>\n</function>\n",
        "",
        [("get_time", {}, OK)],
    ),
    (
        "missing_function_end",
        "<tool_call>\n<function=f>\n<parameter=n>\n1\n</parameter>\n</tool_call>",
        "",
        [("f", {"n": 1}, OK)],
    ),
    (
        "missing_close_then_text",
        "<tool_call>\n<function=f>\n<parameter=n>\n1\n</parameter>\n</function>\nDone.",
        "Done.",
        [("f", {"n": 1}, OK)],
    ),
    (
        "missing_close_then_call",
        "<tool_call>\n<function=f>\n</function>\n" + call("get_time"),
        "",
        [("f", {}, OK), ("get_time", {}, OK)],
    ),
    (
        "missing_all_closers_then_call",
        "<tool_call>\n<function=f>\n<parameter=s>\nx\n</parameter>\n" + call("get_time"),
        "",
        [("f", {"s": "x"}, OK), ("get_time", {}, OK)],
    ),
    (
        "value_closed_by_tool_call_end",
        "<tool_call>\n<function=f>\n<parameter=s>\nx\n</tool_call>\nafter",
        "",
        [("f", {}, "parameter 's' is not closed (the output was cut?)")],
    ),
    (
        "value_closed_by_tool_call_end_at_end",
        "<tool_call>\n<function=f>\n<parameter=s>\nx\n</tool_call>\n",
        "",
        [("f", {"s": "x"}, OK)],
    ),
    (
        "forgotten_parameter_end",
        "<tool_call>\n<function=f>\n<parameter=s>\nx\n<parameter=n>\n2\n</parameter>\n</function>\n</tool_call>",
        "",
        [("f", {"s": "x", "n": 2}, OK)],
    ),
    (
        "junk_before_function",
        "<tool_call>\nsure: <function=get_time>\n</function>\n</tool_call>",
        "",
        [("get_time", {}, OK)],
    ),
    (
        "hermes_json_body",
        '<tool_call>\n{"name": "get_current_weather", "arguments": {"city": "广州"}}\n</tool_call>',
        "",
        [("get_current_weather", {"city": "广州"}, OK)],
    ),
    (
        "bad_json_body",
        "<tool_call>\n{nope}\n</tool_call>",
        "",
        [("", {}, "no <function=NAME> in the tool call")],
    ),
    ("empty_block", "x<tool_call></tool_call>y", "xy", [("", {}, "no <function=NAME> in the tool call")]),
    ("only_opening_tag", "text<tool_call>", "text", [("", {}, "no <function=NAME> in the tool call")]),
    (
        "bad_function_name",
        "<tool_call>\n<function=get weather>\n</function>\n</tool_call>",
        "",
        [("", {}, "malformed <function=NAME> tag")],
    ),
    (
        "bad_parameter_name",
        "<tool_call>\n<function=f>\n<parameter=a b>\n1\n</parameter>\n</function>\n</tool_call>",
        "",
        [("f", {}, "malformed <parameter=NAME> tag")],
    ),
    (
        "parameter_twice",
        "<tool_call>\n<function=f>\n<parameter=n>\n1\n</parameter>\n<parameter=n>\n2\n</parameter>\n"
        "</function>\n</tool_call>",
        "",
        [("f", {}, "parameter 'n' is given twice")],
    ),
    ("stray_closing_tag", "a </tool_call> b </function>", "a </tool_call> b </function>", []),
    ("function_outside_block", "<function=f>\n</function>", "<function=f>\n</function>", []),
    ("partial_open_tag_at_end", "Hello <tool_", "Hello <tool_", []),
    (
        "partial_function_tag_at_end",
        "<tool_call>\n<funct",
        "",
        [("", {}, "no <function=NAME> in the tool call")],
    ),
    (
        "new_block_in_head",
        "<tool_call>\n<tool_call>\n<function=get_time>\n</function>\n</tool_call>",
        "",
        [("", {}, "no <function=NAME> in the tool call"), ("get_time", {}, OK)],
    ),
]


@pytest.mark.parametrize(("text", "content", "calls"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_case(text: str, content: str, calls: list[tuple[str, dict[str, Any], str | None]]) -> None:
    result = parse(text, TOOLS, ids())
    assert result.content == content
    assert [(c.name, c.arguments, c.error) for c in result.tool_calls] == calls
    assert [c.id for c in result.tool_calls] == [f"id{n}" for n in range(len(calls))]
    assert result.malformed == [c for c in result.tool_calls if not c.ok]
    assert_stream_agrees(text)


def test_raw_is_the_text_between_the_tags() -> None:
    (c,) = parse(WEATHER).tool_calls
    assert c.raw == "\n<function=get_current_weather>\n<parameter=city>\n广州\n</parameter>\n</function>\n"
    assert c.arguments_json() == '{"city": "广州"}'


def test_string_arguments_stream_as_written() -> None:  # vLLM #30439
    parser = Qwen3CoderParser(TOOLS, ids())
    assert parser.feed("<tool_call>\n<function=f>\n<param") == [CallDelta(0, "id0", "f", "{")]
    assert parser.feed("eter=s>\nprint(") == [CallDelta(0, "id0", None, '"s": "print(')]
    assert parser.feed('"hi")\n') == [CallDelta(0, "id0", None, '\\"hi\\")')]  # the newline waits
    assert parser.feed("x\n</param") == [CallDelta(0, "id0", None, "\\nx")]
    assert parser.feed("eter>\n") == []  # a closing tag waits for what follows it
    assert parser.feed("<parameter=n>\n4") == [CallDelta(0, "id0", None, '"')]
    assert parser.feed("2\n</parameter>\n</function>") == [CallDelta(0, "id0", None, ', "n": 42')]
    events = parser.feed("\n</tool_call>")
    assert events[0] == CallDelta(0, "id0", None, "}")
    assert isinstance(events[1], ParsedCall) and events[1].arguments == {"s": 'print("hi")\nx', "n": 42}
    assert parser.finish() == []


def test_nullable_string_waits_until_it_cannot_be_null() -> None:
    parser = Qwen3CoderParser(TOOLS, ids())
    parser.feed("<tool_call>\n<function=f>\n<parameter=ns>\n")
    assert parser.feed("nu") == []
    assert parser.feed("ll") == []
    assert parser.feed("s") == [CallDelta(0, "id0", None, '"nulls')]


def test_text_is_released_early_and_tags_are_never_shown() -> None:
    parser = Qwen3CoderParser(TOOLS, ids())
    assert parser.feed("Hello wor") == ["Hello wor"]
    assert parser.feed("ld <tool") == ["ld "]
    assert parser.feed("box> ok") == ["<toolbox> ok"]
    assert parser.finish() == []
    assert parser.result().content == "Hello world <toolbox> ok"


def test_feed_after_finish_is_an_error() -> None:
    parser = Qwen3CoderParser()
    assert parser.finish() == [] and parser.finish() == []
    with pytest.raises(RuntimeError):
        parser.feed("x")


def test_garbage_tools_are_ignored() -> None:
    tools: Any = [None, 3, {"function": "x"}, {"function": {"name": "f", "parameters": {"properties": [1]}}}]
    (c,) = parse(call("f", n="1"), tools).tool_calls
    assert c.arguments == {"n": "1"}


def test_never_raises_on_pathological_values() -> None:
    deep = "[" * 100_000
    (c,) = parse(call("f", o=deep, a="(" * 5000, n="9" * 10_000), TOOLS).tool_calls
    assert c.arguments == {"o": deep, "a": "(" * 5000, "n": "9" * 10_000}
    assert_stream_agrees(call("f", o="[" * 300), sizes=[1, 7, 300])


def test_a_long_value_full_of_tags_fed_one_character_at_a_time() -> None:
    """Tags inside a value that are not structural stay in the value (how the time grows with
    such a value is measured by benchmarks/bench_parser.py, case ``qwen3-coder tags``)."""
    piece = '</tool_call>" <parameter=s>\n</function> x <tool_call> </parameter>x\n'
    parser = Qwen3CoderParser(TOOLS)
    for char in call("f", s=piece * 2000):
        parser.feed(char)
    parser.finish()
    assert [(c.name, c.arguments) for c in parser.result().tool_calls] == [("f", {"s": piece * 2000})]


def test_deltas_of_a_parallel_call_sequence() -> None:
    text = call("f", s="a", n="1") + "\n" + call("get_time")
    events, _ = run(text, 1)
    deltas = [e for e in events if isinstance(e, CallDelta)]
    assert {d.index for d in deltas} == {0, 1}
    assert ["".join(d.arguments for d in deltas if d.index == i) for i in (0, 1)] == [
        json.dumps({"s": "a", "n": 1}),
        "{}",
    ]

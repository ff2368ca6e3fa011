"""Table tests for qwenrun.toolcalls.hermes: exact parse() results, and StreamParser at every chunk size
(bare JSON calls: ``test_toolcalls_lenient.py``)."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from qwenrun.events import ParsedCall
from qwenrun.toolcalls.base import ParseResult, new_call_id
from qwenrun.toolcalls.hermes import StreamParser, parse


def ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"id{next(counter)}"


def stream(text: str, size: int) -> tuple[list[str | ParsedCall], ParseResult]:
    sp = StreamParser(ids())
    events: list[str | ParsedCall] = []
    for k in range(0, len(text), size):
        events += sp.feed(text[k : k + size])
    events += sp.finish()
    return events, sp.result()


def assert_stream_agrees(text: str, sizes: range | list[int] | None = None) -> None:
    expected = parse(text, ids())
    for size in sizes if sizes is not None else range(1, len(text) + 1):
        events, result = stream(text, size)
        assert result == expected, size
        shown = [e for e in events if isinstance(e, str)]
        assert all("<tool_call>" not in s for s in shown)
        assert "".join(shown).strip() == expected.content
        assert [e for e in events if isinstance(e, ParsedCall)] == expected.tool_calls


def call(name: str, args: dict[str, Any]) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n</tool_call>"


WEATHER = '<tool_call>\n{"name": "get_current_weather", "arguments": {"city": "广州"}}\n</tool_call>'
OK = None
# (id, text, content, [(name, arguments, error)])
CASES: list[tuple[str, str, str, list[tuple[str, dict[str, Any], str | None]]]] = [
    ("weather", WEATHER, "", [("get_current_weather", {"city": "广州"}, OK)]),
    ("no_call", "  Hello, 世界. x < y > z  ", "Hello, 世界. x < y > z", []),
    ("empty_text", "", "", []),
    (
        "two_calls_text_around",
        f"Before\n{call('a', {'x': 1})}\nBetween\n{call('b', {})}\nAfter\n",
        "Before\n\nBetween\n\nAfter",
        [("a", {"x": 1}, OK), ("b", {}, OK)],
    ),
    ("back_to_back", call("a", {}) + call("b", {"k": [1, 2]}), "", [("a", {}, OK), ("b", {"k": [1, 2]}, OK)]),
    (
        "unclosed_last_block",
        'Let me check.<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n',
        "Let me check.",
        [("f", {"x": 1}, OK)],
    ),
    (
        "truncated_by_max_tokens",
        'Hi <tool_call>\n{"name": "f", "argu',
        "Hi",
        [("", {}, "invalid JSON at char 14: Unterminated string starting at")],
    ),
    ("only_opening_tag", "text<tool_call>", "text", [("", {}, "empty tool call")]),
    (
        "trailing_garbage",
        '<tool_call>{"name": "f", "arguments": {}}}} oops\n</tool_call>',
        "",
        [("f", {}, OK)],
    ),
    (
        "single_quotes",
        "<tool_call>{'name': 'f', 'arguments': {'a': 1, 'b': True, 'c': None, 't': (1, 2)}}</tool_call>",
        "",
        [("f", {"a": 1, "b": True, "c": None, "t": [1, 2]}, OK)],
    ),
    ("single_quotes_garbage", "<tool_call>{'name': 'f'} !!</tool_call>", "", [("f", {}, OK)]),
    (
        "arguments_as_json_string",
        '<tool_call>{"name": "f", "arguments": "{\\"city\\": \\"广州\\"}"}</tool_call>',
        "",
        [("f", {"city": "广州"}, OK)],
    ),
    ("arguments_empty_string", '<tool_call>{"name": "f", "arguments": ""}</tool_call>', "", [("f", {}, OK)]),
    (
        "code_fence",
        'Sure.\n<tool_call>\n```json\n{"name": "f", "arguments": {"q": "x"}}\n```\n</tool_call>',
        "Sure.",
        [("f", {"q": "x"}, OK)],
    ),
    ("code_fence_no_lang", '<tool_call>```{"name": "f"}```</tool_call>', "", [("f", {}, OK)]),
    (
        "parameters_alias",
        '<tool_call>{"name": "f", "parameters": {"a": 2}}</tool_call>',
        "",
        [("f", {"a": 2}, OK)],
    ),
    ("missing_arguments", '<tool_call>{"name": "f"}</tool_call>', "", [("f", {}, OK)]),
    ("null_arguments", '<tool_call>{"name": "f", "arguments": null}</tool_call>', "", [("f", {}, OK)]),
    (
        "openai_function_wrapper",
        '<tool_call>{"type": "function", "function": {"name": "f", "arguments": "{\\"a\\": 1}"}}</tool_call>',
        "",
        [("f", {"a": 1}, OK)],
    ),
    (
        "bad_json",
        '<tool_call>{"name": "f" "arguments": {}}</tool_call>',
        "",
        [("", {}, "invalid JSON at char 13: Expecting ',' delimiter")],
    ),
    ("missing_name", '<tool_call>{"arguments": {"a": 1}}</tool_call>', "", [("", {}, 'missing "name"')]),
    (
        "empty_name",
        '<tool_call>{"name": " ", "arguments": {}}</tool_call>',
        "",
        [("", {}, '"name" must be a non-empty string')],
    ),
    (
        "name_not_str",
        '<tool_call>{"name": 3}</tool_call>',
        "",
        [("", {}, '"name" must be a non-empty string')],
    ),
    ("not_an_object", '<tool_call>["f", {}]</tool_call>', "", [("", {}, "expected a JSON object, got list")]),
    (
        "arguments_list",
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        "",
        [("f", {}, "arguments is not an object")],
    ),
    (
        "arguments_str_list",
        '<tool_call>{"name": "f", "arguments": "[1]"}</tool_call>',
        "",
        [("f", {}, "arguments is not an object")],
    ),
    (
        "arguments_bad_string",
        '<tool_call>{"name": "f", "arguments": "{a"}</tool_call>',
        "",
        [
            (
                "f",
                {},
                "arguments string: invalid JSON at char 1: Expecting property name enclosed in double quotes",
            )
        ],
    ),
    (
        "nan_argument",
        '<tool_call>{"name": "f", "arguments": {"a": NaN}}</tool_call>',
        "",
        [("f", {}, "arguments contain NaN or Infinity")],
    ),
    (
        "set_argument",
        "<tool_call>{'name': 'f', 'arguments': {'a': {1}}}</tool_call>",
        "",
        [("f", {}, "arguments are not JSON-serialisable: TypeError")],
    ),
    ("stray_closing_tag", "a </tool_call> b", "a </tool_call> b", []),
    ("stray_closing_after_call", call("f", {}) + "\n</tool_call> done", "</tool_call> done", [("f", {}, OK)]),
    ("empty_block", "x<tool_call></tool_call>y", "xy", [("", {}, "empty tool call")]),
    ("whitespace_block", "<tool_call>\n \n</tool_call>", "", [("", {}, "empty tool call")]),
    (
        "nested_braces",
        '<tool_call>{"name": "f", "arguments": {"a": {"b": [1, {"c": "}{"}]}, "d": "{"}}</tool_call>',
        "",
        [("f", {"a": {"b": [1, {"c": "}{"}]}, "d": "{"}, OK)],
    ),
    # A closing tag inside a JSON string whose quote closes on the same line is part of the string.
    (
        "closing_tag_in_json_string",
        '<tool_call>\n{"name": "w", "arguments": {"s": "end with </tool_call> or \\"<tool_call>\\""}}'
        "\n</tool_call>ok",
        "ok",
        [("w", {"s": 'end with </tool_call> or "<tool_call>"'}, OK)],
    ),
    # An unterminated string does not swallow the closing tag: the tag on its line still closes.
    (
        "unterminated_string_then_tag",
        '<tool_call>{"name": "x}</tool_call> tail',
        "tail",
        [("", {}, "invalid JSON at char 9: Unterminated string starting at")],
    ),
    (
        "unterminated_string_then_next_call",
        '<tool_call>{"name": "x}</tool_call>\n' + call("y", {}),
        "",
        [("", {}, "invalid JSON at char 9: Unterminated string starting at"), ("y", {}, OK)],
    ),
    # Qwen puts the closing tag on its own line: a stray quote earlier cannot hide it.
    (
        "stray_quote_own_line_tag",
        '<tool_call>\n{"name": "f", "arguments": {"a": "b}}\n</tool_call>\nafter',
        "after",
        [("", {}, "invalid JSON at char 33: Unterminated string starting at")],
    ),
    # Raw newlines inside strings are accepted (json strict=False).
    (
        "raw_newline_in_string",
        '<tool_call>\n{"name": "f", "arguments": {"code": "a\nb"}}\n</tool_call>',
        "",
        [("f", {"code": "a\nb"}, OK)],
    ),
    # A forgotten closing tag: the next opening tag closes the block.
    (
        "missing_close_between",
        '<tool_call>{"name": "a"}\n<tool_call>{"name": "b"}</tool_call>',
        "",
        [("a", {}, OK), ("b", {}, OK)],
    ),
    ("partial_open_tag_at_end", "Hello <tool_", "Hello <tool_", []),
    ("almost_tags", "<tool_cal> <tool_call <tool_call/>", "<tool_cal> <tool_call <tool_call/>", []),
    (
        "escaped_backslash_before_quote",
        '<tool_call>{"name": "f", "arguments": {"p": "C:\\\\"}}</tool_call>',
        "",
        [("f", {"p": "C:\\"}, OK)],
    ),
]


@pytest.mark.parametrize(("text", "content", "calls"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_case(text: str, content: str, calls: list[tuple[str, dict[str, Any], str | None]]) -> None:
    result = parse(text, ids())
    assert result.content == content
    assert [(c.name, c.arguments, c.error) for c in result.tool_calls] == calls
    assert [c.id for c in result.tool_calls] == [f"id{n}" for n in range(len(calls))]
    assert result.malformed == [c for c in result.tool_calls if not c.ok]
    for c in result.tool_calls:
        assert json.loads(c.arguments_json()) == c.arguments
    assert_stream_agrees(text)


def test_raw_is_unstripped_text_between_tags() -> None:
    (c,) = parse(WEATHER).tool_calls
    assert c.raw == '\n{"name": "get_current_weather", "arguments": {"city": "广州"}}\n'
    assert c.arguments_json() == '{"city": "广州"}'
    assert c.ok


def test_default_ids_unique_and_well_formed() -> None:
    result = parse(call("a", {}) * 50)
    got = [c.id for c in result.tool_calls]
    assert len(set(got)) == 50
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in got)
    assert re.fullmatch(r"call_[0-9a-f]{24}", new_call_id())


def test_text_is_released_early() -> None:
    sp = StreamParser(ids())
    assert sp.feed("Hello wor") == ["Hello wor"]
    assert sp.feed("ld <tool") == ["ld "]  # "<tool" held back: could be the opening tag
    assert sp.feed("box> ok") == ["<toolbox> ok"]
    events = sp.feed('<tool_call>{"name": "f"}</tool_call>x')
    assert [type(e) for e in events] == [ParsedCall, str]
    assert sp.finish() == []
    assert sp.result().content == "Hello world <toolbox> okx"


def test_feed_after_finish_is_an_error() -> None:
    sp = StreamParser()
    sp.finish()
    assert sp.finish() == []
    with pytest.raises(RuntimeError):
        sp.feed("x")


def test_never_raises_on_pathological_input() -> None:
    deep = "<tool_call>" + "[" * 100_000 + "</tool_call>"
    (c,) = parse(deep).tool_calls
    assert c.error == "invalid JSON: RecursionError"
    deep_py = "<tool_call>{'name': 'f', 'arguments': " + "(" * 5000 + "</tool_call>"
    assert parse(deep_py).tool_calls[0].error is not None
    huge_int = "<tool_call>{'name': 'f', 'arguments': {'a': " + "9" * 10_000 + "}}</tool_call>"
    assert parse(huge_int).tool_calls[0].error is not None
    assert_stream_agrees(deep[:2000] + deep[-20:], sizes=[1, 7, 300])


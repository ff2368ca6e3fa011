"""qwenrun.toolcalls.lenient: answers written as bare JSON calls, read in every format (a model taught
Qwen3-Coder XML writes them too), one-shot and at every chunking, and a fuzz."""

from __future__ import annotations

import json
from typing import Any

import pytest
from chunking import check_events, cut_lists, feed_cuts, feed_sized, ids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenrun.events import CallDelta, ParsedCall
from qwenrun.toolcalls import ParseResult, new_parser, parse_output
from qwenrun.toolcalls.lenient import MAX_PROSE, LenientParser, lenient_calls

FORMATS = ["hermes", "qwen3_coder"]
OK = None


def call(name: str, args: dict[str, Any]) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + "\n</tool_call>"


DECLARED = {"get_current_weather", "f", "g"}
FENCED_WEATHER = '```json\n{\n  "name": "get_current_weather",\n  "arguments": {\n    "city": "广州"\n  }\n}\n```'
# (id, text, content, [(name, arguments, error)]) with tools=DECLARED
BARE_CASES: list[tuple[str, str, str, list[tuple[str, dict[str, Any], str | None]]]] = [
    ("fenced_json", FENCED_WEATHER, "", [("get_current_weather", {"city": "广州"}, OK)]),
    ("fence_without_language", '```\n{"name": "f", "arguments": {}}\n```', "", [("f", {}, OK)]),
    ("bare_object", '  {"name": "f", "arguments": {"x": 1}}\n', "", [("f", {"x": 1}, OK)]),
    ("parameters_key", '{"name": "f", "parameters": {"x": 1}}', "", [("f", {"x": 1}, OK)]),
    ("arguments_as_string", '{"name": "f", "arguments": "{\\"x\\": 1}"}', "", [("f", {"x": 1}, OK)]),
    ("extra_keys_kept_out", '{"name": "f", "arguments": {}, "id": "1"}', "", [("f", {}, OK)]),
    (
        "list_of_calls",
        '[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"a": [1]}}]',
        "",
        [("f", {}, OK), ("g", {"a": [1]}, OK)],
    ),
    (
        "objects_one_per_line",
        '{"name": "f", "arguments": {}}\n{"name": "g", "arguments": {}}',
        "",
        [("f", {}, OK), ("g", {}, OK)],
    ),
    (
        "two_fences",
        '```json\n{"name": "f", "arguments": {}}\n```\n```json\n{"name": "g", "arguments": {}}\n```',
        "",
        [("f", {}, OK), ("g", {}, OK)],
    ),
    (
        "openai_wrapper",
        '{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}',
        "",
        [("f", {"a": 1}, OK)],
    ),
    ("python_literal", "{'name': 'f', 'arguments': {'a': True}}", "", [("f", {"a": True}, OK)]),
    ("fence_in_argument", '{"name": "f", "arguments": {"s": "```py"}}', "", [("f", {"s": "```py"}, OK)]),
    # never a call: an undeclared name, text around the JSON, arguments that are not an object
    ("undeclared_name", '{"name": "rm_rf", "arguments": {}}', '{"name": "rm_rf", "arguments": {}}', []),
    (
        "one_undeclared_in_list",
        '[{"name": "f", "arguments": {}}, {"name": "h", "arguments": {}}]',
        '[{"name": "f", "arguments": {}}, {"name": "h", "arguments": {}}]',
        [],
    ),
    # one line of prose, then the call and nothing else: the prose is the answer's text
    ("prose_line_before", 'Sure: {"name": "f", "arguments": {}}', "Sure:", [("f", {}, OK)]),
    (
        "prose_line_then_fence",
        "Here is the call:\n\n" + FENCED_WEATHER + "\n",
        "Here is the call:",
        [("get_current_weather", {"city": "广州"}, OK)],
    ),
    ("prose_line_then_list", '好的： [{"name": "g", "arguments": {"a": 1}}]', "好的：", [("g", {"a": 1}, OK)]),
    (
        "two_lines_of_prose",
        'Sure.\nHere it is: {"name": "f", "arguments": {}}',
        'Sure.\nHere it is: {"name": "f", "arguments": {}}',
        [],
    ),
    (
        "prose_too_long",
        "x" * 201 + ' {"name": "f", "arguments": {}}',
        "x" * 201 + ' {"name": "f", "arguments": {}}',
        [],
    ),
    ("prose_longest", "x" * 199 + ' {"name": "f", "arguments": {}}', "x" * 199, [("f", {}, OK)]),
    (
        "prose_then_text_after",
        'Calling {"name": "f", "arguments": {}} now.',
        'Calling {"name": "f", "arguments": {}} now.',
        [],
    ),
    (  # after prose only a well-formed call is read: a broken one stays text
        "prose_then_broken_call",
        'Calling {"name": "f", "arguments": {',
        'Calling {"name": "f", "arguments": {',
        [],
    ),
    (
        "prose_then_undeclared",
        'Calling {"name": "rm", "arguments": {}}',
        'Calling {"name": "rm", "arguments": {}}',
        [],
    ),
    ("prose_with_a_link_first", 'See [the docs]: {"name": "f", "arguments": {}}',
     'See [the docs]: {"name": "f", "arguments": {}}', []),  # only the first { [ ``` counts
    ("inline_code_in_prose", 'Use `f`: {"name": "f", "arguments": {}}', "Use `f`:", [("f", {}, OK)]),
    ("code_fence_answer", "```python\nprint({'name': 1})\n```", "```python\nprint({'name': 1})\n```", []),
    (
        "text_after_fence",
        '```json\n{"name": "f", "arguments": {}}\n```\nThis gets it.',
        '```json\n{"name": "f", "arguments": {}}\n```\nThis gets it.',
        [],
    ),
    ("no_arguments_key", '{"name": "f"}', '{"name": "f"}', []),
    ("arguments_list", '{"name": "f", "arguments": [1]}', '{"name": "f", "arguments": [1]}', []),
    ("name_not_str", '{"name": ["f"], "arguments": {}}', '{"name": ["f"], "arguments": {}}', []),
    ("plain_json_data", '{"city": "广州", "temp": 31}', '{"city": "广州", "temp": 31}', []),
    ("json_scalar_list", "[1, 2, 3]", "[1, 2, 3]", []),
    ("backtick_prose", "`f` is a tool", "`f` is a tool", []),
    ("empty_fence", "```\n```", "```\n```", []),
    # the model wrote its call again and again until max_tokens: the complete ones are calls
    (
        "repeated_then_cut",
        '{"name": "f", "arguments": {"a": 1}}\n{"name": "f", "arguments": {"a": 1}}\n{"name": "f", "argu',
        "",
        [("f", {"a": 1}, OK), ("f", {"a": 1}, OK)],
    ),
    (
        "fences_then_an_open_cut_fence",
        '```json\n{"name": "g", "arguments": {}}\n```\n```json\n{"name": "g", "arguments": {"x": "ab',
        "",
        [("g", {}, OK)],
    ),
    (
        "complete_but_unclosed_fence",
        '```json\n{"name": "g", "arguments": {}}\n',
        "",
        [("g", {}, OK)],
    ),
    (  # prose after a call is no cut: a malformed call, which the agent repairs
        "prose_after_a_call",
        '{"name": "f", "arguments": {}} then I will answer',
        "",
        [("f", {}, "text after the call's JSON")],
    ),
    # broken JSON that names a declared tool: a malformed call (the agent repairs it)
    (
        "truncated_object",
        '{"name": "get_current_weather", "arguments": {"city": ',
        "",
        [("get_current_weather", {}, "invalid JSON at char 53: Expecting value")],
    ),
    # tags win: with a tagged call the JSON text is content
    (
        "tagged_call_and_json",
        '{"name": "g", "arguments": {}}' + call("f", {}),
        '{"name": "g", "arguments": {}}',
        [("f", {}, OK)],
    ),
]

TOOLS = [{"type": "function", "function": {"name": name, "parameters": {}}} for name in sorted(DECLARED)]


def read(fmt: str, text: str, cuts: list[int] | None = None) -> tuple[list[Any], ParseResult]:
    parser = new_parser(fmt, TOOLS, ids(), lenient=True)
    events = feed_cuts(parser, text, cuts or [])
    return events, parser.result()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("text", "content", "calls"), [c[1:] for c in BARE_CASES], ids=[c[0] for c in BARE_CASES])
def test_case(fmt: str, text: str, content: str, calls: list[tuple[str, dict[str, Any], str | None]]) -> None:
    _, result = read(fmt, text)
    assert result.content == content
    assert [(c.name, c.arguments, c.error) for c in result.tool_calls] == calls
    assert all(c.bare for c in result.tool_calls) or "<tool_call>" in text
    for size in range(1, len(text) + 1):
        parser = new_parser(fmt, TOOLS, ids(), lenient=True)
        events = feed_sized(parser, text, size)
        assert parser.result() == result, size
        check_events(events, content, result.tool_calls)


@pytest.mark.parametrize("fmt", FORMATS)
def test_off_unless_lenient_with_tools(fmt: str) -> None:
    for parser in (new_parser(fmt, TOOLS, ids()), new_parser(fmt, [], ids(), lenient=True)):
        parser.feed(FENCED_WEATHER)
        parser.finish()
        assert parser.result() == ParseResult(FENCED_WEATHER, [])
    assert lenient_calls(FENCED_WEATHER, ()) is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_holds_back_only_what_may_be_a_call(fmt: str) -> None:
    def parser() -> LenientParser:
        made = new_parser(fmt, TOOLS, ids(), lenient=True)
        assert isinstance(made, LenientParser)
        return made

    sp = parser()
    assert sp.feed("  ") == ["  "]
    assert sp.feed("Hel") == ["Hel"]  # prose is text, call or not: it streams
    assert sp.feed("lo `") == ["lo "]  # a backtick may open a fence: held
    assert sp.feed("x` {") == ["`x` "]  # from "{" on: held while it may open a call
    assert sp.feed('"a": 1} yes') == []  # it opens as a call does: held to the end
    assert sp.finish() == ['{"a": 1} yes']  # no call: the rest is text
    sp = parser()
    assert sp.feed("Sure.\nHow") == ["Sure.\nHow"]
    assert sp.feed(" {x}") == [" {x}"]  # a second line of prose: nothing is held any more
    sp = parser()
    assert sp.feed("x" * (MAX_PROSE + 1) + " {") == ["x" * (MAX_PROSE + 1) + " {"]  # too long a line
    sp = parser()
    assert sp.feed("See [") == ["See "]
    assert sp.feed("1] and") == ["[1] and"]  # "[" that does not open a list of objects
    sp = parser()
    assert sp.feed("``") == []
    assert sp.feed("`py") == []  # a fence: its language may go on
    assert sp.feed("thon\nimport os") == ["```python\nimport os"]  # code, not a call
    sp = parser()
    assert sp.feed('Sure: {"name": "f", ') == ["Sure: "]  # may be a call: held to the end
    assert sp.feed('"arguments": {}}') == []
    delta, done = sp.finish()
    assert isinstance(done, ParsedCall) and done.name == "f" and isinstance(delta, CallDelta)
    assert sp.result() == ParseResult("Sure:", [done])
    sp = parser()
    assert sp.feed('{"a": 1}') == []
    assert sp.feed(" and <tool_call>") == []
    tagged = '{"name": "f", "arguments": {}}' if fmt == "hermes" else "<function=f>\n</function>"
    events = sp.feed(f"\n{tagged}\n</tool_call>")  # a tagged call: what was held is released first
    assert events[0] == '{"a": 1} and ' and isinstance(events[-1], ParsedCall) and events[-1].ok
    assert sp.feed(" ok") == [" ok"]


def test_a_model_taught_xml_writes_a_json_call() -> None:
    """The case of the issue: Qwen3-Coder's format, and the model answers with fenced JSON."""
    tools = [{"type": "function", "function": {"name": "get_current_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    result = parse_output("<think>\nok\n</think>\n\n" + FENCED_WEATHER, "qwen3_coder", tools=tools, lenient=True)
    assert (result.content, result.reasoning) == ("", "ok")
    assert [(c.name, c.arguments, c.bare) for c in result.tool_calls] == [("get_current_weather", {"city": "广州"}, True)]
    strict = parse_output(FENCED_WEATHER, "qwen3_coder", tools=tools)
    assert (strict.content, strict.tool_calls) == (FENCED_WEATHER, [])


TOKENS = ["<tool_call>", "</tool_call>", "<function=f>", "</function>", "<parameter=a>", "</parameter>", "{",
          "}", "[", "]", '"', "'", "\n", " ", ":", ",", "`", "```", "```json\n", '"name"', '"f"', "'name'", "x",
          "Sure: ", "好的，", "Here it is:\n", "(", "#"]  # fmt: skip
noisy_text = st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=4)), max_size=30).map("".join)
arguments = st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.text(max_size=6)), max_size=3)
bare_call = st.builds(
    lambda name, args, fence: (
        (f"```{fence}\n" if fence is not None else "")
        + json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
        + ("\n```" if fence is not None else "")
    ),
    st.sampled_from([*sorted(DECLARED), "h"]),
    arguments,
    st.sampled_from([None, "", "json"]),
)


@st.composite
def mutated_bare_calls(draw: st.DrawFn) -> str:
    """Bare calls, with a line of prose before them or not, and a few random insertions."""
    prose = draw(st.sampled_from(["", "Sure: ", "Here is the call:\n", "x" * (MAX_PROSE - 1) + " ", "a\nb "]))
    parts = draw(st.lists(st.one_of(bare_call, st.sampled_from([" ", "\n", ",", "[", "]"])), max_size=5))
    text = prose + "".join(parts)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.one_of(st.sampled_from(TOKENS), noisy_text)) + text[at:]
    return text


@settings(max_examples=3000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(mutated_bare_calls(), st.sampled_from(FORMATS), cut_lists)
def test_streaming_equals_one_shot(text: str, fmt: str, cuts: list[int]) -> None:
    _, expected = read(fmt, text)
    for c in expected.tool_calls:
        assert c.name in DECLARED or "<tool_call>" in text  # a bare call always names a declared tool
        assert c.ok or (c.arguments == {} and c.error)
    for chunking in (cuts, list(range(1, len(text)))):
        events, result = read(fmt, text, chunking)
        assert result == expected
        check_events(events, expected.content, expected.tool_calls)

"""Property tests for qwenrun.toolcalls.qwen3_coder: never raises, streaming == one-shot for any
chunking, argument deltas add up, and well-formed calls round-trip with their types.

6,000 examples in total (2,000 each); no example database is written.
"""

from __future__ import annotations

import json
import re
from typing import Any

from chunking import check_events, cut_lists, feed_cuts, ids, mutate
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qwenrun.toolcalls import Qwen3CoderParser
from qwenrun.toolcalls.base import ParseResult
from qwenrun.toolcalls.qwen3_coder import parse

SETTINGS = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}
SCHEMA = {
    "s": {"type": "string"}, "t": {"type": "string"}, "n": {"type": "integer"}, "x": {"type": "number"},
    "b": {"type": "boolean"}, "o": {"type": "object"}, "a": {"type": "array"},
    "ns": {"type": ["string", "null"]},
}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"properties": SCHEMA}}}]

TOKENS = [
    "<tool_call>", "</tool_call>", "<function=", "<function=f>", "</function>", "<parameter=",
    "<parameter=s>", "<parameter=n>", "<parameter=ns>", "</parameter>", "<", "</", ">", "=", "\n", " ",
    "<tool", "_call>", "<func", "tion=f>", "<para", "meter=s>", "</param", "eter>", '"', "'", "{", "}",
    "[1, 2]", "{'k': (1,)}", "null", "None", "True", "false", "1", "-2.5", "nan", "广州", "x", "\\",
    "<think>", "</think>", '{"name": "f", "arguments": {"s": "v"}}',
]  # fmt: skip

noisy_text = st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=4)), max_size=40).map("".join)
text_value = st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=5)), max_size=8).map("".join)


def render(name: str, params: list[tuple[str, str]]) -> str:
    """A call as Qwen3-Coder's chat template writes it."""
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


# A value that continues the format after one of its own closing tags, or opens a nested example
# at a line start, is read as structure (by design), so the round trip leaves such values out.
_STRUCTURAL = re.compile(
    r"</parameter>\s*(<parameter=|</function>|</tool_call>|<tool_call>)"
    r"|</function>\s*(</tool_call>|<tool_call>)|</tool_call>\s*<tool_call>"
    r"|(^|\n)(<tool_call>|<parameter=)"
)


@st.composite
def typed_params(draw: st.DrawFn) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Parameters as text (as the template renders them) and the arguments they mean."""
    keys = draw(st.lists(st.sampled_from([*SCHEMA, "zz"]), unique=True, max_size=5))
    params, expected = [], {}
    for key in keys:
        kind = SCHEMA.get(key, {"type": "string"})["type"]
        value: Any
        if kind == "integer":
            value = draw(st.integers(-(10**12), 10**12))
            text = str(value)
        elif kind == "number":
            value = draw(st.floats(allow_nan=False, allow_infinity=False, width=32))
            text = repr(value)
        elif kind == "boolean":
            value = draw(st.booleans())
            text = str(value)  # the template's `| string`: True / False
        elif kind in ("object", "array"):
            leaf = st.one_of(st.none(), st.booleans(), st.integers(-99, 99), text_value)
            inner = st.recursive(
                leaf,
                lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                max_leaves=6,
            )
            value = draw(
                st.dictionaries(st.text(max_size=5), inner, max_size=3)
                if kind == "object"
                else st.lists(inner, max_size=3)
            )
            text = json.dumps(value, ensure_ascii=False)
        else:
            text = value = draw(text_value)
            if kind != "string" and value.lower() in ("null", "none"):  # a nullable string
                value = None
        assume(not _STRUCTURAL.search(text))
        params.append((key, text))
        expected[key] = value
    return params, expected


def check(text: str, cuts: list[int]) -> ParseResult:
    expected = parse(text, TOOLS, ids())
    for chunking in (cuts, list(range(1, len(text)))):  # random cuts, then 1-char chunks
        parser = Qwen3CoderParser(TOOLS, ids())
        events = feed_cuts(parser, text, chunking)
        assert parser.result() == expected
        check_events(events, expected.content, expected.tool_calls)
    return expected


@settings(max_examples=2000, **SETTINGS)  # type: ignore[arg-type]
@given(noisy_text, cut_lists)
def test_noisy_text(text: str, cuts: list[int]) -> None:
    check(text, cuts)


@st.composite
def mutated_calls(draw: st.DrawFn) -> str:
    calls = st.builds(lambda p: render("f", p[0]), typed_params())
    text = "".join(draw(st.lists(st.one_of(calls, noisy_text), min_size=1, max_size=3)))
    return mutate(draw, text, TOKENS)


@settings(max_examples=2000, **SETTINGS)  # type: ignore[arg-type]
@given(mutated_calls(), cut_lists)
def test_mutated_calls(text: str, cuts: list[int]) -> None:
    check(text, cuts)


@settings(max_examples=2000, **SETTINGS)  # type: ignore[arg-type]
@given(
    st.lists(typed_params(), max_size=3),
    st.lists(st.text(max_size=10).filter(lambda s: "<tool_call>" not in s), min_size=4, max_size=4),
    cut_lists,
)
def test_valid_calls_roundtrip(
    calls: list[tuple[list[tuple[str, str]], dict[str, Any]]], texts: list[str], cuts: list[int]
) -> None:
    text = texts[0] + "".join(render("f", p) + t for (p, _), t in zip(calls, texts[1:], strict=False))
    result = check(text, cuts)
    assert [(c.name, c.arguments, c.error) for c in result.tool_calls] == [("f", a, None) for _, a in calls]
    assert result.content == (texts[0] + "".join(texts[1 : len(calls) + 1])).strip()

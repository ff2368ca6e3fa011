"""Property tests for qwenrun.toolcalls.hermes: never raises, streaming == one-shot for any chunking.

10,500 examples in total (4,000 + 4,000 + 2,500; bare JSON calls: ``test_toolcalls_lenient.py``);
no example database is written.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from chunking import cut_lists, ids, mutate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenrun.events import ParsedCall
from qwenrun.toolcalls.base import ParseResult
from qwenrun.toolcalls.hermes import StreamParser, parse

SETTINGS = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}

TOKENS = [
    "<tool_call>", "</tool_call>", "<tool_call>\n", "\n</tool_call>", "<", "</", "<tool", "_call>",
    "tool_call>", "<tool_call", ">", "{", "}", "[", "]", '"', "'", "\\", '\\"', "\\\\", "\n", " ", ":",
    ",", "```", "```json\n", '"name"', '"arguments"', '"parameters"', '"f"', "'name'", "'f'", "1", "-2.5",
    "true", "null", "NaN", "1e999", "(", ")", "广州", "x", '{"name": "f", "arguments": {}}',
    '{"name": "g", "arguments": {"a": "</tool_call>"}}', "{'name': 'h', 'arguments': {'k': (1,)}}",
]  # fmt: skip

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.text(max_size=12),
    st.sampled_from(["</tool_call>", "<tool_call>", '"', "\\", "}{", "\n", "广州"]),
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
arguments = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
names = st.text(min_size=1, max_size=12).filter(lambda s: bool(s.strip()))


def render(name: str, args: dict[str, Any]) -> str:
    return (
        "<tool_call>\n" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + "\n</tool_call>"
    )


noisy_text = st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=4)), max_size=40).map("".join)
valid_call = st.builds(render, names, arguments)


@st.composite
def mutated_calls(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.one_of(valid_call, noisy_text), min_size=1, max_size=4))
    text = "".join(parts)
    return mutate(draw, text, TOKENS)


def stream(text: str, cuts: list[int]) -> tuple[list[str | ParsedCall], ParseResult]:
    sp = StreamParser(ids())
    events: list[str | ParsedCall] = []
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    for a, b in itertools.pairwise(bounds):
        events += sp.feed(text[a:b])
    events += sp.finish()
    return events, sp.result()


def check(text: str, cuts: list[int]) -> ParseResult:
    expected = parse(text, ids())
    for c in expected.tool_calls:
        assert (c.error is None) == c.ok
        assert json.loads(c.arguments_json()) == c.arguments
        assert c.ok or (c.arguments == {} and c.error)
    for chunking in (cuts, list(range(1, len(text)))):  # random cuts, then 1-char chunks
        events, result = stream(text, chunking)
        assert result == expected
        shown = [e for e in events if isinstance(e, str)]
        assert all(shown) and all("<tool_call>" not in s for s in shown)
        assert "".join(shown).strip() == expected.content
        assert [e for e in events if isinstance(e, ParsedCall)] == expected.tool_calls
    return expected


@settings(max_examples=4000, **SETTINGS)  # type: ignore[arg-type]
@given(noisy_text, cut_lists)
def test_noisy_text(text: str, cuts: list[int]) -> None:
    check(text, cuts)


@settings(max_examples=4000, **SETTINGS)  # type: ignore[arg-type]
@given(mutated_calls(), cut_lists)
def test_mutated_calls(text: str, cuts: list[int]) -> None:
    check(text, cuts)


@settings(max_examples=2500, **SETTINGS)  # type: ignore[arg-type]
@given(
    st.lists(st.tuples(names, arguments), max_size=3),
    st.lists(st.text(max_size=10).filter(lambda s: "<tool_call>" not in s), min_size=4, max_size=4),
    cut_lists,
)
def test_valid_calls_roundtrip(
    calls: list[tuple[str, dict[str, Any]]], texts: list[str], cuts: list[int]
) -> None:
    text = texts[0] + "".join(render(n, a) + t for (n, a), t in zip(calls, texts[1:], strict=False))
    result = check(text, cuts)
    assert [(c.name, c.arguments, c.error) for c in result.tool_calls] == [(n, a, None) for n, a in calls]
    assert result.content == (texts[0] + "".join(texts[1 : len(calls) + 1])).strip()

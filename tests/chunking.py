"""Helpers of the parser tests: deterministic ids, feeding a parser in chunks, event checks, and the
hypothesis pieces the fuzz tests share (cut points, random edits of a text)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from hypothesis import strategies as st

from qwenrun.events import CallDelta, ParsedCall, Reasoning


class Incremental(Protocol):
    def feed(self, chunk: str) -> list[Any]: ...

    def finish(self) -> list[Any]: ...


def ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"id{next(counter)}"


cut_lists = st.lists(st.integers(0, 10_000), max_size=12)  # where a text is cut into chunks


def mutate(draw: st.DrawFn, text: str, tokens: list[str]) -> str:
    """``text`` after up to 4 random edits: one of ``tokens`` inserted, 1-6 characters deleted, or
    the rest cut off."""
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "truncate"]))
        if kind == "insert":
            text = text[:at] + draw(st.sampled_from(tokens)) + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 6)) :]
        else:
            text = text[:at]
    return text


def bounds(text: str, cuts: Iterable[int]) -> list[tuple[int, int]]:
    points = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    return list(itertools.pairwise(points))


def feed_cuts(parser: Incremental, text: str, cuts: Iterable[int]) -> list[Any]:
    events: list[Any] = []
    for a, b in bounds(text, cuts):
        events += parser.feed(text[a:b])
    return events + parser.finish()


def feed_sized(parser: Incremental, text: str, size: int) -> list[Any]:
    return feed_cuts(parser, text, range(size, len(text), size))


def check_events(
    events: list[Any], content: str, calls: list[ParsedCall], reasoning: str | None = None
) -> None:
    """The events add up to the result: answer text (no tag), reasoning, calls, argument deltas."""
    shown = [e for e in events if isinstance(e, str)]
    assert all(shown) and all("<tool_call>" not in s for s in shown)
    assert "".join(shown).strip() == content
    assert [e for e in events if isinstance(e, ParsedCall)] == calls
    if reasoning is not None:
        assert "".join(e.text for e in events if isinstance(e, Reasoning)) == reasoning
    deltas = [e for e in events if isinstance(e, CallDelta)]
    by_id = {call.id: call for call in calls}
    for delta in deltas:  # each delta belongs to a call completed later, at its index
        assert delta.id in by_id and calls.index(by_id[delta.id]) == delta.index
        assert events.index(delta) < events.index(by_id[delta.id])
    for index, call in enumerate(calls):
        mine = [d for d in deltas if d.index == index]
        if mine:
            assert mine[0].name == call.name and all(d.name is None for d in mine[1:])
            assert all(d.arguments for d in mine)
        if call.ok:
            assert mine, f"call {index} streamed nothing"
            assert "".join(d.arguments for d in mine) == call.arguments_json()
            assert json.loads(call.arguments_json()) == call.arguments
        else:
            assert call.arguments == {} and call.error

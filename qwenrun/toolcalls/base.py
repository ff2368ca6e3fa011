"""What every tool-call parser of :mod:`qwenrun.toolcalls` shares: its events and its protocol.

A parser reads one model output, fed in chunks of any size, and returns events as soon as they
are certain, in the words of :mod:`qwenrun.events`: ``str`` is answer text safe to show (never part
of a tag), :class:`~qwenrun.events.CallDelta` a piece of a call still being written (for streaming
``tool_calls`` to OpenAI clients), and :class:`~qwenrun.events.ParsedCall` a call just completed
(the one that runs). ``result()`` after ``finish()`` is the :class:`ParseResult` of the one-shot
parse of the whole text, whatever the chunking. Call ids come from an :data:`IdFactory`
(:func:`new_call_id` unless a test gives its own).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from qwenrun.events import CallDelta, ParsedCall

__all__ = ["CallEvent", "IdFactory", "ParseResult", "ParserFactory", "ToolCallParser", "new_call_id"]

IdFactory: TypeAlias = Callable[[], str]


def new_call_id() -> str:
    """A fresh OpenAI-style call id: ``call_`` + 24 hex chars."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True, slots=True)
class ParseResult:
    """A whole output read: the answer text and the calls, in order."""

    content: str  # all text outside tool-call blocks, concatenated, stripped
    tool_calls: list[ParsedCall]

    @property
    def malformed(self) -> list[ParsedCall]:
        return [c for c in self.tool_calls if c.error is not None]


CallEvent: TypeAlias = str | CallDelta | ParsedCall


class ToolCallParser(Protocol):
    """One model output (one completion) read incrementally. Never raises on any text;
    ``feed`` after ``finish`` is a RuntimeError (a programming error)."""

    def feed(self, chunk: str) -> list[CallEvent]: ...

    def finish(self) -> list[CallEvent]: ...

    def result(self) -> ParseResult: ...


class ParserFactory(Protocol):
    """A parser class: ``tools`` are the request's OpenAI tools (for typed arguments). Bare JSON
    calls are read over any format (:mod:`qwenrun.toolcalls.lenient`)."""

    def __call__(
        self, tools: Sequence[dict[str, Any]] | None = None, new_id: IdFactory = ...
    ) -> ToolCallParser: ...

"""What every tool-call parser of :mod:`qwenrun.toolcalls` shares: its events and its protocol.

A parser reads one model output, fed in chunks of any size, and returns events as soon as they
are certain: ``str`` is answer text safe to show (never part of a tag), :class:`ToolCallDelta` a
piece of a call still being written (for streaming ``tool_calls`` to OpenAI clients), and
:class:`~qwenrun.toolcalls.hermes.ToolCall` a call just completed (the one that runs). ``result()`` after
``finish()`` equals the one-shot parse of the whole text, whatever the chunking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from qwenrun.toolcalls.hermes import IdFactory, ParseResult, ToolCall

__all__ = ["CallEvent", "ParserFactory", "ToolCallDelta", "ToolCallParser"]


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of tool call number ``index`` (0-based, in order of the output) while it is written.

    ``name`` is set on the first delta of a call and None on the others; the ``arguments``
    fragments of one call, concatenated, are exactly ``ToolCall.arguments_json()`` of the call
    that completes it, when that call is well-formed. A call that ends malformed (``error`` set)
    may have sent fragments that do not add up: the completed :class:`ToolCall` decides.
    """

    index: int
    id: str
    name: str | None
    arguments: str


CallEvent: TypeAlias = str | ToolCallDelta | ToolCall


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

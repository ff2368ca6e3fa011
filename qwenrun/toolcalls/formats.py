"""The tool-call formats qwenrun reads, by name, and how to tell a model's format from its template.

``hermes`` (Qwen2.5, Qwen3, QwQ: ``<tool_call>{"name": …, "arguments": …}</tool_call>``) is
:mod:`qwenrun.toolcalls.hermes`, behind the common :class:`~qwenrun.toolcalls.base.ToolCallParser`
shape; ``qwen3_coder`` (Qwen3-Coder and later Qwen models: ``<function=…>``/``<parameter=…>``) is
:mod:`qwenrun.toolcalls.qwen3_coder`. A new format is one module plus one line in ``PARSERS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from qwenrun.events import CallDelta, ParsedCall
from qwenrun.toolcalls import hermes
from qwenrun.toolcalls.base import (
    CallEvent,
    IdFactory,
    ParseResult,
    ParserFactory,
    ToolCallParser,
    new_call_id,
)
from qwenrun.toolcalls.lenient import LenientParser
from qwenrun.toolcalls.qwen3_coder import Qwen3CoderParser

__all__ = ["AUTO", "PARSERS", "HermesParser", "detect_format", "new_parser", "resolve_format"]

AUTO = "auto"


class HermesParser:
    """:class:`qwenrun.toolcalls.hermes.StreamParser` with the common events: each well-formed call is
    preceded by one :class:`CallDelta` holding its whole arguments (a Hermes call is typed
    JSON, read once complete). ``tools`` are unused: a Hermes call is typed JSON."""

    def __init__(
        self, tools: Sequence[dict[str, Any]] | None = None, new_id: IdFactory = new_call_id
    ) -> None:
        self._parser = hermes.StreamParser(new_id)
        self._count = 0

    def feed(self, chunk: str) -> list[CallEvent]:
        return self._with_deltas(self._parser.feed(chunk))

    def finish(self) -> list[CallEvent]:
        return self._with_deltas(self._parser.finish())

    def result(self) -> ParseResult:
        return self._parser.result()

    def _with_deltas(self, events: list[str | ParsedCall]) -> list[CallEvent]:
        for event in events:
            if not isinstance(event, str):
                break
        else:  # text only: the hot path
            return cast(list[CallEvent], events)
        out: list[CallEvent] = []
        for event in events:
            if isinstance(event, ParsedCall):
                if event.ok:
                    out.append(CallDelta(self._count, event.id, event.name, event.arguments_json()))
                self._count += 1
            out.append(event)
        return out


PARSERS: dict[str, ParserFactory] = {"hermes": HermesParser, "qwen3_coder": Qwen3CoderParser}
"""Format name -> parser class."""


def detect_format(chat_template: str | None) -> str:
    """The tool-call format a chat template teaches: ``qwen3_coder`` when it renders calls as
    ``<function=NAME>`` / ``<parameter=NAME>`` (Qwen3-Coder, Qwen3.5+), else ``hermes``."""
    template = chat_template or ""
    return "qwen3_coder" if "<function=" in template or "<parameter=" in template else "hermes"


def resolve_format(requested: str, chat_template: str | None = None) -> str:
    """``requested`` itself, or for ``auto`` the format of ``chat_template``. An unknown name is a
    ValueError naming the known ones."""
    if requested == AUTO:
        return detect_format(chat_template)
    if requested not in PARSERS:
        known = ", ".join([AUTO, *PARSERS])
        raise ValueError(f"unknown tool-call format {requested!r}; known: {known}")
    return requested


def new_parser(
    format: str,
    tools: Sequence[dict[str, Any]] | None = None,
    new_id: IdFactory = new_call_id,
    *,
    lenient: bool = False,
) -> ToolCallParser:
    """A fresh parser of ``format`` (a name in ``PARSERS``) for one model output; ``lenient``: one
    that also reads an answer of bare JSON calls of ``tools`` (:mod:`qwenrun.toolcalls.lenient`)."""
    parser = PARSERS[resolve_format(format)](tools, new_id)
    if not lenient:
        return parser
    names = [str(tool.get("function", tool).get("name")) for tool in tools or ()]
    return LenientParser(parser, names, new_id)

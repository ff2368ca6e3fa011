"""The engine protocol: what the agent loop and the front ends need from an inference engine.

An engine renders an OpenAI-style conversation (chat template, tools) and streams the assistant's
text as :class:`Delta` objects. Everything one model call needs travels in one :class:`Request`,
so a new option is one field here rather than a keyword copied into every implementation.
``tool_choice`` ``required`` or a tool name asks the engine to force a call: the in-process vLLM
engine does it with a prefilled ``<tool_call>`` and a structured-output grammar, a remote endpoint
with its own ``tool_choice``. :func:`create_engine` builds the engine ``engine.kind`` names.
:class:`OutputReader` turns the deltas into text and tool calls, the same way for the agent loop
and the OpenAI server's pass-through.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from qwenrun.engines import ENGINES
from qwenrun.errors import ConfigError
from qwenrun.hermes import ParseResult, StreamParser, ToolCall

if TYPE_CHECKING:
    from qwenrun.config import AgentSpec, SamplingSpec

__all__ = ["Constraint", "Delta", "Engine", "Health", "OutputReader", "Request", "create_engine"]

Health = Literal["stopped", "ready", "dead"]
"""``stopped``: not started (or shut down); ``ready``: serving; ``dead``: failed, only a restart helps."""


@dataclass(frozen=True, slots=True)
class Constraint:
    """A structured-output constraint of one model call (exactly one field set)."""

    regex: str | None = None
    json: dict[str, Any] | None = None
    grammar: str | None = None
    choice: list[str] | None = None

    def __post_init__(self) -> None:
        given = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        if len(given) != 1:
            raise ValueError(f"Constraint needs exactly one of regex, json, grammar, choice; got {given}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One model call."""

    messages: Sequence[dict[str, Any]]
    """The conversation, OpenAI style (system prompt included)."""
    tools: Sequence[dict[str, Any]] | None = None
    """OpenAI ``tools`` the chat template renders (None: no tools in the prompt)."""
    tool_choice: str = "auto"
    """``auto``, ``none``, ``required`` or the name of the tool the model must call."""
    sampling: SamplingSpec | None = None
    """The agent's sampling parameters (None: the engine's spec)."""
    overrides: Mapping[str, Any] = field(default_factory=dict)
    """Per-request sampling parameters over ``sampling`` (a None value means "not given")."""
    constraint: Constraint | None = None
    """A structured-output constraint on the answer (overrides a forced call's own)."""
    prefill: str = ""
    """Text the answer must start with (in-process engines only)."""
    request_id: str | None = None
    incremental: bool = True
    """False: the caller needs only the whole text; an engine may send it as one delta at the end."""


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 3x as much, once per streamed token
class Delta:
    """A piece of a streamed answer (treat it as read-only)."""

    text: str
    """New text since the previous delta (the first starts with the request's prefill, if any);
    special tokens kept, end-of-turn tokens removed."""
    finish_reason: str | None = None
    """None while running; "stop", "length" or "abort" on the last delta."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Cumulative count so far."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Calls an engine received already parsed (a remote endpoint's ``tool_calls``)."""


@runtime_checkable
class Engine(Protocol):
    """What the agent loop and the front ends need from an inference engine."""

    model_name: str

    async def start(self) -> None:
        """Start (or connect); idempotent. Raises :class:`~qwenrun.errors.EngineError`."""
        ...

    def generate(self, request: Request) -> AsyncIterator[Delta]:
        """Stream the answer to ``request``; the last delta has a ``finish_reason``. Closing the
        iterator early aborts the request. Raises :class:`~qwenrun.errors.EngineError` (or its
        :class:`~qwenrun.errors.RequestError` for a request the engine refuses)."""
        ...

    def health(self) -> Health: ...

    async def shutdown(self) -> None:
        """Stop and free everything (idempotent)."""
        ...


class OutputReader:
    """Reads one model call's deltas with a tool-call parser: ``feed`` each delta and get the text
    safe to show and the calls as they close, then ``finish``; ``result`` has the whole answer.
    Calls an engine received already parsed are added as they come. Keeps the token counts and
    the finish reason of the last delta."""

    __slots__ = ("_engine_calls", "completion_tokens", "finish_reason", "parser", "prompt_tokens")

    def __init__(self, parser: StreamParser) -> None:
        self.parser = parser
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._engine_calls: list[ToolCall] = []

    def feed(self, delta: Delta) -> list[str | ToolCall]:
        self.prompt_tokens, self.completion_tokens = delta.prompt_tokens, delta.completion_tokens
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        items = self.parser.feed(delta.text) if delta.text else []
        if delta.tool_calls:
            self._engine_calls.extend(delta.tool_calls)
            items = [*items, *delta.tool_calls]
        return items

    def finish(self) -> list[str | ToolCall]:
        return self.parser.finish()

    def result(self) -> ParseResult:
        parsed = self.parser.result()
        if not self._engine_calls:
            return parsed
        return ParseResult(parsed.content, [*parsed.tool_calls, *self._engine_calls])


def create_engine(spec: AgentSpec) -> Engine:
    """The engine ``spec.engine.kind`` names (its module is imported now)."""
    kind = spec.engine.kind
    row = ENGINES.get(kind)
    if row is None:  # the config's union and the table disagree: a programming error
        raise ConfigError(f"{spec.source}: engine.kind: no engine backend {kind!r}")
    module, _, name = row.target.partition(":")
    engine: Engine = getattr(importlib.import_module(module), name)(spec)
    return engine

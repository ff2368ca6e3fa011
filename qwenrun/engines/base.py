"""The engine protocol: what the agent loop and the front ends need from an inference engine.

An engine renders an OpenAI-style conversation (chat template, tools) and streams the assistant's
text as :class:`Delta` objects. Everything one model call needs travels in one :class:`Request`,
so a new option is one field here rather than a keyword copied into every implementation.
``tool_choice`` ``required`` or a tool name asks the engine to force a call: the in-process vLLM
engine does it with a prefilled ``<tool_call>`` and a structured-output constraint of the model's
tool-call format (after closing a think block), a remote endpoint with its own ``tool_choice``.
:func:`~qwenrun.engines.registry.create_engine` builds the engine ``engine.kind`` names. An engine
tells the format of its model's tool calls (``tool_call_format``) and, on the first delta, whether
the text starts inside a think block; :class:`OutputReader` reads the deltas with the matching
:class:`~qwenrun.toolcalls.OutputParser` into reasoning, text and tool calls, the same way for the
agent loop, the OpenAI server's pass-through and ``qwenrun parse``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from qwenrun.events import CallDelta, ParsedCall, Reasoning
from qwenrun.toolcalls import OutputEvent, OutputParser, ParsedOutput
from qwenrun.toolcalls.output import thinking_calls

if TYPE_CHECKING:
    from qwenrun.sampling import SamplingSpec

__all__ = [
    "Constraint", "Delta", "Engine", "Health", "OutputReader", "Request", "TokenLogprob",
    "wait_until_dead",
]  # fmt: skip

Health = Literal["stopped", "ready", "dead"]
"""``stopped``: not started (or shut down); ``ready``: serving; ``dead``: failed, only a restart helps."""


@dataclass(frozen=True, slots=True)
class Constraint:
    """A structured-output constraint of one model call (exactly one field set). ``structural_tag``
    is an xgrammar structural tag (vLLM's ``structured_outputs.structural_tag``, as a dict)."""

    regex: str | None = None
    json: dict[str, Any] | None = None
    grammar: str | None = None
    choice: list[str] | None = None
    structural_tag: dict[str, Any] | None = None
    json_object: bool | None = None
    """Any JSON object (``response_format: {"type": "json_object"}``); only True is meaningful."""

    def __post_init__(self) -> None:
        given = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        if len(given) != 1:
            names = ", ".join(f.name for f in dataclasses.fields(self))
            raise ValueError(f"Constraint needs exactly one of {names}; got {given}")


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The log probability of one generated token, and of the most likely tokens at its place."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()
    """(token, logprob) of the ``logprobs`` most likely tokens, most likely first."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One model call."""

    messages: Sequence[dict[str, Any]]
    """The conversation, OpenAI style (system prompt included)."""
    tools: Sequence[dict[str, Any]] | None = None
    """OpenAI ``tools`` the chat template renders (None: no tools in the prompt)."""
    tool_choice: str = "auto"
    """``auto``, ``none``, ``required`` or the name of the tool the model must call."""
    parallel_tool_calls: bool = False
    """With ``tool_choice: required``: the forced answer may hold several calls."""
    sampling: SamplingSpec | None = None
    """The agent's sampling parameters (None: the engine's spec)."""
    overrides: Mapping[str, Any] = field(default_factory=dict)
    """Per-request sampling parameters over ``sampling`` (a None value means "not given")."""
    constraint: Constraint | None = None
    """A structured-output constraint on the answer (overrides a forced call's own)."""
    prefill: str = ""
    """Text the answer must start with (in-process engines only)."""
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Extra variables of the chat template, e.g. ``{"enable_thinking": False}``."""
    request_id: str | None = None
    incremental: bool = True
    """False: the caller needs only the whole text; an engine may send it as one delta at the end."""
    logprobs: int | None = None
    """Attach each token's log probability and the ``logprobs`` most likely alternatives (None: none)."""


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
    tool_calls: tuple[ParsedCall, ...] = ()
    """Calls an engine received already parsed (a remote endpoint's ``tool_calls``)."""
    reasoning: str = ""
    """Reasoning an engine received already apart from the text (a remote endpoint's
    ``reasoning`` / ``reasoning_content``)."""
    starts_in_reasoning: bool | None = False
    """Set on the first delta: the prompt ended inside a ``<think>`` block, so the text starts as
    reasoning (Qwen3 Thinking-2507 and QwQ templates); None when the engine cannot tell (a remote
    endpoint's template): then a lone ``</think>`` ends the reasoning (see
    :class:`~qwenrun.toolcalls.ThinkingParser`)."""
    logprobs: list[TokenLogprob] | None = None
    """The new tokens' log probabilities, when ``Request.logprobs`` asked for them."""


@runtime_checkable
class Engine(Protocol):
    """What the agent loop and the front ends need from an inference engine."""

    model_name: str

    @property
    def tool_call_format(self) -> str:
        """The format of the model's tool calls, a name of :data:`qwenrun.toolcalls.PARSERS`
        (``model.tool_call_format``, or for ``auto`` the one of the model's chat template); final
        once the engine has started."""
        ...

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
    """Reads one model call's deltas: ``feed`` each delta and get the events that are certain now
    (answer text as ``str``, :class:`~qwenrun.events.Reasoning`, a
    :class:`~qwenrun.events.CallDelta` while a call is written, a
    :class:`~qwenrun.events.ParsedCall` once complete), then ``finish``; ``result`` has the
    whole answer. The text goes through an :class:`~qwenrun.toolcalls.OutputParser` of ``format``
    with ``tools`` (typed XML values; ``lenient``: bare JSON calls), made at the first delta,
    which tells whether the text starts inside a think block. ``calls=False`` splits the
    reasoning off but reads no tool calls (a request without tools). Reasoning and calls an
    engine received already apart are added as they come. ``calls_in_thinking``: when the answer
    (text and calls) is empty, ``finish`` reads the complete calls of ``tools`` written in the
    reasoning (:func:`~qwenrun.toolcalls.output.thinking_calls`). Keeps the token counts and the
    finish reason of the last delta."""

    __slots__ = ("_calls", "_engine_calls", "_format", "_lenient", "_reasoning", "_recover", "_recovered",
                 "_thinking", "_tools", "completion_tokens", "finish_reason", "parser",
                 "prompt_tokens")  # fmt: skip

    def __init__(
        self,
        format: str = "hermes",
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        lenient: bool = False,
        calls: bool = True,
        thinking: bool = True,
        calls_in_thinking: bool = False,
    ) -> None:
        self._format, self._tools, self._lenient = format, tools, lenient
        self._calls, self._thinking = calls, thinking
        self._recover = calls and thinking and calls_in_thinking and bool(tools)
        self._recovered: list[ParsedCall] = []
        self.parser: OutputParser | None = None
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._engine_calls: list[ParsedCall] = []
        self._reasoning: list[str] = []

    def _start(self, in_reasoning: bool | None) -> OutputParser:
        self.parser = OutputParser(
            self._format, tools=self._tools, lenient=self._lenient, calls=self._calls,
            thinking=self._thinking, start_in_reasoning=in_reasoning,
        )  # fmt: skip
        return self.parser

    def feed(self, delta: Delta) -> list[OutputEvent]:
        self.prompt_tokens, self.completion_tokens = delta.prompt_tokens, delta.completion_tokens
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        parser = self.parser
        if parser is None:  # reasoning sent apart: the endpoint split the think block off the text
            parser = self._start(False if delta.reasoning else delta.starts_in_reasoning)
        items = parser.feed(delta.text) if delta.text else []
        if delta.tool_calls or delta.reasoning:
            if delta.reasoning:
                self._reasoning.append(delta.reasoning)
                items = [Reasoning(delta.reasoning), *items]
            if delta.tool_calls:
                self._engine_calls.extend(delta.tool_calls)
                items = [*items, *delta.tool_calls]
        return items

    def finish(self) -> list[OutputEvent]:
        out = (self.parser or self._start(False)).finish()
        if self._recover:
            parsed = self.result()
            if parsed.reasoning and not parsed.content and not parsed.tool_calls:  # calls made while thinking
                self._recovered = thinking_calls(parsed.reasoning, self._format, tools=self._tools,
                                                 lenient=self._lenient)  # fmt: skip
                for index, call in enumerate(self._recovered):
                    out += [CallDelta(index, call.id, call.name, call.arguments_json()), call]
        return out

    def result(self) -> ParsedOutput:
        parsed = (self.parser or self._start(False)).result()
        if not self._reasoning and not self._engine_calls and not self._recovered:
            return parsed
        received = "".join(self._reasoning).strip()
        reasoning = "\n\n".join(part for part in (received, parsed.reasoning) if part)
        calls = [*parsed.tool_calls, *self._engine_calls, *self._recovered]
        return ParsedOutput(parsed.content, reasoning, calls)


async def wait_until_dead(engine: Engine, interval_s: float = 1.0) -> None:
    """Return once ``engine.health()`` is ``dead`` (polled every ``interval_s``): front ends that
    serve others stop then, so that their supervisor restarts them instead of leaving a dead server."""
    while engine.health() != "dead":
        await asyncio.sleep(interval_s)

"""The one vocabulary: the call and event types that every parser, the agent loop and every front
end speak, each named once.

* What the readers of model output (:mod:`qwenrun.toolcalls`) return: :class:`ParsedCall`, a tool
  call read from the output (well-formed or not), :class:`CallDelta`, a piece of one while it is
  written, and :class:`Reasoning`, a piece of the thinking (answer text is a plain ``str``).
* The events of one agent turn (:data:`Event`), which every front end consumes: :class:`TextDelta`
  (answer text), :class:`Reasoning`, :class:`ToolCall` (a parsed call about to run),
  :class:`ToolResult`, :class:`Usage`, :class:`Repair`, :class:`Notice`, then one :class:`Final`.
  Each says in ``agent`` which agent of a team (``agents:``, :mod:`qwenrun.agent.team`) speaks.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CallDelta", "Event", "Final", "Notice", "ParsedCall", "Reasoning", "Repair", "TextDelta", "ToolCall",
    "ToolResult", "Usage", "to_dict",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class ParsedCall:
    """One tool call read from model output (a Hermes ``<tool_call>`` block, a Qwen3-Coder
    ``<function=...>`` block, bare JSON, an endpoint's ``tool_calls``). ``raw`` is the text it was
    read from exactly as written (not stripped); ``error`` is None when well-formed, else a short
    human reason (the agent repairs it)."""

    id: str
    name: str  # "" if it could not be recovered
    arguments: dict[str, Any]  # {} if not recoverable; always JSON-serialisable
    raw: str
    error: str | None = None
    bare: bool = False  # written as bare JSON, without the tags (``raw`` is that JSON)
    from_thinking: bool = False  # written inside the think block, read as the answer was empty

    @property
    def ok(self) -> bool:
        return self.error is None

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class CallDelta:
    """A piece of tool call number ``index`` (0-based, in order of the output) while it is written.

    ``name`` is set on the first delta of a call and None on the others; the ``arguments``
    fragments of one call, concatenated, are exactly ``ParsedCall.arguments_json()`` of the call
    that completes it, when that call is well-formed. A call that ends malformed (``error`` set)
    may have sent fragments that do not add up: the completed :class:`ParsedCall` decides.
    """

    index: int
    id: str
    name: str | None
    arguments: str


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the model's visible answer, in order."""

    text: str
    agent: str = ""  # the agent that speaks, in a team (agents:); "" for a lone agent
    type: Literal["text"] = "text"


@dataclass(frozen=True, slots=True)
class Reasoning:
    """A piece of the model's reasoning (Qwen3's ``<think>`` block, or a remote endpoint's
    ``reasoning``), in order; it comes before the text and the tool calls of the same model call.
    The readers of model output return it and the loop yields it. Not part of the answer: front
    ends show it apart (dimmed, a collapsed step), the OpenAI server returns it as ``reasoning`` /
    ``reasoning_content``, and the session keeps it on the assistant message as
    ``reasoning_content`` for the chat template (Qwen3's drops it from earlier turns)."""

    text: str
    agent: str = ""  # the agent that speaks, in a team (agents:); "" for a lone agent
    type: Literal["reasoning"] = "reasoning"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The model asked for a tool; the call is about to run (the loop's event of a well-formed
    :class:`ParsedCall`). ``from_thinking``: the model wrote it inside its thinking and answered
    nothing after it (``agent.calls_in_thinking: run``)."""

    id: str
    name: str
    arguments: dict[str, Any]
    from_thinking: bool = False
    agent: str = ""  # the agent that speaks, in a team (agents:); "" for a lone agent
    type: Literal["tool_call"] = "tool_call"


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What a tool returned (``is_error``: the model reads ``Error: ...``)."""

    id: str
    name: str
    content: str
    is_error: bool = False
    duration_s: float = 0.0
    agent: str = ""  # the agent that speaks, in a team (agents:); "" for a lone agent
    type: Literal["tool_result"] = "tool_result"


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts and wall time of one model call (or, inside ``Final``, of the whole turn)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    duration_s: float = 0.0
    model_calls: int = 0
    agent: str = ""  # the agent that speaks, in a team (agents:); "" for a lone agent
    type: Literal["usage"] = "usage"

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.duration_s + other.duration_s,
            self.model_calls + other.model_calls,
        )


@dataclass(frozen=True, slots=True)
class Repair:
    """The model wrote a malformed tool call; it is asked again with a grammar-forced call."""

    reason: str
    agent: str = ""  # the agent that speaks, in a team (agents:); "" for a lone agent
    type: Literal["repair"] = "repair"


@dataclass(frozen=True, slots=True)
class Notice:
    """A warning about the turn that changed nothing the model reads as an error, for the user's
    eyes: the CLI shows it with ``-v``, ``run --json`` prints it, and the session records it.
    ``code`` says what happened; ``extra_arguments``: the arguments ``data`` lists (name and value)
    were dropped from call ``id`` of tool ``name`` before it ran (its schema does not declare them);
    ``handoff``: the conversation goes to agent ``name`` (:mod:`qwenrun.agent.team`)."""

    code: Literal["extra_arguments", "handoff"]
    message: str
    id: str = ""
    name: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    agent: str = ""  # the agent that speaks, in a team (agents:); "" for a lone agent
    type: Literal["notice"] = "notice"


@dataclass(frozen=True, slots=True)
class Final:
    """The end of a turn: the answer text, why the turn stopped, and the turn's total usage."""

    text: str
    stop_reason: Literal["answer", "max_iterations", "length"] = "answer"
    iterations: int = 0
    tool_calls: int = 0
    usage: Usage = field(default_factory=Usage)
    agent: str = ""  # the agent that speaks, in a team (agents:); "" for a lone agent
    output: Any = None
    """The answer read as JSON and validated, when the agent (or the request) has an output schema
    (``agent.output_schema``); ``text`` is then that JSON as the model wrote it."""
    type: Literal["final"] = "final"


Event = TextDelta | Reasoning | ToolCall | ToolResult | Usage | Repair | Notice | Final


def to_dict(event: Event) -> dict[str, Any]:
    """A JSON-ready dict with a ``type`` key (``qwenrun run --json`` prints one per line)."""
    return dataclasses.asdict(event)

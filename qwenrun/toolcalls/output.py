"""One model output -> reasoning, answer text and tool calls: thinking first, then calls.

:class:`OutputParser` is what the agent loop, the OpenAI server and ``qwenrun parse`` run on a
completion: :class:`~qwenrun.toolcalls.thinking.ThinkingParser` splits off the ``<think>`` block
and only the answer text goes on to the tool-call parser of the model's format, so a call written
after ``</think>`` is a call (vLLM #39056, #42021) and one inside the block is not run as it is
written. When the answer after the block is empty, :func:`thinking_calls` recovers the complete
calls of declared tools from the reasoning (``agent.calls_in_thinking``; vLLM #39056 loses them).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from qwenrun.events import CallDelta, ParsedCall, Reasoning
from qwenrun.toolcalls.base import CallEvent, IdFactory, ParseResult, ToolCallParser, new_call_id
from qwenrun.toolcalls.formats import new_parser
from qwenrun.toolcalls.thinking import ThinkingParser

__all__ = ["OutputEvent", "OutputParser", "ParsedOutput", "parse_output", "thinking_calls"]

OutputEvent: TypeAlias = str | Reasoning | CallDelta | ParsedCall


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    content: str  # the answer text, stripped
    reasoning: str  # the thinking, stripped ("" without a <think> block)
    tool_calls: list[ParsedCall]

    @property
    def malformed(self) -> list[ParsedCall]:
        return [call for call in self.tool_calls if call.error is not None]

    @property
    def call_in_reasoning(self) -> bool:
        """The reasoning holds a ``<tool_call>`` tag: a call the model thought of (run only when
        nothing follows the block: :func:`thinking_calls`)."""
        return "<tool_call>" in self.reasoning

    def to_dict(self) -> dict[str, Any]:
        """``{"content", "reasoning", "tool_calls"}`` with OpenAI-style calls (arguments as a JSON
        string); a malformed call also has ``error`` and the ``raw`` text it came from, a call read
        from the thinking ``from_thinking: true``."""
        calls = []
        for call in self.tool_calls:
            item: dict[str, Any] = {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_json()},
            }
            if call.error is not None:
                item.update(error=call.error, raw=call.raw)
            if call.from_thinking:
                item["from_thinking"] = True
            calls.append(item)
        return {"content": self.content, "reasoning": self.reasoning, "tool_calls": calls}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


class _TextOnly:
    """The answer as text: no tool calls are read (a request without tools)."""

    def __init__(self) -> None:
        self._text: list[str] = []

    def feed(self, chunk: str) -> list[CallEvent]:
        if not chunk:
            return []
        self._text.append(chunk)
        return [chunk]

    def finish(self) -> list[CallEvent]:
        return []

    def result(self) -> ParseResult:
        return ParseResult("".join(self._text).strip(), [])


class OutputParser:
    """Incremental parser of one completion. ``format``: a name of ``toolcalls.PARSERS``;
    ``tools``: the request's OpenAI tools; ``lenient``: also read an answer that is bare JSON calls
    of those tools (:mod:`qwenrun.toolcalls.lenient`); ``calls=False`` reads no tool calls;
    ``thinking=False`` reads ``<think>`` as plain text;
    ``start_in_reasoning``: the prompt ended inside ``<think>`` (see ``prompt_opens_thinking``),
    None where nobody can tell (a lone ``</think>`` ends the reasoning: see ``ThinkingParser``)."""

    def __init__(
        self,
        format: str = "hermes",
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        lenient: bool = False,
        calls: bool = True,
        thinking: bool = True,
        start_in_reasoning: bool | None = False,
        new_id: IdFactory = new_call_id,
    ) -> None:
        self._calls: ToolCallParser = (
            new_parser(format, tools, new_id, lenient=lenient) if calls else _TextOnly()
        )
        self._thinking = ThinkingParser(start_in_reasoning=start_in_reasoning) if thinking else None
        self._reasoning = ""
        self._finished = False

    def feed(self, chunk: str) -> list[OutputEvent]:
        thinking = self._thinking
        if thinking is None and not self._finished:  # the answer: the hot path (no cast() call)
            return self._calls.feed(chunk)  # type: ignore[return-value]  # list[CallEvent] is one
        if self._finished:
            raise RuntimeError("OutputParser.feed() called after finish()")
        assert thinking is not None
        out = self._route(thinking.feed(chunk), [])
        if thinking.answering:  # the rest goes straight to the call parser
            self._reasoning, self._thinking = thinking.result().reasoning, None
        return out

    def finish(self) -> list[OutputEvent]:
        if self._finished:
            return []
        self._finished = True
        out: list[OutputEvent] = []
        if self._thinking is not None:
            out = self._route(self._thinking.finish(), out)
            self._reasoning, self._thinking = self._thinking.result().reasoning, None
        out.extend(self._calls.finish())
        return out

    def result(self) -> ParsedOutput:
        """The parse so far; after ``finish()`` equal to ``parse_output(full_text, ...)``."""
        calls = self._calls.result()
        reasoning = self._thinking.result().reasoning if self._thinking is not None else self._reasoning
        return ParsedOutput(calls.content, reasoning, calls.tool_calls)

    def _route(self, events: list[str | Reasoning], out: list[OutputEvent]) -> list[OutputEvent]:
        for event in events:
            if isinstance(event, str):
                found: list[CallEvent] = self._calls.feed(event)
                out.extend(found)
            else:
                out.append(event)
        return out


def parse_output(
    text: str,
    format: str = "hermes",
    *,
    tools: Sequence[dict[str, Any]] | None = None,
    lenient: bool = False,
    thinking: bool = True,
    start_in_reasoning: bool = False,
    new_id: IdFactory = new_call_id,
) -> ParsedOutput:
    """One-shot :class:`OutputParser`. Never raises (but an unknown ``format`` is a ValueError)."""
    parser = OutputParser(
        format, tools=tools, lenient=lenient, thinking=thinking, start_in_reasoning=start_in_reasoning,
        new_id=new_id,
    )  # fmt: skip
    parser.feed(text)
    parser.finish()
    return parser.result()


def thinking_calls(
    reasoning: str,
    format: str = "hermes",
    *,
    tools: Sequence[dict[str, Any]] | None,
    lenient: bool = False,
    new_id: IdFactory = new_call_id,
) -> list[ParsedCall]:
    """The complete calls of the declared ``tools`` written inside the thinking, read as the answer
    of a model call whose answer after ``</think>`` is empty (the model made its calls while
    thinking: vLLM #39056; Qwen3.5 writes them before ``</think>``), marked ``from_thinking``.
    Malformed calls and calls of undeclared tools are left in the reasoning."""
    names = {str(tool.get("function", tool).get("name")) for tool in tools or ()}
    if not names or ("<tool_call>" not in reasoning and not lenient):
        return []
    parser = new_parser(format, tools, new_id, lenient=lenient)
    parser.feed(reasoning)
    parser.finish()
    calls = parser.result().tool_calls
    return [dataclasses.replace(call, from_thinking=True) for call in calls if call.ok and call.name in names]

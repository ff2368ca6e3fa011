"""The pieces of one agent turn that the loop (:mod:`qwenrun.agent.loop`) builds on: what every
model call of a turn gets, what one model call produced, how calls are told apart (name and
canonical arguments, so that a repeat is recognised), and the assistant messages of the history."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from qwenrun import toolcalls
from qwenrun.events import ParsedCall, Reasoning, TextDelta, Usage
from qwenrun.spec.output import OutputSchema
from qwenrun.toolcalls.repeats import Seen
from qwenrun.tools import Tool, declared_only

__all__ = ["Step", "TurnOptions", "assistant_message", "call_key", "seen_calls", "with_reasoning"]


class TurnOptions:
    """What every model call of a turn gets: sampling overrides and chat template variables."""

    __slots__ = ("overrides", "schema", "template")

    def __init__(
        self, overrides: dict[str, Any], template: dict[str, Any], schema: OutputSchema | None = None
    ) -> None:
        self.overrides, self.template, self.schema = overrides, template, schema  # schema: of the answer


class Step:
    """What one model call produced (filled in while streaming); ``seen``: the calls it must not repeat."""

    def __init__(self, seen: Seen | None = None) -> None:
        self.seen, self.repeated = seen, False  # repeated: it stopped at a call of ``seen``
        self.structured = False  # generated under the turn's output schema
        self.text = ""
        self.reasoning = ""
        self.done = False
        self.finish_reason: str | None = None
        self.usage = Usage()
        self.result = toolcalls.ParsedOutput("", "", [])

    def take(self, items: Sequence[toolcalls.OutputEvent]) -> list[TextDelta | Reasoning]:
        """Add the answer text and the reasoning of ``items`` (a model call's) to the step; they
        are returned as the turn's events (calls are read from the whole output at its end)."""
        events: list[TextDelta | Reasoning] = []
        for item in items:
            if isinstance(item, str):
                self.text += item
                events.append(TextDelta(item))
            elif isinstance(item, Reasoning):
                self.reasoning += item.text
                events.append(item)
        return events


def call_key(call: ParsedCall) -> tuple[str, str]:
    return call.name, json.dumps(call.arguments, sort_keys=True, ensure_ascii=False)


def seen_calls(done: set[tuple[str, str]], tools: Mapping[str, Tool]) -> Seen:
    """Whether a call as written is one of ``done`` (its arguments undeclared by ``tools`` dropped)."""
    return lambda name, args: call_key(declared_only(tools, ParsedCall("", name, args, ""))[0]) in done


def with_reasoning(message: dict[str, Any], reasoning: str) -> dict[str, Any]:
    """``message`` with the model call's reasoning as ``reasoning_content`` (what Qwen3's chat
    template reads: it keeps it for the current tool loop and drops it from earlier turns)."""
    reasoning = reasoning.strip()
    return {**message, "reasoning_content": reasoning} if reasoning else message


def assistant_message(content: str, calls: Sequence[ParsedCall]) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_json()},
            }
            for call in calls
        ],
    }

"""The pieces of one agent turn that the loop (:mod:`qwenrun.agent.loop`) builds on: what every
model call of a turn gets, what one model call produced, how calls are told apart (name and
canonical arguments, so that a repeat is recognised), and the assistant messages of the history."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from qwenrun import toolcalls
from qwenrun.approval import Approver, review
from qwenrun.events import ParsedCall, ToolCall, ToolResult, Usage
from qwenrun.permissions import Verdict
from qwenrun.spec.output import OutputSchema
from qwenrun.toolcalls.repeats import Seen
from qwenrun.tools import Tool, declared_only

__all__ = [
    "Step", "TurnOptions", "assistant_message", "call_key", "run_calls", "seen_calls", "with_reasoning",
]  # fmt: skip


class TurnOptions:
    """What every model call of a turn gets: sampling overrides and chat template variables; and
    the schema of the turn's answer (``agent.output_schema`` or the request's; None: free text)."""

    __slots__ = ("overrides", "schema", "template")

    def __init__(
        self, overrides: dict[str, Any], template: dict[str, Any], schema: OutputSchema | None = None
    ) -> None:
        self.overrides, self.template, self.schema = overrides, template, schema


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


async def run_calls(
    calls: list[ParsedCall],
    shown: list[ToolCall],
    tools: Mapping[str, Tool],
    approver: Approver | None,
    run: Callable[[ParsedCall], Awaitable[ToolResult]],
    verdict: Callable[[ToolCall], Verdict],
    record: Callable[[dict[str, Any]], None],
) -> list[ToolResult]:
    """Ask the approver about each call that needs it (one at a time, in order), then ``run`` the
    approved calls in parallel; a refused call's result says why it did not run. ``verdict`` decides
    each call (permission rules, else the tool's ``approval``); what a rule decided is ``record``-ed.
    Identical calls (name and arguments) are asked about and run once: each of their ids gets the result."""
    keys = [call_key(call) for call in calls]
    first = [keys.index(key) for key in keys]  # the index of each call's first identical one
    results: list[ToolResult | None] = [None] * len(calls)
    for index, event in enumerate(shown):
        tool = tools.get(event.name)
        if tool is None or first[index] != index:
            continue
        decided = verdict(event)
        if decided.rule is not None:  # the session records what a rule decided
            record({"type": "permission", "id": event.id, "name": event.name, **decided.record()})
        if decided.mode != "auto":
            results[index] = await review(event, decided.mode, tool.origin, approver, decided.reason())
    runnable = [index for index, result in enumerate(results) if result is None and first[index] == index]
    if len(runnable) == 1:  # no gather task: under load each task hop is a loop iteration
        results[runnable[0]] = await run(calls[runnable[0]])
    elif runnable:
        ran = await asyncio.gather(*(run(calls[index]) for index in runnable))
        for index, result in zip(runnable, ran, strict=True):
            results[index] = result
    return [dataclasses.replace(got, id=call.id) for call, index in zip(calls, first, strict=True)
            if (got := results[index]) is not None]  # fmt: skip

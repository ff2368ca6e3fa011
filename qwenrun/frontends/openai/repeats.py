"""Pass-through mode: a call that the request's messages already hold with its result, written again.

Where the client runs the tool loop (the OpenAI Agents SDK with a function tool, a loop of one's
own), a small model given a tool's result often writes the same call again, and stray JSON after
it, instead of answering: returned as it is, that text became the client's final answer.
:class:`RepeatedCalls` stands between the engine and the chat route's reader. It reads the output
with a :class:`~qwenrun.toolcalls.repeats.RepeatWatch` and stops the generation as soon as the
output holds a complete call of this turn (after the last user message) whose result the messages
hold; unless a new call came before it (then those calls are the answer), the model is asked for
its answer with the tools off, as the agent loop does (the same transient note), and that answer's
deltas follow, read as text, with the token counts of both generations. While it watches, calls are
returned whole rather than argument by argument, since each may turn out to be the repeat.
``frontend.answer_repeated_calls: false`` (or ``tool_choice`` other than ``auto``, or ``logprobs``)
turns it off: the engine's deltas and the reader's events pass unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from qwenrun.agent.loop import ANSWER_NOTE
from qwenrun.engines.base import Delta, Engine, OutputReader, Request
from qwenrun.events import CallDelta, ParsedCall
from qwenrun.toolcalls import OutputEvent
from qwenrun.toolcalls.repeats import RepeatWatch

__all__ = ["RepeatedCalls", "answered_calls"]


class RepeatedCalls:
    """One pass-through generation with ``reader``: :meth:`generate` the deltas, :meth:`read`
    each one, :meth:`finish` at the end (in place of the engine's ``generate`` and the reader's
    ``feed`` and ``finish``). ``messages``: the request's (none: nothing is watched)."""

    def __init__(self, reader: OutputReader, messages: Sequence[dict[str, Any]]) -> None:
        answered = answered_calls(messages)
        self.reader = reader  # the first generation's; after a repeat, the answer's
        self.watch = RepeatWatch(lambda name, args: _key(name, args) in answered) if answered else None
        self.answering = False
        self._returned = 0  # well-formed calls returned before the repeat

    @property
    def stopped(self) -> bool:
        """The output held a repeat: the generation was stopped there."""
        return self.watch is not None and self.watch.call is not None

    async def generate(self, engine: Engine, request: Request) -> AsyncIterator[Delta]:
        """``engine.generate(request)`` until a repeat; then, without a new call before it, the
        deltas of the answer with the tools off (their token counts after the first's)."""
        stream = engine.generate(request)
        try:
            async for delta in stream:
                yield delta
                if self.stopped:
                    break
        finally:  # closing the engine's stream aborts the generation
            await _close(stream)
        if not self.stopped or self._returned:
            return
        prompt, completion = self.reader.prompt_tokens, self.reader.completion_tokens
        self.reader, self.answering = OutputReader(engine.tool_call_format, calls=False), True
        notes = [*request.messages, {"role": "system", "content": ANSWER_NOTE}]
        rid = f"{request.request_id or 'qwenrun'}-answer"
        answer = dataclasses.replace(request, messages=notes, tools=None, tool_choice="none", request_id=rid)
        stream = engine.generate(answer)
        try:
            async for delta in stream:
                yield dataclasses.replace(delta, prompt_tokens=prompt + delta.prompt_tokens,
                                          completion_tokens=completion + delta.completion_tokens)  # fmt: skip
        finally:
            await _close(stream)

    def read(self, delta: Delta) -> list[OutputEvent]:
        """The events of ``delta`` to return now: none from the repeat on."""
        items = self.reader.feed(delta)
        if self.watch is None or self.answering:
            return items
        if self.watch.read(delta.text, items, bool(delta.starts_in_reasoning)):
            return []
        items = [item for item in items if not isinstance(item, CallDelta)]
        self._returned += sum(1 for item in items if isinstance(item, ParsedCall) and item.ok)
        return items

    def finish(self) -> list[OutputEvent]:
        """The reader's last events (none of the first generation's once it held a repeat)."""
        return [] if self.stopped and not self.answering else self.reader.finish()


def answered_calls(messages: Sequence[dict[str, Any]]) -> set[tuple[str, str]]:
    """The calls (name, canonical JSON arguments) of this turn (after the last user message) whose
    result the messages hold."""
    last_user = max((i for i, message in enumerate(messages) if message.get("role") == "user"), default=-1)
    turn = messages[last_user + 1 :]
    results = {message.get("tool_call_id") for message in turn if message.get("role") == "tool"}
    answered = set()
    for message in turn:
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        for call in calls or ():
            function = call.get("function") or {}
            try:
                arguments = json.loads(function.get("arguments") or "{}")
            except ValueError:
                continue
            if call.get("id") in results and isinstance(function.get("name"), str):
                answered.add(_key(function["name"], arguments))
    return answered


def _key(name: str, arguments: Any) -> tuple[str, str]:
    return name, json.dumps(arguments, sort_keys=True, ensure_ascii=False)


async def _close(stream: AsyncIterator[Delta]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()

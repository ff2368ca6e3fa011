"""Pass-through mode: a call that the request's messages already hold with its result, written again.

Where the client runs the tool loop (the OpenAI Agents SDK with a function tool, a loop of one's
own), a small model given a tool's result often writes the same call again, and stray JSON after
it, instead of answering: returned as it is, that text became the client's final answer.
:class:`RepeatedCalls` wraps the route's :class:`~qwenrun.agent.model_call.ModelCall`, which reads
the output with a :class:`~qwenrun.toolcalls.repeats.RepeatWatch` and stops the generation as soon as the
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
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any

from qwenrun.agent.model_call import ModelCall, answer_request
from qwenrun.engines.base import Delta
from qwenrun.events import CallDelta, ParsedCall
from qwenrun.toolcalls import OutputEvent
from qwenrun.toolcalls.repeats import Seen

__all__ = ["RepeatedCalls", "answered_seen"]


class RepeatedCalls:
    """One pass-through model call: :meth:`deltas` gives each delta with its events to return,
    :meth:`finish` the last events (in place of the call's own). ``call`` watches the calls
    of the request's messages (:func:`answered_seen`; without ``seen``: nothing is watched)."""

    def __init__(self, call: ModelCall) -> None:
        self.call = call  # the first generation's; after a repeat, the answer's
        self.answering = False
        self._returned = 0  # well-formed calls returned before the repeat

    async def deltas(self) -> AsyncGenerator[tuple[Delta, list[OutputEvent]], None]:
        """The call's deltas until a repeat (that one with no events); then, without a new call
        before it, the deltas of the answer with the tools off (their token counts after the first's)."""
        first = self.call
        async with aclosing(first.deltas()) as deltas:
            async for delta, items in deltas:
                if first.watch is None:
                    yield delta, items
                elif first.repeated:
                    yield delta, []
                else:
                    items = [item for item in items if not isinstance(item, CallDelta)]
                    self._returned += sum(1 for item in items if isinstance(item, ParsedCall) and item.ok)
                    yield delta, items
        if not first.repeated or self._returned:
            return
        prompt, completion = first.reader.prompt_tokens, first.reader.completion_tokens
        self.call, self.answering = ModelCall(first.engine, answer_request(first.request), calls=False), True
        async with aclosing(self.call.deltas()) as deltas:
            async for delta, items in deltas:
                total = completion + delta.completion_tokens
                yield dataclasses.replace(delta, prompt_tokens=prompt + delta.prompt_tokens,
                                          completion_tokens=total), items  # fmt: skip

    def finish(self) -> list[OutputEvent]:
        """The call's last events (none of the first generation's once it held a repeat)."""
        return [] if self.call.repeated and not self.answering else self.call.finish()


def answered_seen(messages: Sequence[dict[str, Any]]) -> Seen | None:
    """Whether a call is one of :func:`answered_calls` (None: the messages answered none)."""
    answered = answered_calls(messages)
    return (lambda name, args: _key(name, args) in answered) if answered else None


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

"""One model call: the path that the agent loop and the OpenAI server's pass-through mode share.

The engine renders the request (messages and tools, through the chat template) and generates; its
deltas are read in the engine's tool-call format (:class:`~qwenrun.engines.base.OutputReader`:
answer text, :class:`~qwenrun.events.Reasoning`, :class:`~qwenrun.events.CallDelta` and
:class:`~qwenrun.events.ParsedCall`, the words of :mod:`qwenrun.events`); a complete call that the
caller's ``seen`` knows stops the generation (:class:`~qwenrun.toolcalls.repeats.RepeatWatch`), and
the end gives the call's :class:`~qwenrun.events.Usage`. What comes next is the caller's: a
malformed call is repaired by a call forced to its intended tool (:meth:`ModelCall.repair`), a
repeated one answered by a call with the tools off and :data:`ANSWER_NOTE` (:func:`answer_request`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping

from qwenrun.engines.base import Delta, Engine, OutputReader, Request
from qwenrun.events import Repair, Usage
from qwenrun.toolcalls import OutputEvent, ParsedOutput, hermes
from qwenrun.toolcalls.repeats import RepeatWatch, Seen

__all__ = ["ANSWER_NOTE", "ModelCall", "answer_request"]

# Sent (not recorded) with the tools off when the model repeats a call it already made this turn:
# small models copy the call again instead of answering from its result.
ANSWER_NOTE = (
    "Answer the user's question now from the tool results above, in plain language, without calling a tool."
)


class ModelCall:
    """One generation of ``request`` by ``engine``: iterate :meth:`deltas`, then :meth:`finish`;
    :attr:`usage` and :meth:`result` tell what it produced. ``calls``: read tool calls (else only
    the reasoning is split off); ``lenient`` (bare JSON calls) and ``calls_in_thinking`` apply when
    the request has tools; ``seen``: the calls whose repeat stops the generation (:attr:`repeated`)."""

    def __init__(
        self,
        engine: Engine,
        request: Request,
        *,
        calls: bool = True,
        lenient: bool = False,
        calls_in_thinking: bool = False,
        seen: Seen | None = None,
    ) -> None:
        tools = request.tools
        self.engine, self.request = engine, request
        lenient = lenient and tools is not None
        self.reader = OutputReader(engine.tool_call_format, tools=tools, lenient=lenient, calls=calls,
                                   calls_in_thinking=calls_in_thinking)  # fmt: skip
        self.watch = RepeatWatch(seen) if seen is not None and tools is not None else None
        self.usage = Usage()
        self._started = 0.0

    @property
    def repeated(self) -> bool:
        """The output wrote again a call of ``seen``: the generation stopped there."""
        return self.watch is not None and self.watch.call is not None

    async def deltas(self) -> AsyncGenerator[tuple[Delta, list[OutputEvent]], None]:
        """The engine's deltas, each with the events it makes certain; the delta that completes a
        repeated call is the last (:attr:`repeated` is set when it comes). The engine's stream is
        closed at the end, or as soon as the consumer stops: that aborts the generation."""
        self._started = time.perf_counter()
        stream = self.engine.generate(self.request)
        try:
            async for delta in stream:
                items = self.reader.feed(delta)
                if self.watch is not None:
                    self.watch.read(delta.text, items, bool(delta.starts_in_reasoning))
                yield delta, items
                if self.repeated:
                    break
        finally:
            await close(stream)

    def finish(self) -> list[OutputEvent]:
        """The events the end of the output makes certain; sets :attr:`usage`."""
        items, reader = self.reader.finish(), self.reader
        elapsed = time.perf_counter() - self._started
        self.usage = Usage(reader.prompt_tokens, reader.completion_tokens, elapsed, 1)
        return items

    @property
    def finish_reason(self) -> str | None:
        return self.reader.finish_reason

    def result(self) -> ParsedOutput:
        return self.reader.result()

    def repair(self, tools: Mapping[str, object]) -> tuple[str, Repair] | None:
        """For an output with a malformed call (and an agent with ``tools``): the ``tool_choice``
        of the call that repairs it (the tool it meant) and the :class:`Repair` event saying so."""
        bad = self.result().malformed
        if not bad or not tools:
            return None
        choice = hermes.intended_tool(bad[0], tools)
        return choice, Repair(f"malformed tool call ({bad[0].error}); retrying with a forced {choice} call")


def answer_request(request: Request) -> Request:
    """``request`` asking for the answer with the tools off, :data:`ANSWER_NOTE` after its messages
    (after a repeated call)."""
    rid = f"{request.request_id}-answer" if request.request_id else None
    messages = [*request.messages, {"role": "system", "content": ANSWER_NOTE}]
    return dataclasses.replace(request, messages=messages, tools=None, tool_choice="none", request_id=rid)


async def close(stream: AsyncIterator[Delta]) -> None:
    """Close an engine's stream (an async generator: closing it aborts the generation)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()

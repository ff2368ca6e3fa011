"""How one turn of the agent looks in the Chainlit front end: :func:`answer` runs a turn and shows
its events in a :class:`TurnView` (streamed messages, a collapsed reasoning step, a step per tool
call). Takes Chainlit's module as an argument, so it imports nothing of Chainlit itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

from qwenrun.agent import Session
from qwenrun.events import Event, Final, Reasoning, Repair, TextDelta, ToolCall, ToolResult, Usage

__all__ = ["REASONING_STEP", "TurnView", "answer", "now"]

REASONING_STEP = "Reasoning"  # the name of the step the model's thinking streams into

log = logging.getLogger("qwenrun.frontends.chainlit.app")


async def answer(session: Session, prompt: str, view: TurnView) -> None:
    """Run one turn of ``session`` and show its events in ``view``.

    A failure (engine down, a bug) becomes an error message in the chat; cancellation (the stop
    button) closes what is open and propagates. Either way the session stays usable.
    """
    try:
        events = session.stream(prompt)
        async with contextlib.aclosing(events):
            async for event in events:
                await view.show(event)
    except asyncio.CancelledError:
        await view.close("stopped")
        raise
    except Exception as exc:  # shown to the user; the next message starts a fresh turn
        log.exception("turn of session %s failed", session.id)
        await view.close("interrupted by an error")
        await view.error(f"{type(exc).__name__}: {exc}")


class TurnView:
    """Shows the events of one turn as Chainlit messages and steps, in the order they come.

    Reasoning streams into a ``Reasoning`` step (collapsed; it ends when anything else comes).
    Text streams into an assistant message; a tool call ends it and opens a ``tool`` step (input:
    the arguments as JSON) that its result closes (output; ``is_error`` for ``Error: ...``); text
    after the tools streams into a new message. Everything nests under the current run step. A
    structured answer (the final event's ``output``) becomes a formatted JSON code block.
    """

    def __init__(self, cl: Any, author: str) -> None:
        self.cl = cl
        self.author = author
        current = cl.context.current_step
        self.parent_id: str | None = current.id if current is not None else None
        self.message: Any = None
        self.steps: dict[str, Any] = {}  # open tool steps by tool call id
        self.thought: Any = None  # the open reasoning step
        self._pending = ""  # leading whitespace, held back until real text comes

    async def show(self, event: Event) -> None:
        if isinstance(event, Reasoning):
            await self.reasoning(event.text)
            return
        if isinstance(event, Usage):
            return
        await self.end_reasoning()
        if isinstance(event, TextDelta):
            await self.text(event.text, event.agent)
        elif isinstance(event, ToolCall):
            await self.end_message()
            name = f"{event.agent}: {event.name}" if event.agent else event.name  # a team's agent
            step = self.cl.Step(name=name, type="tool", parent_id=self.parent_id, show_input="json")
            step.input = event.arguments
            step.start = now()
            await step.send()
            self.steps[event.id] = step
        elif isinstance(event, ToolResult):
            step = self.steps.pop(event.id, None)
            if step is None:
                return
            step.output = event.content
            step.is_error = event.is_error
            step.end = now()
            await step.update()
        elif isinstance(event, Repair):
            await self.end_message()
            step = self.cl.Step(name="repair", type="undefined", parent_id=self.parent_id)
            step.output = event.reason
            step.start = step.end = now()
            await step.send()
        elif isinstance(event, Final):
            await self.final(event)

    async def reasoning(self, text: str) -> None:
        """Stream ``text`` into the reasoning step (opened after any streamed message)."""
        if self.thought is None:
            await self.end_message()
            step = self.cl.Step(name=REASONING_STEP, type="llm", parent_id=self.parent_id, show_input=False)
            step.start = now()
            await step.send()
            self.thought = step
        await self.thought.stream_token(text)

    async def end_reasoning(self) -> None:
        if self.thought is not None:
            step, self.thought = self.thought, None
            step.end = now()
            await step.update()

    async def text(self, text: str, agent: str = "") -> None:
        """Stream ``text`` into the answer; a team's agent (``agent``) is the message's author."""
        if self.message is not None and agent and self.message.author != agent:
            await self.end_message()  # another agent of the team speaks (a handoff)
        if self.message is None:
            self._pending += text
            if not self._pending.strip():
                return
            text, self._pending = self._pending.lstrip(), ""
            self.message = self.cl.Message(content="", author=agent or self.author, parent_id=self.parent_id)
        await self.message.stream_token(text)

    async def final(self, final: Final) -> None:
        if final.output is not None:  # a structured answer (agent.output_schema): shown as a JSON block
            shown = json.dumps(final.output, indent=2, ensure_ascii=False)
            if self.message is None:
                self.message = self.cl.Message(content="", author=self.author, parent_id=self.parent_id)
            self.message.content = f"```json\n{shown}\n```"
        elif final.stop_reason == "max_iterations":
            await self.end_message()
            await self.text(final.text)
        elif final.stop_reason == "length":
            await self.text("\n\n*(cut off: the answer reached sampling.max_tokens)*")
        elif self.message is None and final.text.strip():  # not streamed (cannot happen today)
            await self.text(final.text)
        await self.end_message()

    async def end_message(self) -> None:
        """End the streamed message (Chainlit: ``send()`` after ``stream_token``)."""
        self._pending = ""
        if self.message is not None:
            message, self.message = self.message, None
            await message.send()

    async def close(self, why: str) -> None:
        """End what is still open when the turn stops early: open tool steps become errors."""
        await self.end_reasoning()
        for step in self.steps.values():
            step.output = f"({why})"
            step.is_error = True
            step.end = now()
            await step.update()
        self.steps.clear()
        await self.end_message()

    async def error(self, text: str) -> None:
        await self.cl.ErrorMessage(content=text, author=self.author).send()


def now() -> str:
    """A timestamp in Chainlit's format (ISO 8601, UTC, ``Z``)."""
    return datetime.now(UTC).replace(tzinfo=None).isoformat() + "Z"

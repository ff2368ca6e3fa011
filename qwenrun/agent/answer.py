"""Structured answers: the end of a turn whose answer must be JSON of an output schema.

``agent.output_schema`` (or a request's schema, :mod:`qwenrun.spec.output`): while the model may
still call tools, its calls are generated as usual; the answer it ends the turn with is then
generated again under the schema (a structured-output constraint, tools off), the first answer
given as a draft to restate. A turn that cannot call tools (no tools, ``tool_choice: none``) is
generated under the schema from its first model call. :class:`Answer` reads and validates that
answer; an invalid one (a check the grammar cannot enforce) gets one repair call that is told the
problem, then it is an :class:`~qwenrun.errors.OutputError`, as is an answer cut off at
``max_tokens``. Only the validated JSON is shown as text (the loop streams it as one delta).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from qwenrun.agent.steps import Step
from qwenrun.errors import OutputError
from qwenrun.events import Event, Repair, TextDelta, Usage
from qwenrun.spec.output import OutputSchema

__all__ = ["Answer", "answer_notes"]

ModelCall = Callable[[Step, list[dict[str, Any]]], AsyncIterator[Event]]
"""One structured model call: (its step, the transient messages after the history) -> its events."""


def answer_notes(
    note: str | None, schema: OutputSchema | None, step: Step, draft: str = "", problem: str | None = None
) -> list[dict[str, Any]]:
    """The transient messages of a model call: ``note``; for a structured ``step`` the ``draft``
    answer it restates (or the invalid one, and its ``problem``) and the schema's instruction."""
    notes = [{"role": "system", "content": note}] if note else []
    if schema is None or not step.structured:
        return notes
    if draft:
        notes.append({"role": "assistant", "content": draft})
    ask = schema.instruction()
    if problem:
        ask = f"That answer is not valid: {problem}. {ask}"
    notes.append({"role": "system", "content": ask})
    return notes


class Answer:
    """The structured answer of a turn whose last model call was ``step``: :meth:`events` makes the
    model calls it needs (none if ``step`` was structured and is valid); then ``step`` is the one
    whose answer is valid, ``value`` that answer read as JSON, ``content`` its text, ``calls`` the
    model calls made and ``usage`` theirs."""

    def __init__(self, step: Step, schema: OutputSchema, note: str | None = None) -> None:
        self.step, self.schema, self.note = step, schema, note
        self.value: Any = None
        self.calls = 0
        self.usage = Usage()

    @property
    def content(self) -> str:
        return self.step.result.content.strip()

    async def events(self, call: ModelCall) -> AsyncGenerator[Event, None]:
        """The events of the model calls (without their text) and of a repair; OutputError when the
        answer stays invalid."""
        problem: str | None = None
        while True:
            step = self.step
            if step.structured:
                try:
                    self.value = self.schema.parse(step.result.content)
                    return
                except ValueError as exc:
                    cut = " (cut off at sampling.max_tokens)" if step.finish_reason == "length" else ""
                    if problem is not None or cut:
                        raise OutputError(f"the answer is not valid JSON of the output schema "
                                          f"{self.schema.name!r}{cut}: {exc}") from None  # fmt: skip
                    problem = str(exc)
                    yield Repair(f"the answer is not valid JSON of the output schema ({problem}); retrying")
            self.step = Step()
            self.step.structured = True
            self.calls += 1
            extra = answer_notes(self.note, self.schema, self.step, step.result.content.strip(), problem)
            async with aclosing(call(self.step, extra)) as events:  # type: ignore[type-var]
                async for event in events:
                    if not isinstance(event, TextDelta):
                        yield event
            self.usage += self.step.usage

"""A2A tasks as qwenrun agent turns: the library's ``AgentExecutor`` of the A2A front end.

One task is one user turn of the qwenrun session that the task's context id names: the context id
*is* the session id, and the session is recorded in the agent's store like every front end's. The
turn runs in an asyncio task of its own (a :class:`_Turn`); the library's request (``message/send``
or ``message/stream``) relays its events into A2A events:

* the answer streams as chunks of the artifact ``answer``; at the end one last chunk replaces them
  with the whole answer (``append: false``, ``lastChunk: true``), which ``tasks/get`` returns;
* each tool call, tool result, repair and the reasoning of a model call is a ``working`` status
  update whose message has one data part (``{"type": "tool_call", ...}``, as ``qwenrun run --json``);
* the end is ``completed`` (metadata: ``stop_reason``, ``iterations``, ``tool_calls``, ``usage``),
  or ``failed`` with a message that says why.

A call of an ``approval: ask`` tool parks the task in ``input-required``: the request returns, the
turn waits, and the client's next message on the same task id answers (the text ``approve`` or
``reject``, or a data part ``{"approved": true|false}``). Without an answer for
``frontend.approval_timeout_s`` the task is canceled. ``tasks/cancel`` cancels the turn (its engine
request is aborted; the session keeps what was said). A message is checked before the library makes
a task of it (:meth:`TurnExecutor.check`): a bad one is a JSON-RPC error that says what is wrong.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from a2a.helpers import get_data_parts, new_data_part, new_task_from_user_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events import Event as A2AEvent
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.tasks import TaskUpdater
from a2a.types import Message, Role, SendMessageRequest, Task, TaskState
from a2a.utils.errors import ContentTypeNotSupportedError, InvalidParamsError, InvalidRequestError
from a2a.utils.proto_utils import validate_proto_required_fields

from qwenrun.agent import Agent, Session
from qwenrun.approval import ApprovalRequest
from qwenrun.errors import EngineError, RequestError
from qwenrun.events import Event, Final, Reasoning, Repair, TextDelta, ToolCall, ToolResult, Usage, to_dict
from qwenrun.frontends.settings import A2AFrontend
from qwenrun.sessions.store import valid_session_id

__all__ = ["CheckingHandler", "TurnExecutor"]

log = logging.getLogger("qwenrun.frontends.a2a")

ANSWER = "answer"  # the id and name of a task's answer artifact
_APPROVE = frozenset({"approve", "approved", "yes", "y"})
_REJECT = frozenset({"reject", "rejected", "no", "n"})
_MEMORY_SESSIONS = 1000  # contexts kept in memory when the agent records no sessions


def prompt_of(message: Message, agent: str) -> str:
    """The user's text of ``message``: its text parts, and its data parts as JSON, one a line."""
    texts: list[str] = []
    for index, part in enumerate(message.parts):
        if part.HasField("text"):
            texts.append(part.text)
        elif part.HasField("data"):
            texts.append(json.dumps(get_data_parts([part])[0], ensure_ascii=False))
        elif part.HasField("raw") or part.HasField("url"):
            raise ContentTypeNotSupportedError(
                message=f"message.parts[{index}]: a file part is not supported; agent {agent!r} reads "
                "text and data parts"
            )
        else:
            raise InvalidParamsError(message=f"message.parts[{index}]: the part has no text, data or file")
    prompt = "\n".join(texts)
    if not prompt.strip():
        raise InvalidParamsError(message="message.parts: there is no text to answer")
    return prompt


def approval_answer(message: Message, task_id: str, call: str) -> bool:
    """Whether the answer ``message`` approves the call a task waits for; an unclear one is an error."""
    for part in message.parts:
        if part.HasField("data"):
            data = get_data_parts([part])[0]
            if isinstance(data, dict) and isinstance(data.get("approved"), bool):
                return bool(data["approved"])
        elif part.HasField("text"):
            word = part.text.strip().lower().rstrip(".!")
            if word in _APPROVE or word in _REJECT:
                return word in _APPROVE
    raise InvalidParamsError(
        message=f"task {task_id} waits for the approval of {call}: answer with the text approve or "
        'reject, or a data part {"approved": true} or {"approved": false}'
    )


@dataclass(frozen=True, slots=True)
class _Asking:
    """The turn waits for a person's answer about this call."""

    request: ApprovalRequest


@dataclass(frozen=True, slots=True)
class _Failed:
    """The turn ended with this error."""

    error: Exception


_Item = Event | _Asking | _Failed


class _Turn:
    """One user turn of a session, the work of one A2A task. It runs in its own asyncio task, which
    outlives the request that started it while a call waits for approval."""

    def __init__(self, task_id: str, context_id: str, session: Session, prompt: str) -> None:
        self.task_id, self.context_id, self.session = task_id, context_id, session
        self.outbox: asyncio.Queue[_Item] = asyncio.Queue()
        self.answer: asyncio.Future[bool] | None = None  # while a call waits for approval
        self.asking: ApprovalRequest | None = None
        self.streamed = False  # the answer artifact exists: later chunks append to it
        self.expired = False  # nobody answered in time: canceled for that
        self.timer: asyncio.Task[None] | None = None
        session.approver = self._approve
        self.runner = asyncio.create_task(self._run(prompt), name=f"a2a-turn:{task_id}")

    async def _run(self, prompt: str) -> None:
        try:
            async with aclosing(self.session.stream(prompt)) as events:
                async for event in events:
                    self.outbox.put_nowait(event)
        except Exception as exc:  # told to the client as a failed task
            self.outbox.put_nowait(_Failed(exc))

    async def _approve(self, request: ApprovalRequest) -> bool:
        self.answer, self.asking = asyncio.get_running_loop().create_future(), request
        self.outbox.put_nowait(_Asking(request))
        try:
            return await self.answer
        finally:
            self.answer = self.asking = None

    async def stop(self) -> None:
        """Cancel the turn and wait until it has stopped (the engine request is aborted)."""
        if self.timer is not None and self.timer is not asyncio.current_task():
            self.timer.cancel()
        self.runner.cancel()
        await asyncio.gather(self.runner, return_exceptions=True)


class TurnExecutor(AgentExecutor):
    """Runs each A2A task as a turn of ``agent`` (the context's session) and relays its events."""

    def __init__(self, agent: Agent, frontend: A2AFrontend) -> None:
        self.agent, self.frontend = agent, frontend
        self.turns: dict[str, _Turn] = {}  # by task id: running, or waiting for an approval
        self.busy: dict[str, str] = {}  # context id -> the task id of its turn
        self._memory: OrderedDict[str, Session] = OrderedDict()  # sessions when none are recorded
        # Cancels a task whose approval was not answered in time (the app sets it: tasks/cancel).
        self.expire: Callable[[str], Awaitable[object]] | None = None

    # -- checks before the library makes or changes a task ---------------------------------------

    def check(self, message: Message) -> None:
        """Raise the A2A error that ``message`` deserves, before any task is made or changed."""
        if message.role != Role.ROLE_USER:
            raise InvalidParamsError(message="message.role: a message to the agent is the user's (ROLE_USER)")
        turn = self.turns.get(message.task_id) if message.task_id else None
        if turn is not None:
            if turn.asking is None:
                raise InvalidRequestError(
                    message=f"task {turn.task_id} is running and waits for no input; wait for its end or "
                    "cancel it (tasks/cancel); a new turn of its context is a message without taskId"
                )
            approval_answer(message, turn.task_id, turn.asking.shown())
            return
        if message.task_id:  # a task that no turn here waits on: the library answers for it
            return
        self._check_new(message, message.context_id)

    def _check_new(self, message: Message, context: str) -> None:
        """The checks of a message that starts a turn in ``context``."""
        prompt_of(message, self.agent.name)
        if context and not valid_session_id(context):
            raise InvalidParamsError(
                message="message.contextId: expected 1 to 128 characters of A-Z a-z 0-9 _ . : -"
            )
        if context in self.busy:
            raise InvalidRequestError(
                message=f"context {context} has a turn in progress (task {self.busy[context]}); wait for "
                "its end, answer it or cancel it (tasks/cancel)"
            )
        if len(self.turns) >= self.frontend.max_running_tasks:
            raise InvalidRequestError(
                message=f"the server runs {len(self.turns)} tasks already (frontend.max_running_tasks); "
                "retry when one has ended"
            )

    # -- AgentExecutor ------------------------------------------------------------------------------

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        message, task_id, context_id = context.message, context.task_id, context.context_id
        assert message is not None and task_id and context_id  # the library fills them in
        updater = TaskUpdater(event_queue, task_id, context_id)
        turn = self.turns.get(task_id)
        if turn is not None and turn.answer is not None and turn.asking is not None:
            approved = approval_answer(message, task_id, turn.asking.shown())
            if turn.timer is not None:
                turn.timer.cancel()
            await updater.start_work()
            turn.answer.set_result(approved)
        else:
            if context.current_task is not None:
                raise InvalidRequestError(message=f"task {task_id} waits for no input here")
            self._check_new(message, context_id)  # again: another request may have taken the context
            self.busy[context_id] = task_id
            try:
                await event_queue.enqueue_event(new_task_from_user_message(message))
                session = await self._session(context_id)
                turn = _Turn(task_id, context_id, session, prompt_of(message, self.agent.name))
            except BaseException:
                self.busy.pop(context_id, None)
                raise
            self.turns[task_id] = turn
            await updater.start_work()
        try:
            await self._relay(turn, updater)
        except asyncio.CancelledError:  # tasks/cancel, or the server stops
            self._end(turn)
            await turn.stop()
            raise

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        task_id = context.task_id
        assert task_id  # the library fills it in
        turn = self.turns.get(task_id)
        note = None
        if turn is not None:
            if turn.expired and turn.asking is not None:
                note = (f"nobody answered the approval of {turn.asking.shown()} within "
                        f"{self.frontend.approval_timeout_s} s (frontend.approval_timeout_s)")  # fmt: skip
            self._end(turn)
            await turn.stop()
        updater = TaskUpdater(event_queue, task_id, context.context_id or "")
        await updater.cancel(updater.new_agent_message([new_text_part(note)]) if note else None)

    async def aclose(self) -> None:
        """Cancel every turn (the server stops)."""
        turns = list(self.turns.values())
        for turn in turns:
            self._end(turn)
        await asyncio.gather(*(turn.stop() for turn in turns))

    # -- the relay ----------------------------------------------------------------------------------

    async def _relay(self, turn: _Turn, updater: TaskUpdater) -> None:
        """Turn the turn's events into A2A events until it ends or waits for an approval."""
        reasoning = ""
        while True:
            item = await turn.outbox.get()
            if isinstance(item, Reasoning):
                reasoning += item.text  # one update per model call, not one per token
                continue
            if reasoning.strip():
                await self._step(updater, {"type": "reasoning", "text": reasoning.strip()})
            reasoning = ""
            if isinstance(item, TextDelta):
                if item.text:
                    await updater.add_artifact([new_text_part(item.text)], ANSWER, name=ANSWER,
                                               append=turn.streamed, last_chunk=False)  # fmt: skip
                    turn.streamed = True
            elif isinstance(item, ToolCall | ToolResult | Repair):
                await self._step(updater, to_dict(item))
            elif isinstance(item, _Asking):
                await self._ask(turn, updater, item.request)
                return
            elif isinstance(item, Final):
                self._end(turn)
                await updater.add_artifact([new_text_part(item.text)], ANSWER, name=ANSWER, append=False,
                                           last_chunk=True)  # fmt: skip
                await updater.update_status(TaskState.TASK_STATE_COMPLETED, metadata=_final_meta(item))
                return
            elif isinstance(item, _Failed):
                self._end(turn)
                await updater.failed(updater.new_agent_message([new_text_part(self._failure(item.error))]))
                return
            else:
                assert isinstance(item, Usage)  # per model call; the turn's total comes with Final

    async def _step(self, updater: TaskUpdater, data: dict[str, Any]) -> None:
        message = updater.new_agent_message([new_data_part(data)])
        await updater.update_status(TaskState.TASK_STATE_WORKING, message)

    async def _ask(self, turn: _Turn, updater: TaskUpdater, request: ApprovalRequest) -> None:
        call = request.call
        origin = f" (from {request.origin})" if request.origin else ""
        text = f"Run {request.shown()}{origin}? Answer approve or reject."
        data = {"type": "approval_request", "id": call.id, "name": call.name, "arguments": call.arguments,
                "origin": request.origin}  # fmt: skip
        await updater.requires_input(updater.new_agent_message([new_text_part(text), new_data_part(data)]))
        turn.timer = asyncio.create_task(self._expire(turn), name=f"a2a-approval:{turn.task_id}")

    async def _expire(self, turn: _Turn) -> None:
        await asyncio.sleep(self.frontend.approval_timeout_s)
        turn.expired = True
        if self.expire is not None:
            try:
                await self.expire(turn.task_id)
            except Exception:
                log.exception("task %s: cannot cancel it after its approval timed out", turn.task_id)

    def _failure(self, error: Exception) -> str:
        if isinstance(error, RequestError):  # e.g. the conversation outgrew max_model_len
            return f"the engine refused the request: {error}"
        if isinstance(error, EngineError):
            log.warning("engine error: %s", error)
            return f"engine error: {error}"
        log.error("internal error in a turn", exc_info=error)
        return f"internal error: {type(error).__name__}"

    # -- sessions -----------------------------------------------------------------------------------

    async def _session(self, context_id: str) -> Session:
        """The context's session: resumed from the store (read in a thread), or kept in memory."""
        if self.agent.store is not None:
            return await asyncio.to_thread(self.agent.session, context_id)
        session = self._memory.pop(context_id, None) or self.agent.session(context_id)
        self._memory[context_id] = session
        while len(self._memory) > _MEMORY_SESSIONS:
            self._memory.popitem(last=False)
        return session

    def _end(self, turn: _Turn) -> None:
        self.turns.pop(turn.task_id, None)
        if self.busy.get(turn.context_id) == turn.task_id:
            del self.busy[turn.context_id]
        if turn.timer is not None and turn.timer is not asyncio.current_task():
            turn.timer.cancel()


def _final_meta(final: Final) -> dict[str, Any]:
    usage = final.usage
    return {
        "stop_reason": final.stop_reason, "iterations": final.iterations, "tool_calls": final.tool_calls,
        "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "model_calls": usage.model_calls},
    }  # fmt: skip


class CheckingHandler(DefaultRequestHandler):
    """The library's request handler, which checks a message (:meth:`TurnExecutor.check`) before
    it makes or changes a task, so that a bad message leaves no failed task behind."""

    def __init__(self, executor: TurnExecutor, **options: Any) -> None:
        super().__init__(agent_executor=executor, **options)
        self.turns = executor

    async def on_message_send(self, params: SendMessageRequest, context: ServerCallContext) -> Message | Task:
        validate_proto_required_fields(params)  # the library's own check comes first
        self.turns.check(params.message)
        result: Message | Task = await super().on_message_send(params, context)
        return result

    async def on_message_send_stream(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[A2AEvent, None]:
        validate_proto_required_fields(params)
        self.turns.check(params.message)
        async for event in super().on_message_send_stream(params, context):
            yield event

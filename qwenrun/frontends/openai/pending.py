"""Pending approvals of the Responses route, as OpenAI's ``mcp_approval_request`` works.

A turn in agent mode without the ``X-Qwenrun-Approval`` header runs in a task of its own
(:class:`ParkedTurn`). When a call needs a person (a tool's ``approval: ask`` or a ``permissions:``
``ask`` rule) the response ends with an ``mcp_approval_request`` item and the turn waits; the client
answers with a new response whose ``input`` holds ``{"type": "mcp_approval_response",
"approval_request_id": ..., "approve": true | false}`` (and ``previous_response_id``), which
streams the rest of the turn. Nobody answering within ``frontend.approval_timeout_s`` rejects the
call. Parked turns live in this replica's memory (:class:`Parked`), owned by the API key's hash.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from qwenrun.approval import ApprovalRequest
from qwenrun.frontends.openai import chat
from qwenrun.frontends.openai.items import new_id
from qwenrun.frontends.openai.schemas import APIError

__all__ = ["Parked", "ParkedTurn"]


@dataclass(frozen=True, slots=True)
class _Asked:
    id: str
    request: ApprovalRequest


_END = object()


class ParkedTurn:
    """One agent turn that outlives the request which started it while a call waits for approval."""

    def __init__(self, owner: str, timeout_s: float, parked: Parked) -> None:
        self.owner = owner
        self.timeout_s = timeout_s
        self.parked = parked
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.answer: asyncio.Future[bool] | None = None
        self.asked: _Asked | None = None
        self.task: asyncio.Task[None] | None = None
        self.open: dict[str, chat.Piece] = {}  # the calls shown whose result has not come, by id

    def start(self, pieces: chat.Pieces) -> None:
        self.task = asyncio.create_task(self._pump(pieces), name="responses-turn")

    async def _pump(self, pieces: chat.Pieces) -> None:
        try:
            async for piece in pieces:
                self.queue.put_nowait(piece)
        except Exception as exc:  # the reader raises it in its request
            self.queue.put_nowait(exc)
        finally:
            self.queue.put_nowait(_END)

    async def approve(self, request: ApprovalRequest) -> bool:
        """The turn's approver: park, tell the reader, wait for the client (or the time limit)."""
        self.asked = _Asked(new_id("mcpr"), request)
        self.answer = asyncio.get_running_loop().create_future()
        self.parked.turns[self.asked.id] = self
        self.queue.put_nowait(self.asked)
        try:
            return await asyncio.wait_for(asyncio.shield(self.answer), self.timeout_s)
        except TimeoutError:
            return False
        finally:
            self.parked.turns.pop(self.asked.id, None)

    async def pieces(self) -> chat.Pieces:
        """The turn's pieces until it ends or a call waits for approval (then an approval request
        and the end of this response). A reader that stops early (a client gone) cancels the turn."""
        ended = False
        try:
            while True:
                item = await self.queue.get()
                if item is _END:
                    ended = True
                    return
                if isinstance(item, Exception):
                    ended = True
                    raise item
                if isinstance(item, _Asked):
                    call = item.request.call
                    asked = {"type": "approval_request", "id": item.id, "call_id": call.id, "name": call.name,
                             "arguments": call.arguments}  # fmt: skip
                    yield chat.Piece(chat.StepPart(asked))
                    ended = True  # parked, not ended: the next response goes on
                    yield chat.Piece(chat.Finish("stop", 0, 0))
                    return
                step = item.part.data if isinstance(item.part, chat.StepPart) else {}
                if step.get("type") == "tool_call":
                    self.open[str(step.get("id"))] = item
                elif step.get("type") == "tool_result":
                    self.open.pop(str(step.get("id")), None)
                yield item
        finally:
            if not ended and self.task is not None:
                self.task.cancel()

    async def resume(self, approve: bool) -> AsyncGenerator[chat.Piece, None]:
        """Answer the waiting call and stream the rest: the turn's calls without a result again (so
        this response has their ``mcp_call`` items), then the turn's pieces."""
        assert self.answer is not None
        self.answer.set_result(approve)
        for piece in list(self.open.values()):
            yield piece
        async for piece in self.pieces():
            yield piece


class Parked:
    """The turns of one app waiting for an approval, by approval request id."""

    def __init__(self) -> None:
        self.turns: dict[str, ParkedTurn] = {}

    def take(self, approval_request_id: str, owner: str) -> ParkedTurn:
        turn = self.turns.get(approval_request_id)
        waiting = turn is not None and turn.answer is not None and not turn.answer.done()
        if turn is None or not waiting or not hmac.compare_digest(turn.owner, owner):
            raise APIError(404, f"no call waits for the approval {approval_request_id!r} (answered, "
                           "timed out, or on another replica)", param="input")  # fmt: skip
        self.turns.pop(approval_request_id)
        return turn

"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

A request is validated (:mod:`~qwenrun.frontends.openai.items`), its conversation rebuilt (the stored
``previous_response_id`` one, then its ``input`` items), and turned into a chat completion request
that runs on the chat route's own machinery (:func:`chat.passthrough` for the served model name,
:func:`chat.agent_turn` for the agent name); the pieces become output items and events
(:mod:`~qwenrun.frontends.openai.output`). With ``store`` (the default) the response and its
conversation are kept in the agent's session store (SQLite or PostgreSQL, so they outlive a restart
and replicas share them; in memory when sessions are off; each keeps only the items it adds to its
previous response), owned by a hash of the API key that created them and deleted after the
front end's ``response_retention_days``. In agent mode without ``X-Qwenrun-Approval``, a call that
needs a person ends the response with an ``mcp_approval_request`` (:mod:`.pending`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sse_starlette import EventSourceResponse

from qwenrun.agent import Agent
from qwenrun.agent.observability import Metrics
from qwenrun.errors import EngineError, OutputError, RequestError
from qwenrun.frontends.openai import chat
from qwenrun.frontends.openai.http import (
    PING_S,
    collect,
    observe,
    read_json,
    serving_mode,
    unless_disconnected,
)
from qwenrun.frontends.openai.items import (
    FIELDS,
    FunctionChoice,
    McpApprovalResponseItem,
    MessageItem,
    ResponsesRequest,
    new_id,
    normalize,
    to_messages,
)
from qwenrun.frontends.openai.output import ResponseBuilder
from qwenrun.frontends.openai.pending import Parked, ParkedTurn
from qwenrun.frontends.openai.schemas import APIError, ChatCompletionRequest, invalid_request
from qwenrun.frontends.settings import OpenAIFrontend
from qwenrun.sampling import KNOBS, knob_values
from qwenrun.sessions.store import ResponseStore, StoredResponse
from qwenrun.spec.output import answer_schema

__all__ = ["register"]

log = logging.getLogger("qwenrun.frontends.openai")
PRUNE_EVERY_S = 60.0
# vLLM's extra parameters, taken from the body as the chat route takes them (extra_body): every
# sampling knob (qwenrun.sampling.KNOBS) and these
VLLM_EXTRAS = ("structured_outputs", "chat_template_kwargs", "thinking_token_budget")


class MemoryResponses:
    """A :class:`ResponseStore` in a dict, for agents that record nothing (``sessions.enabled: false``)."""

    def __init__(self) -> None:
        self._kept: dict[str, StoredResponse] = {}
        self._lock = threading.Lock()

    def put_response(self, stored: StoredResponse) -> None:
        with self._lock:
            self._kept[stored.id] = stored

    def get_response(self, response_id: str, newer_than: float = 0.0) -> StoredResponse | None:
        with self._lock:
            stored = self._kept.get(response_id)
        return stored if stored is not None and stored.created >= newer_than else None

    def delete_response(self, response_id: str) -> bool:
        with self._lock:
            return self._kept.pop(response_id, None) is not None

    def prune_responses(self, older_than: float) -> None:
        with self._lock:
            for old in [key for key, kept in self._kept.items() if kept.created < older_than]:
                del self._kept[old]


class Responses:
    """The stored responses of one app: ownership, retention and the store's calls off the loop."""

    def __init__(self, agent: Agent, frontend: OpenAIFrontend, keyed: bool) -> None:
        store = agent.store
        self.store: ResponseStore = store if isinstance(store, ResponseStore) else MemoryResponses()
        days = frontend.response_retention_days
        self.retention_s = None if days is None else days * 86400
        self.keyed = keyed
        self._pruned = 0.0

    def owner(self, request: Request) -> str:
        """A hash of the request's API key ("" on a server without one); the key is never kept."""
        if not self.keyed:
            return ""
        token = request.headers.get("authorization", "").partition(" ")[2].strip()
        return hashlib.sha256(b"qwenrun-responses\0" + token.encode()).hexdigest()

    def _cutoff(self) -> float:
        return 0.0 if self.retention_s is None else time.time() - self.retention_s

    async def get(self, response_id: str, owner: str, param: str | None = None) -> StoredResponse:
        """The stored response, or a 404 (also for one another key created, or one past retention)."""
        stored = await asyncio.to_thread(self.store.get_response, response_id, self._cutoff())
        if stored is None or not hmac.compare_digest(stored.owner, owner):
            what = "Previous response" if param else "Response"
            raise APIError(404, f"{what} with id {response_id!r} not found.", param=param,
                           code="previous_response_not_found" if param else "response_not_found")  # fmt: skip
        return stored

    async def delete(self, response_id: str, owner: str) -> None:
        await self.get(response_id, owner)
        await asyncio.to_thread(self.store.delete_response, response_id)

    async def keep(
        self,
        response: dict[str, Any],
        owner: str,
        conversation: list[dict[str, Any]],
        previous: StoredResponse | None = None,
    ) -> None:
        """Store a finished response before the client sees it (another replica on the same database
        may get its ``previous_response_id`` next); the store keeps what it adds to ``previous``."""
        now = time.time()
        parent, inherited = (None, 0) if previous is None else (previous.id, len(previous.conversation))
        stored = StoredResponse(response["id"], owner, now, response, conversation, parent, inherited)
        try:
            await asyncio.to_thread(self.store.put_response, stored)
            if self.retention_s is not None and now - self._pruned > PRUNE_EVERY_S:
                self._pruned = now
                self.store.prune_responses(self._cutoff())
        except Exception:  # the answer is given; a failing store is logged
            log.exception("cannot store response %s", response["id"])


def _chat_choice(request: ResponsesRequest) -> Any:
    choice = request.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    return {"type": "function", "function": {"name": choice.name}}


def _structured(request: ResponsesRequest, body: dict[str, Any], mode: str) -> dict[str, Any] | None:
    """``text.format`` as vLLM's ``structured_outputs`` (pass-through); in agent mode the turn's
    output schema, as a chat ``response_format``."""
    form = request.text.format if request.text else None
    if form is None or form.type == "text":
        return None
    if mode == "agent":
        if form.json_schema is None:
            return {"response_format": {"type": "json_object"}}
        named = {"name": form.name or "answer", "schema": form.json_schema}
        return {"response_format": {"type": "json_schema", "json_schema": named}}
    if "structured_outputs" in body:
        raise APIError(400, "give text.format or structured_outputs, not both", param="text.format")
    schema = form.json_schema if form.type == "json_schema" else {"type": "object"}
    return {"structured_outputs": {"json": schema}}


def chat_request(
    request: ResponsesRequest, body: dict[str, Any], mode: str, conversation: list[dict[str, Any]]
) -> ChatCompletionRequest:
    """The chat completion request that runs a response; ``conversation``: all of its items."""
    messages = to_messages(conversation)
    if request.instructions and mode == "passthrough":  # agent mode: the agent's own system prompt
        messages.insert(0, {"role": "system", "content": request.instructions})
    data: dict[str, Any] = {
        "model": request.model, "messages": messages, "stream": request.stream,
        "tools": [tool.chat_tool() for tool in request.tools] if request.tools else None,
        "tool_choice": _chat_choice(request), "parallel_tool_calls": request.parallel_tool_calls,
    }  # fmt: skip
    data.update({key: body[key] for key in (*KNOBS, *VLLM_EXTRAS) if key in body})
    data.update(knob_values(request, "responses"))  # OpenAI's names, validated by ResponsesRequest
    if (structured := _structured(request, body, mode)) is not None:
        data.update(structured)
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise invalid_request(exc) from None


def _check_agent_input(request: ResponsesRequest) -> None:
    items = request.items()
    if any(item.type == "function_call_output" for item in items):
        raise APIError(400, "agent mode runs the agent's own tools: send no function_call_output "
                       "(use the served model name for client tools)", param="input")  # fmt: skip
    last = items[-1]
    if not (isinstance(last, MessageItem) and last.role == "user"):
        raise APIError(400, "in agent mode the last input item must be a user message", param="input")


def _text(request: ResponsesRequest, agent: Agent, mode: str) -> dict[str, Any]:
    """The response's ``text``: the request's, else in agent mode the agent's output schema."""
    if request.text:
        return request.text.model_dump(exclude_none=True, by_alias=True)
    schema = answer_schema(agent.spec) if mode == "agent" else None
    if schema is None:
        return {"format": {"type": "text"}}
    form = {"type": "json_schema", "name": schema.name, "schema": schema.json_schema, "strict": True}
    return {"format": form}


def skeleton(request: ResponsesRequest, agent: Agent, mode: str = "passthrough") -> dict[str, Any]:
    """The response object before its output: the request's settings, as OpenAI echoes them (in
    agent mode without ``text``: the agent's ``output_schema`` as its ``text.format``)."""
    sampling = agent.spec.sampling
    choice = request.tool_choice
    return {
        "id": new_id("resp"), "object": "response", "created_at": int(time.time()), "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None, "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens, "max_tool_calls": None, "model": request.model,
        "output": [], "parallel_tool_calls": request.parallel_tool_calls is not False,
        "previous_response_id": request.previous_response_id,
        "reasoning": request.reasoning or {"effort": None, "summary": None}, "store": request.store,
        "temperature": sampling.temperature if request.temperature is None else request.temperature,
        "text": _text(request, agent, mode),
        "tool_choice": choice.model_dump() if isinstance(choice, FunctionChoice) else choice or "auto",
        "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or []],
        "top_p": sampling.top_p if request.top_p is None else request.top_p, "truncation": "disabled",
        "usage": None, "user": request.user, "metadata": request.metadata or {},
    }  # fmt: skip


def register(
    app: FastAPI,
    agent: Agent,
    frontend: OpenAIFrontend,
    metrics: Metrics,
    guarded: list[Any],
    busy: set[str] | None = None,
) -> None:
    """Add the Responses API routes to the OpenAI front end's ``app``. ``busy``: the stored
    sessions with a turn in progress, shared with the chat route (``X-Qwenrun-Session``)."""
    busy = set() if busy is None else busy
    responses = Responses(agent, frontend, keyed=bool(app.state.api_key_required))
    parked = Parked()  # turns whose call waits for the client's mcp_approval_response
    served = agent.spec.served_model_name

    @app.post("/v1/responses", dependencies=guarded)
    async def create_response(request: Request) -> Response:
        body = await read_json(request, frontend.max_request_bytes)
        try:
            req = ResponsesRequest.model_validate(body)
        except ValidationError as exc:
            raise invalid_request(exc, FIELDS) from None
        mode = serving_mode(request, req.model, served, agent.name)
        owner = responses.owner(request)
        conversation: list[dict[str, Any]] = []
        previous: StoredResponse | None = None
        if req.previous_response_id is not None:
            previous = await responses.get(req.previous_response_id, owner, param="previous_response_id")
            conversation = list(previous.conversation)
        conversation += [normalize(item) for item in req.items()]
        builder = ResponseBuilder(skeleton(req, agent, mode), server_label=agent.name)
        approval = request.headers.get(chat.APPROVAL_HEADER)
        session_id = request.headers.get(chat.SESSION_HEADER)
        headers = {chat.SESSION_HEADER: session_id} if session_id is not None else None
        items = req.items()
        answer = items[-1] if items else None
        if isinstance(answer, McpApprovalResponseItem):  # a parked turn goes on (pending.py)
            if mode != "agent":
                raise APIError(400, f"mcp_approval_response needs agent mode (model {agent.name!r})",
                               param="input")  # fmt: skip
            pieces = parked.take(answer.approval_request_id, owner).resume(answer.approve)
        elif mode == "passthrough":
            chat_req = chat_request(req, body, mode, conversation)
            for header, value in ((chat.SESSION_HEADER, session_id), (chat.APPROVAL_HEADER, approval)):
                if value is not None:
                    raise APIError(400, f"{header} needs agent mode (model {agent.name!r})")
            pieces = chat.passthrough(agent, chat_req, frontend, builder.response["id"])
        else:  # sessions and approval as in the chat route: the turn is recorded in the session
            _check_agent_input(req)
            chat_req = chat_request(req, body, mode, conversation)
            if session_id is not None and req.previous_response_id is not None:
                raise APIError(400, f"give {chat.SESSION_HEADER} (the stored session's history) or "
                               "previous_response_id (the stored response's conversation), not both",
                               param="previous_response_id")  # fmt: skip
            if approval is None and chat.may_ask(agent):  # the client answers an mcp_approval_request
                turn = ParkedTurn(owner, frontend.approval_timeout_s, parked)
                approver = turn.approve
                turn.start(chat.agent_turn(agent, chat_req, frontend, session_id, busy, approver=approver))
                pieces = turn.pieces()
            else:
                pieces = chat.agent_turn(agent, chat_req, frontend, session_id, busy, approval)

        async def keep() -> None:
            if req.store:
                await responses.keep(builder.response, owner, [*conversation, *builder.output], previous)

        observed = observe(metrics, mode, pieces)
        if not req.stream:
            collected = await unless_disconnected(request, collect(observed))
            builder.start()
            for piece in collected:
                builder.feed(piece.part)
            await keep()
            return JSONResponse(builder.response, headers=headers)
        first = await unless_disconnected(request, anext(observed))  # a dead engine is a real 503
        return EventSourceResponse(
            _events(builder, first, observed, request, keep), ping=PING_S, headers=headers
        )

    @app.get("/v1/responses/{response_id}", dependencies=guarded)
    async def get_response(response_id: str, request: Request) -> Response:
        if request.query_params.get("stream", "false").lower() == "true":
            raise APIError(400, "streaming a stored response again is not supported", param="stream")
        stored = await responses.get(response_id, responses.owner(request))
        return JSONResponse(stored.response)

    @app.delete("/v1/responses/{response_id}", dependencies=guarded)
    async def delete_response(response_id: str, request: Request) -> Response:
        await responses.delete(response_id, responses.owner(request))
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


def _sse(event: dict[str, Any]) -> dict[str, str]:
    return {"event": event["type"], "data": json.dumps(event, ensure_ascii=False, separators=(",", ":"))}


async def _events(
    builder: ResponseBuilder,
    first: chat.Piece,
    pieces: chat.Pieces,
    request: Request,
    keep: Callable[[], Awaitable[None]],
) -> AsyncGenerator[dict[str, str], None]:
    """The events of a streamed response; the response is stored before its terminal event, and an
    error after the headers ends the stream with ``response.failed``."""

    async def all_pieces() -> chat.Pieces:
        yield first
        async for piece in pieces:
            yield piece

    try:
        async with aclosing(pieces):
            for event in builder.start():
                yield _sse(event)
            async for piece in all_pieces():
                events = builder.feed(piece.part)
                if isinstance(piece.part, chat.Finish):
                    await keep()
                for event in events:
                    yield _sse(event)
    except RequestError as exc:  # the engine refused this request (a prompt over max_model_len)
        request.state.qwenrun_status = 400
        for event in builder.fail("invalid_prompt", str(exc)):
            yield _sse(event)
    except (EngineError, APIError, OutputError) as exc:
        log.warning("error during a streamed response: %s", exc)
        request.state.qwenrun_status = (
            503 if isinstance(exc, EngineError) else 502 if isinstance(exc, OutputError) else exc.status
        )
        for event in builder.fail("server_error", str(exc)):
            yield _sse(event)
    except Exception as exc:
        log.exception("internal error during a streamed response")
        request.state.qwenrun_status = 500
        for event in builder.fail("server_error", f"internal error: {type(exc).__name__}"):
            yield _sse(event)
    except BaseException:  # cancelled or closed: the client went away
        request.state.qwenrun_status = 499
        raise

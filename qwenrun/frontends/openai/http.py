"""HTTP plumbing shared by the OpenAI-compatible routes (chat completions, responses).

Reading a JSON body under a size limit, telling the two modes apart by the request's model name,
cancelling work when the client disconnects, counting a
stream of :mod:`~qwenrun.frontends.openai.chat` pieces in the metrics, and the common errors.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable
from contextlib import aclosing
from typing import Any, Literal, TypeVar

from fastapi import Request
from starlette.requests import ClientDisconnect

from qwenrun.agent.observability import Metrics
from qwenrun.events import ParsedCall
from qwenrun.frontends.openai import chat
from qwenrun.frontends.openai.metrics import MODE_KEY
from qwenrun.frontends.openai.schemas import APIError

__all__ = [
    "PING_S", "ClientGone", "collect", "observe", "read_json", "serving_mode", "unknown_model",
    "unless_disconnected",
]  # fmt: skip

T = TypeVar("T")
PING_S = 15  # SSE keep-alive comments while a tool step runs (proxies drop idle connections)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def unknown_model(name: str) -> APIError:
    return APIError(404, f"The model {name!r} does not exist", param="model", code="model_not_found")


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The JSON object of the body, refusing more than ``limit`` bytes by Content-Length and by bytes
    read, a body that is not ``application/json`` (as ``vllm serve``: a form or text body is a
    mistake) and JSON that is not an object."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        shown = repr(media_type) if media_type else "none"
        raise APIError(400, f"Content-Type must be application/json (got {shown})")
    too_large = APIError(413, f"the request body is larger than {limit} bytes",
                         code="request_too_large", headers={"Connection": "close"})  # fmt: skip
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise too_large
    data = bytearray()
    try:
        async for part in request.stream():
            data += part
            if len(data) > limit:
                raise too_large
    except ClientDisconnect:
        raise ClientGone() from None
    try:
        body = json.loads(data, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the body is not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(data):  # json.loads joins valid pairs; an unpaired one is not text
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except (UnicodeEncodeError, RecursionError):
            raise APIError(400, "the body is not valid JSON: a \\u escape is an unpaired UTF-16 surrogate, "
                           "which is not text (the tokenizer cannot encode it)") from None  # fmt: skip
    if not isinstance(body, dict):
        raise APIError(400, f"the body must be a JSON object, not {_json_type(body)}")
    return body


def serving_mode(request: Request, model: str, served: str, agent: str) -> Literal["passthrough", "agent"]:
    """``passthrough`` for the served model's name, ``agent`` for the agent's (noted on the request
    for the metrics); 404 for any other name."""
    if model not in (served, agent):
        raise unknown_model(model)
    mode: Literal["passthrough", "agent"] = "passthrough" if model == served else "agent"
    setattr(request.state, MODE_KEY, mode)
    return mode


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, as a client would say it."""
    if isinstance(value, bool):
        return "a boolean"
    names = {list: "an array", str: "a string", int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


async def observe(metrics: Metrics, mode: str, pieces: chat.Pieces) -> chat.Pieces:
    async with aclosing(pieces):
        async for piece in pieces:
            part = piece.part
            if isinstance(part, ParsedCall):
                metrics.count_tool_call(mode, part.name)
            elif isinstance(part, chat.StepPart) and part.data.get("type") == "tool_call":
                metrics.count_tool_call(mode, str(part.data.get("name")))
            elif isinstance(part, chat.Finish):  # n choices share one prompt
                prompt = part.prompt_tokens if piece.choice == 0 else 0
                metrics.count_tokens(mode, prompt, part.completion_tokens)
            yield piece


async def collect(pieces: chat.Pieces) -> list[chat.Piece]:
    async with aclosing(pieces):
        return [piece async for piece in pieces]


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first (the body is already read,
    so the next ASGI message is ``http.disconnect``)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself is cancelled (server shutdown)
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        request.state.qwenrun_status = 499
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    return task.result()

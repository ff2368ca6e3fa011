"""The OpenAI-compatible HTTP front end (``frontend.kind: openai``): FastAPI app and uvicorn runner.

Thin: HTTP in (auth, size limit, JSON, validation), :mod:`qwenrun.server.chat` in the middle,
OpenAI JSON or server-sent events out. Every failure is an OpenAI error body with a 4xx/5xx
status; a request the engine refuses as invalid is a 400, an engine failure a 503 (or, once a
stream has started, an ``error`` event). When the engine dies for good, :func:`serve` stops the
server and raises :class:`EngineError` (``qwenrun up`` exits with 1) so that a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import aclosing, asynccontextmanager
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from qwenrun.agent import Agent
from qwenrun.config import AgentSpec, OpenAIFrontend
from qwenrun.engine import engine_failed, wait_until_failed
from qwenrun.errors import ConfigError, EngineError, RequestError
from qwenrun.loading import secret_from_env
from qwenrun.observability import bind_metrics
from qwenrun.server import chat
from qwenrun.server.metrics import Metrics, MetricsMiddleware
from qwenrun.server.schemas import APIError, ChatCompletionRequest, invalid_request

__all__ = ["create_app", "serve"]

log = logging.getLogger("qwenrun.server")
T = TypeVar("T")
PING_S = 15  # SSE keep-alive comments while a tool step runs (proxies drop idle connections)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def frontend_of(spec: AgentSpec) -> OpenAIFrontend:
    """The spec's ``frontend`` if it is ``openai``, else the defaults of one."""
    if isinstance(spec.frontend, OpenAIFrontend):
        return spec.frontend
    return OpenAIFrontend.model_validate({"kind": "openai"})


def _api_key(frontend: OpenAIFrontend, source: str) -> str | None:
    name = frontend.api_key_env
    if name is None:
        return None
    hint = f"export {name}=<key> or remove api_key_env to run without an API key"
    return secret_from_env(name, f"{source}: frontend.api_key_env", "key", "QWENRUN_API_KEY", hint)


def _engine_failed(agent: Agent) -> bool:
    return engine_failed(agent.engine)


def create_app(agent: Agent, *, shutdown_engine: bool = True) -> FastAPI:
    """The app for ``agent``. Its lifespan starts the engine (``await agent.start()``) and, unless
    ``shutdown_engine`` is False (an engine shared with other code), shuts it down at the end.

    Once the engine has died for good the app calls ``app.state.on_engine_death`` (if set; :func:`serve`
    sets it to stop the server) and sets ``app.state.engine_died``."""
    spec = agent.spec
    frontend = frontend_of(spec)
    api_key = _api_key(frontend, spec.source)
    served = spec.served_model_name
    if agent.name == served:
        raise ConfigError(f"{spec.source}: agent.name {agent.name!r} must differ from the served model name")
    metrics = Metrics()
    bind_metrics(agent, metrics)  # the agent's turns, tool calls and session writes show on /metrics
    ready = False
    started_at = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal ready
        try:
            await agent.start()
        except EngineError as exc:
            log.error("the engine failed to start: %s", exc)
            raise
        ready = True
        log.info("serving %r (pass-through) and %r (agent) on the OpenAI API", served, agent.name)
        watchdog = asyncio.create_task(_on_death(app, agent))
        try:
            yield
        finally:
            ready = False
            watchdog.cancel()
            if shutdown_engine:
                await agent.shutdown()

    # No /docs or /openapi.json: they would be open without the API key and say nothing useful.
    app = FastAPI(title="qwenrun", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.api_key_required = api_key is not None
    app.state.metrics = metrics
    app.state.engine_died = False
    app.state.on_engine_death = None

    def error_response(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(EngineError)
    async def on_engine_error(request: Request, exc: EngineError) -> JSONResponse:
        log.warning("engine error: %s", exc)
        return error_response(APIError(503, str(exc), type="server_error", code="engine_unavailable"))

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(_refused(exc))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(APIError(400, "; ".join(str(e.get("msg")) for e in exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers))

    @app.exception_handler(ClientGone)
    async def on_client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(401, "Missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    guarded = [Depends(authorize)]

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": started_at, "owned_by": "qwenrun"}

    @app.get("/health")
    async def health() -> Response:
        if ready and not _engine_failed(agent):
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics", dependencies=guarded)
    async def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(served), model_card(agent.name)]}

    @app.get("/v1/models/{model:path}", dependencies=guarded)
    async def model(model: str) -> dict[str, Any]:
        if model not in (served, agent.name):
            raise _unknown_model(model)
        return model_card(model)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request) -> Response:
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":  # as vllm serve: a form or text body is a mistake
            shown = repr(media_type) if media_type else "none"
            raise APIError(400, f"Content-Type must be application/json (got {shown})")
        body = await _read_json(request, frontend.max_request_bytes)
        if not isinstance(body, dict):
            raise APIError(400, f"the body must be a JSON object, not {_json_type(body)}")
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise invalid_request(exc) from None
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        reply = chat.Reply(
            req.model, include_usage=include_usage, choices=req.n or 1, logprobs=bool(req.logprobs)
        )
        if req.model not in (served, agent.name):
            raise _unknown_model(req.model)
        mode = request.state.qwenrun_mode = "passthrough" if req.model == served else "agent"
        session_id = request.headers.get(chat.SESSION_HEADER)
        headers = {chat.SESSION_HEADER: session_id} if session_id is not None else None
        if mode == "passthrough":
            if session_id is not None:
                raise APIError(400, f"{chat.SESSION_HEADER} needs agent mode (model {agent.name!r})")
            pieces = chat.passthrough_choices(agent, req, frontend, reply.id)
        else:
            pieces = chat.agent_turn(agent, req, frontend, session_id)
        observed = _observe(metrics, mode, pieces)
        if not req.stream:
            collected = await _unless_disconnected(request, _collect(observed))
            return JSONResponse(chat.completion(reply, collected), headers=headers)
        # Wait for the first piece so that an engine that is dead or refuses the request gets a
        # real 503 status instead of a 200 followed by an error event.
        first = await _unless_disconnected(request, anext(observed))
        # sse-starlette rather than a bare StreamingResponse: when the client goes away or a send
        # fails it closes the body generator at once (so the engine request is aborted, not left
        # to the garbage collector), and it sends keep-alive comments while a slow tool runs.
        return EventSourceResponse(_events(reply, first, observed, request), ping=PING_S, headers=headers)

    return app


def _unknown_model(name: str) -> APIError:
    return APIError(404, f"The model {name!r} does not exist", param="model", code="model_not_found")


async def _read_json(request: Request, limit: int) -> Any:
    """The JSON body, refusing more than ``limit`` bytes by Content-Length and by bytes read."""
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
    return body


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, as a client would say it."""
    if isinstance(value, bool):
        return "a boolean"
    names = {list: "an array", str: "a string", int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


async def _observe(metrics: Metrics, mode: str, pieces: chat.Pieces) -> chat.Pieces:
    async with aclosing(pieces):
        async for piece in pieces:
            if isinstance(piece, chat.Call):
                metrics.count_tool_call(mode, piece.call.name)
            elif isinstance(piece, chat.Step) and piece.data.get("type") == "tool_call":
                metrics.count_tool_call(mode, str(piece.data.get("name")))
            elif isinstance(piece, chat.Finish):  # n choices share one prompt
                metrics.count_tokens(
                    mode, piece.prompt_tokens if piece.choice == 0 else 0, piece.completion_tokens
                )
            yield piece


async def _collect(pieces: chat.Pieces) -> list[chat.Piece]:
    async with aclosing(pieces):
        return [piece async for piece in pieces]


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
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


async def _events(
    reply: chat.Reply, first: chat.Piece, pieces: chat.Pieces, request: Request
) -> AsyncGenerator[str, None]:
    """The SSE data of a stream; an error after the headers becomes an ``error`` event, then the end."""

    async def all_pieces() -> chat.Pieces:
        yield first
        async for piece in pieces:
            yield piece

    try:
        async with aclosing(pieces), aclosing(chat.chunks(reply, all_pieces())) as stream:
            async for chunk in stream:
                yield json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
        yield "[DONE]"
    except RequestError as exc:  # a later model call of an agent turn, e.g. a too long conversation
        request.state.qwenrun_status = 400
        yield json.dumps(_refused(exc).body())
    except EngineError as exc:
        log.warning("engine error during a stream: %s", exc)
        request.state.qwenrun_status = 503
        yield json.dumps(APIError(503, str(exc), type="server_error", code="engine_unavailable").body())
    except Exception as exc:
        log.exception("internal error during a stream")
        request.state.qwenrun_status = 500
        yield json.dumps(APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body())
    except BaseException:  # cancelled or closed: the client went away
        request.state.qwenrun_status = 499
        raise


def _refused(exc: RequestError) -> APIError:
    return APIError(400, str(exc), param=exc.param, code=exc.code)


ENGINE_CHECK_S = 1.0  # how often the watchdog looks at the engine


async def _on_death(app: FastAPI, agent: Agent) -> None:
    """Wait until the engine dies for good, then tell ``app.state.on_engine_death``."""
    await wait_until_failed(agent.engine, ENGINE_CHECK_S)
    app.state.engine_died = True
    log.error("the engine has died; stopping the server so that a supervisor can restart it")
    callback = app.state.on_engine_death
    if callback is not None:
        callback()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(agent: Agent) -> None:
    """Run the app with uvicorn on ``frontend.host:frontend.port`` until interrupted."""
    import uvicorn

    frontend = frontend_of(agent.spec)
    app = create_app(agent)
    if not app.state.api_key_required and not _is_loopback(frontend.host):
        log.warning(
            "serving on %s without an API key: anyone who can reach this port can use the model "
            "(set frontend.api_key_env)", frontend.host,
        )  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host=frontend.host, port=frontend.port, log_level="info"))
    app.state.on_engine_death = lambda: setattr(server, "should_exit", True)
    server.run()
    if app.state.engine_died:
        raise EngineError("the engine died, so the server stopped (exit code 1): restart qwenrun, or let "
                          "a supervisor (systemd, Kubernetes) do it")  # fmt: skip

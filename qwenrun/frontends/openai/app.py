"""The OpenAI-compatible HTTP front end (``frontend.kind: openai``): FastAPI app and uvicorn runner.

Thin: HTTP in (auth, size limit, JSON, validation), :mod:`qwenrun.frontends.openai.chat` in the middle,
OpenAI JSON or server-sent events out. Every failure is an OpenAI error body with a 4xx/5xx
status; a request the engine refuses as invalid is a 400, an engine failure a 503 (or, once a
stream has started, an ``error`` event). When the engine dies for good, :func:`serve` stops the
server and raises :class:`EngineError` (``qwenrun up`` exits with 1) so that a supervisor restarts it.
The Responses API routes are :mod:`qwenrun.frontends.openai.responses`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwenrun.agent import Agent
from qwenrun.agent.observability import Metrics
from qwenrun.engines.base import wait_until_dead
from qwenrun.errors import ConfigError, EngineError, OutputError, RequestError
from qwenrun.frontends.openai import chat, completions, responses
from qwenrun.frontends.openai.http import (
    PING_S,
    ClientGone,
    collect,
    observe,
    read_json,
    serving_mode,
    unknown_model,
    unless_disconnected,
)
from qwenrun.frontends.openai.metrics import MetricsMiddleware, bind_metrics
from qwenrun.frontends.openai.schemas import APIError, ChatCompletionRequest, invalid_request
from qwenrun.frontends.settings import OpenAIFrontend
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.spec.loading import secret_from_env

__all__ = ["create_app", "serve"]

log = logging.getLogger("qwenrun.frontends.openai")


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
    busy: set[str] = set()  # stored sessions with a turn in progress (X-Qwenrun-Session)
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

    @app.exception_handler(OutputError)
    async def on_output_error(request: Request, exc: OutputError) -> JSONResponse:
        return error_response(_invalid_output(exc))

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
        if ready and agent.engine.health() == "ready":
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
            raise unknown_model(model)
        return model_card(model)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request, frontend.max_request_bytes)
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise invalid_request(exc) from None
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        reply = chat.Reply(
            req.model, include_usage=include_usage, choices=req.n or 1, logprobs=bool(req.logprobs)
        )
        mode = serving_mode(request, req.model, served, agent.name)
        session_id = request.headers.get(chat.SESSION_HEADER)
        headers = {chat.SESSION_HEADER: session_id} if session_id is not None else None
        approval = request.headers.get(chat.APPROVAL_HEADER)
        if mode == "passthrough":
            for header, value in ((chat.SESSION_HEADER, session_id), (chat.APPROVAL_HEADER, approval)):
                if value is not None:
                    raise APIError(400, f"{header} needs agent mode (model {agent.name!r})")
            pieces = chat.passthrough_choices(agent, req, frontend, reply.id)
        else:
            pieces = chat.agent_turn(agent, req, frontend, session_id, busy, approval)
        observed = observe(metrics, mode, pieces)
        if not req.stream:
            collected = await unless_disconnected(request, collect(observed))
            return JSONResponse(completions.completion(reply, collected), headers=headers)
        # Wait for the first piece so that an engine that is dead or refuses the request gets a
        # real 503 status instead of a 200 followed by an error event.
        first = await unless_disconnected(request, anext(observed))
        # sse-starlette rather than a bare StreamingResponse: when the client goes away or a send
        # fails it closes the body generator at once (so the engine request is aborted, not left
        # to the garbage collector), and it sends keep-alive comments while a slow tool runs.
        return EventSourceResponse(_events(reply, first, observed, request), ping=PING_S, headers=headers)

    responses.register(app, agent, frontend, metrics, guarded, busy)  # /v1/responses (docs/server.md)
    return app


async def _events(
    reply: chat.Reply, first: chat.Piece, pieces: chat.Pieces, request: Request
) -> AsyncGenerator[str, None]:
    """The SSE data of a stream; an error after the headers becomes an ``error`` event, then the end."""

    async def all_pieces() -> chat.Pieces:
        yield first
        async for piece in pieces:
            yield piece

    try:
        async with aclosing(pieces), aclosing(completions.chunks(reply, all_pieces())) as stream:
            async for chunk in stream:
                yield json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
        yield "[DONE]"
    except RequestError as exc:  # a later model call of an agent turn, e.g. a too long conversation
        request.state.qwenrun_status = 400
        yield json.dumps(_refused(exc).body())
    except OutputError as exc:  # the agent's answer does not match its output schema
        request.state.qwenrun_status = 502
        yield json.dumps(_invalid_output(exc).body())
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


def _invalid_output(exc: OutputError) -> APIError:
    return APIError(502, str(exc), type="server_error", code="invalid_output")


ENGINE_CHECK_S = 1.0  # how often the watchdog looks at the engine


async def _on_death(app: FastAPI, agent: Agent) -> None:
    """Wait until the engine dies for good, then tell ``app.state.on_engine_death``."""
    await wait_until_dead(agent.engine, ENGINE_CHECK_S)
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

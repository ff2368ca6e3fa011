"""The A2A front end's HTTP side (``frontend.kind: a2a``): a Starlette app and its uvicorn runner.

The routes are the official SDK's (``a2a-sdk``): its JSON-RPC endpoint at ``/`` (protocol 1.0:
``SendMessage``, ``SendStreamingMessage``, ``GetTask``, ``CancelTask``, ...; and 0.3, the same
endpoint: ``message/send``, ``message/stream``, ``tasks/get``, ``tasks/cancel``, ...) over its
request handler and an in-memory task store; qwenrun adds the agent card
(:mod:`~qwenrun.frontends.a2a.card`, its URL the one the client asked unless
``frontend.public_url`` says), ``/health``, the API key and the body limit (a small ASGI guard in
front of every route), and the executor that runs the tasks as agent turns
(:mod:`~qwenrun.frontends.a2a.turns`). As the OpenAI server does, :func:`serve` stops when the
engine dies for good and raises :class:`EngineError` (``qwenrun up`` exits with 1).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import click
import uvicorn
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes import create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore
from a2a.types import CancelTaskRequest
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwenrun.agent import Agent
from qwenrun.engines.base import wait_until_dead
from qwenrun.errors import EngineError
from qwenrun.frontends.a2a.card import agent_card
from qwenrun.frontends.a2a.turns import CheckingHandler, TurnExecutor
from qwenrun.frontends.settings import A2AFrontend
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.spec.loading import secret_from_env

__all__ = ["create_app", "serve"]

log = logging.getLogger("qwenrun.frontends.a2a")

OPEN_PATHS = frozenset({AGENT_CARD_WELL_KNOWN_PATH, "/health"})  # no API key needed
ENGINE_CHECK_S = 1.0  # how often the watchdog looks at the engine


def frontend_of(spec: AgentSpec) -> A2AFrontend:
    """The spec's ``frontend`` if it is ``a2a``, else the defaults of one."""
    if isinstance(spec.frontend, A2AFrontend):
        return spec.frontend
    return A2AFrontend.model_validate({"kind": "a2a"})


def _api_key(frontend: A2AFrontend, source: str) -> str | None:
    name = frontend.api_key_env
    if name is None:
        return None
    hint = f"export {name}=<key> or remove api_key_env to run without an API key"
    return secret_from_env(name, f"{source}: frontend.api_key_env", "key", "QWENRUN_API_KEY", hint)


def create_app(agent: Agent, *, shutdown_engine: bool = True) -> Starlette:
    """The app for ``agent``. Its lifespan starts the agent (engine and MCP servers) and, unless
    ``shutdown_engine`` is False (an engine shared with other code), shuts it down at the end.
    Once the engine has died for good the app calls ``app.state.on_engine_death`` (if set; :func:`serve`
    sets it to stop the server) and sets ``app.state.engine_died``."""
    spec = agent.spec
    frontend = frontend_of(spec)
    api_key = _api_key(frontend, spec.source)
    executor = TurnExecutor(agent, frontend)
    handler = CheckingHandler(
        executor, task_store=InMemoryTaskStore(), agent_card=agent_card(agent, frontend.public_url or "/")
    )

    async def expire(task_id: str) -> None:  # an approval nobody answered: tasks/cancel
        await handler.on_cancel_task(CancelTaskRequest(id=task_id), ServerCallContext())

    executor.expire = expire

    async def card(request: Request) -> Response:
        url = frontend.public_url or str(request.base_url)
        return JSONResponse(agent_card_to_dict(agent_card(agent, url, api_key_env=frontend.api_key_env)))

    async def health(request: Request) -> Response:
        if app.state.ready and agent.engine.health() == "ready":
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await agent.start()
        except EngineError as exc:
            log.error("the engine failed to start: %s", exc)
            raise
        app.state.ready = True
        watchdog = asyncio.create_task(_on_death(app, agent))
        try:
            yield
        finally:
            app.state.ready = False
            watchdog.cancel()
            await executor.aclose()
            await handler.aclose()
            if shutdown_engine:
                await agent.shutdown()

    routes = [
        Route(AGENT_CARD_WELL_KNOWN_PATH, card, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        *create_jsonrpc_routes(handler, rpc_url="/", enable_v0_3_compat=True),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(_Guard, api_key=api_key, limit=frontend.max_request_bytes)  # type: ignore[arg-type]
    app.state.ready = False
    app.state.engine_died = False
    app.state.on_engine_death = None
    app.state.api_key_required = api_key is not None
    app.state.executor = executor
    return app


class _Guard:
    """ASGI middleware in front of every route: the API key (but on the card and ``/health``) and
    ``frontend.max_request_bytes`` (by Content-Length and by the bytes read), each refused with a
    JSON-RPC error body and its HTTP status (401, 413)."""

    def __init__(self, app: ASGIApp, api_key: str | None, limit: int) -> None:
        self.app, self.api_key, self.limit = app, api_key, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            problem = _key_problem(headers.get("authorization", ""), self.api_key)
            if problem:
                await _refuse(send, 401, -32600, problem, {"WWW-Authenticate": "Bearer"})
                return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        too_large = f"the request body is larger than {self.limit} bytes (frontend.max_request_bytes)"
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _refuse(send, 413, -32600, too_large, {"Connection": "close"})
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await _refuse(send, 413, -32600, too_large, {"Connection": "close"})
                return
            if not message.get("more_body", False):
                break
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # http.disconnect, for the SSE responses

        await self.app(scope, replay, send)


def _key_problem(header: str, api_key: str) -> str | None:
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "Missing API key: send the header 'Authorization: Bearer <key>'"
    if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        return "Incorrect API key provided"
    return None


async def _refuse(send: Send, status: int, code: int, text: str, headers: dict[str, str]) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": text}}).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    *((key.lower().encode(), value.encode()) for key, value in headers.items())],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


async def _on_death(app: Starlette, agent: Agent) -> None:
    """Wait until the engine dies for good, then tell ``app.state.on_engine_death``."""
    await wait_until_dead(agent.engine, ENGINE_CHECK_S)
    app.state.engine_died = True
    log.error("the engine has died; stopping the server so that a supervisor can restart it")
    if app.state.on_engine_death is not None:
        app.state.on_engine_death()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(uvicorn.Server):
    """uvicorn's server, which says on stderr where the agent is once it listens."""

    def __init__(self, config: uvicorn.Config, agent: Agent, frontend: A2AFrontend) -> None:
        super().__init__(config)
        self.agent, self.frontend = agent, frontend

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.should_exit or not self.servers:
            return
        port = self.servers[0].sockets[0].getsockname()[1]
        host = self.frontend.host if ":" not in self.frontend.host else f"[{self.frontend.host}]"
        url = self.frontend.public_url or f"http://{host}:{port}/"
        click.echo(f"A2A agent {self.agent.name!r} at {url} (agent card: "
                   f"{url.rstrip('/')}{AGENT_CARD_WELL_KNOWN_PATH})", err=True)  # fmt: skip


def serve(agent: Agent) -> None:
    """Run the app with uvicorn on ``frontend.host:frontend.port`` until interrupted."""
    frontend = frontend_of(agent.spec)
    app = create_app(agent)
    if not app.state.api_key_required and not _is_loopback(frontend.host):
        log.warning(
            "serving on %s without an API key: anyone who can reach this port can use the agent "
            "(set frontend.api_key_env)", frontend.host,
        )  # fmt: skip
    config = uvicorn.Config(app, host=frontend.host, port=frontend.port, log_level="info")
    server = _Server(config, agent, frontend)
    app.state.on_engine_death = lambda: setattr(server, "should_exit", True)
    server.run()
    if app.state.engine_died:
        raise EngineError("the engine died, so the server stopped (exit code 1): restart qwenrun, or let "
                          "a supervisor (systemd, Kubernetes) do it")  # fmt: skip

"""The MCP server on streamable HTTP: a Starlette app around the SDK's ``StreamableHTTPSessionManager``.

Stateful MCP sessions (so that elicitation and progress reach the client) at ``frontend.path``; an
API key (``Authorization: Bearer``) when ``frontend.api_key_env`` names one; the SDK's body limit
(``frontend.max_request_bytes``: 413); on a loopback address the SDK's DNS-rebinding protection
(Host and Origin must be local). ``GET /health`` needs no key. The app's lifespan starts the agent;
:func:`serve` binds ``frontend.host:frontend.port`` (127.0.0.1 unless told otherwise), says where on
stderr, and stops with :class:`EngineError` when the engine dies for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import click
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from qwenrun.agent import Agent
from qwenrun.engines.base import wait_until_dead
from qwenrun.errors import ConfigError
from qwenrun.frontends.mcp.server import AgentServer
from qwenrun.frontends.mcp.stdio import ENGINE_CHECK_S, engine_died
from qwenrun.frontends.settings import McpFrontend
from qwenrun.spec.loading import secret_from_env

__all__ = ["create_app", "serve"]

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
LOOPBACK_ORIGINS = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]


def _api_key(frontend: McpFrontend, source: str) -> str | None:
    name = frontend.api_key_env
    if name is None:
        return None
    hint = f"export {name}=<key> or remove api_key_env to run without an API key"
    return secret_from_env(name, f"{source}: frontend.api_key_env", "key", "QWENRUN_MCP_KEY", hint)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _ApiKey:
    """Every request but ``GET /health`` needs ``Authorization: Bearer <key>``: else a 401."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            headers = dict(scope.get("headers") or ())
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            problem = None
            if scheme.lower() != "bearer" or not given.strip():
                problem = "Missing API key: send the header 'Authorization: Bearer <key>'"
            elif not hmac.compare_digest(given.strip().encode("latin-1"), self.key):
                problem = "Incorrect API key"
            if problem is not None:
                body = {"jsonrpc": "2.0", "id": "server-error", "error": {"code": -32001, "message": problem}}
                await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Endpoint:
    """The session manager as an ASGI app (Starlette routes a plain function as a GET handler)."""

    def __init__(self, manager: StreamableHTTPSessionManager) -> None:
        self.manager = manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.manager.handle_request(scope, receive, send)


class App:
    """The ASGI app of one agent server: ``engine_died`` turns True when the engine died, and
    ``on_engine_death`` (if set) is called then."""

    def __init__(self, core: AgentServer, *, shutdown_agent: bool = True) -> None:
        self.core = core
        self.engine_died = False
        self.on_engine_death: Any = None
        frontend, agent = core.frontend, core.agent
        key = _api_key(frontend, agent.spec.source)
        security = None
        if is_loopback(frontend.host):
            security = TransportSecuritySettings(
                allowed_hosts=LOOPBACK_HOSTS, allowed_origins=LOOPBACK_ORIGINS
            )
        manager = StreamableHTTPSessionManager(
            core.server, security_settings=security, max_request_body_size=frontend.max_request_bytes
        )

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            async with manager.run():
                try:
                    await core.start()
                except BaseException:
                    if shutdown_agent:
                        await agent.shutdown()
                    raise
                watchdog = asyncio.ensure_future(self._watch(agent))
                try:
                    yield
                finally:
                    watchdog.cancel()
                    if shutdown_agent:
                        await agent.shutdown()

        async def health(request: Request) -> Response:
            if agent.engine.health() == "ready":
                return JSONResponse({"status": "ok"})
            return JSONResponse({"status": "unavailable"}, status_code=503)

        routes = [Route("/health", health, methods=["GET"]), Route(frontend.path, _Endpoint(manager))]
        app: ASGIApp = Starlette(routes=routes, lifespan=lifespan)
        self.asgi = _ApiKey(app, key) if key is not None else app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.asgi(scope, receive, send)

    async def _watch(self, agent: Agent) -> None:
        await wait_until_dead(agent.engine, ENGINE_CHECK_S)
        self.engine_died = True
        engine_died()
        if self.on_engine_death is not None:
            self.on_engine_death()


def create_app(agent: Agent, frontend: McpFrontend, *, shutdown_agent: bool = True) -> App:
    """The app of ``agent`` (its lifespan starts the agent; ``shutdown_agent``: and stops it)."""
    return App(AgentServer(agent, frontend), shutdown_agent=shutdown_agent)


def serve(agent: Agent, frontend: McpFrontend) -> None:
    """Serve on ``frontend.host:frontend.port`` until interrupted (or the engine dies)."""
    import uvicorn

    app = create_app(agent, frontend)
    family = socket.AF_INET6 if ":" in frontend.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((frontend.host, frontend.port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{agent.spec.source}: frontend.port: cannot listen on {frontend.host}:"
                          f"{frontend.port}: {exc.strerror or exc}") from None  # fmt: skip
    host = f"[{frontend.host}]" if family == socket.AF_INET6 else frontend.host
    auth = (
        f"; send the header 'Authorization: Bearer ${frontend.api_key_env}'" if frontend.api_key_env else ""
    )
    click.echo(f"MCP server of agent {agent.name!r} (streamable HTTP) at "
               f"http://{host}:{sock.getsockname()[1]}{frontend.path}, tool {app.core.tool_name!r}{auth}",
               err=True)  # fmt: skip
    if frontend.api_key_env is None and not is_loopback(frontend.host):
        log.warning("serving MCP on %s without an API key: anyone who can reach this port can use the agent "
                    "(set frontend.api_key_env)", frontend.host)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
    app.on_engine_death = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[sock])
    if app.engine_died:
        raise engine_died()

"""The agent as an MCP server: :class:`AgentServer` builds the SDK's low-level ``Server`` of one agent.

It offers one tool, the agent (``frontend.tool_name``, default ``agent.name``): ``message`` and an
optional ``session_id`` in, the answer out (text; the session's id in the result's ``_meta``).
Each call is one turn of a recorded session: a new one, or the stored session ``session_id`` names.
While the turn runs, its events go to the client as log messages (``notifications/message``, the
event as JSON: ``text``, ``reasoning``, ``tool_call``, ``tool_result``, ``repair``; text and reasoning
at level ``debug``, tool steps at ``info``; ``logging/setLevel`` filters them) and, when the request
asks with a progress token, as progress notifications with one line for a person. Cancelling the
request (``notifications/cancelled``) cancels the turn: the engine request is aborted and the session
records the turn as cancelled. A call of an ``approval: ask`` tool asks the client through MCP
elicitation when the client supports it, and is refused otherwise. ``expose_tools`` also offers the
agent's own tools, each called directly (same approval rules). Limits: the size of ``message``,
calls at once, and a time limit per turn; every refusal is a tool error that says what is wrong.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
from collections.abc import Awaitable
from contextlib import aclosing, suppress
from typing import TYPE_CHECKING, Any, get_args

import anyio
from mcp import types
from mcp.server.lowlevel import Server
from mcp.server.session import ServerSession
from mcp.shared.context import RequestContext
from mcp.shared.exceptions import McpError

from qwenrun.agent import Agent, Session
from qwenrun.approval import ApprovalRequest, Approver, review, shown_call
from qwenrun.errors import ConfigError, QwenrunError
from qwenrun.events import (
    Event,
    Final,
    ParsedCall,
    Reasoning,
    Repair,
    TextDelta,
    ToolCall,
    ToolResult,
    Usage,
    to_dict,
)
from qwenrun.frontends.base import start_with_status
from qwenrun.frontends.settings import McpFrontend
from qwenrun.sessions.store import valid_session_id
from qwenrun.tools import run_call
from qwenrun.version import __version__

if TYPE_CHECKING:
    from qwenrun.tools import Tool

__all__ = ["SESSION_META", "AgentServer"]

log = logging.getLogger(__name__)

SESSION_META = "qwenrun/session_id"  # the result's _meta key: the session to continue
STOP_META = "qwenrun/stop_reason"  # answer | max_iterations | length
LEVELS: tuple[str, ...] = get_args(types.LoggingLevel)  # debug ... emergency, lowest first
_SHOWN = 200  # characters of a call or a result in a progress line
_APPROVE = {
    "type": "object",
    "properties": {"approve": {"type": "boolean", "title": "Run this call", "default": True}},
}

Context = RequestContext[ServerSession, Any, Any]


def input_schema() -> dict[str, Any]:
    """The agent tool's arguments: ``message`` and an optional ``session_id``."""
    return {
        "type": "object",
        "properties": {
            "message": {"type": "string", "minLength": 1, "description": "What to ask the agent."},
            "session_id": {
                "type": "string",
                "pattern": r"^[A-Za-z0-9_.:\-]{1,128}$",
                "description": "Continue this conversation (the session_id in the _meta of an earlier "
                "result); leave it out to start a new one.",
            },
        },
        "required": ["message"],
        "additionalProperties": False,
    }


class _Refused(Exception):
    """A call that is not run: its message is the tool error the client reads."""


def _error(text: str, meta: dict[str, Any] | None = None) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], isError=True, _meta=meta)


def _elicits(ctx: Context) -> bool:
    """Whether the client said (at initialize) that it answers elicitation requests."""
    wanted = types.ClientCapabilities(elicitation=types.ElicitationCapability())
    return ctx.session.check_client_capability(wanted)


class AgentServer:
    """One agent behind an MCP ``Server`` (:attr:`server`); both transports serve it."""

    def __init__(self, agent: Agent, frontend: McpFrontend) -> None:
        self.agent = agent
        self.frontend = frontend
        self.tool_name = frontend.tool_name or agent.name
        self.running = 0  # calls in progress, of every client
        self.busy: set[str] = set()  # stored sessions with a turn in progress
        self.levels: weakref.WeakKeyDictionary[ServerSession, int] = weakref.WeakKeyDictionary()
        self._ready = asyncio.Event()
        self._start_error: BaseException | None = None
        if frontend.expose_tools:
            self._check_names()
        self.server: Server[Any, Any] = Server(
            agent.name, __version__, instructions=agent.spec.agent.description or None
        )
        self._register()

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the agent (engine, MCP servers) with a status line; calls wait for this."""
        try:
            await start_with_status(self.agent)
            if self.frontend.expose_tools:
                self._check_names()  # the agent's MCP servers' tools joined at start
        except BaseException as exc:
            self._start_error = exc
            raise
        finally:
            self._ready.set()

    async def until_ready(self) -> None:
        await self._ready.wait()
        if self._start_error is not None:
            raise _Refused(f"Error: the agent did not start: {self._start_error}")

    def _check_names(self) -> None:
        if self.tool_name in self.agent.tools:
            raise ConfigError(
                f"{self.agent.spec.source}: frontend.tool_name: {self.tool_name!r} is also the name of one "
                "of the agent's tools, which expose_tools offers too; set frontend.tool_name"
            )

    # -- the protocol ----------------------------------------------------------------------------

    def _register(self) -> None:
        server = self.server

        @server.list_tools()  # type: ignore[no-untyped-call, untyped-decorator]
        async def list_tools() -> list[types.Tool]:
            return await self.tools()

        @server.call_tool(validate_input=False)  # type: ignore[untyped-decorator]
        async def call_tool(name: str, arguments: dict[str, Any]) -> types.CallToolResult:
            return await self.call(server.request_context, name, arguments)

        @server.set_logging_level()  # type: ignore[no-untyped-call, untyped-decorator]
        async def set_level(level: types.LoggingLevel) -> None:
            self.levels[server.request_context.session] = LEVELS.index(level)

    async def tools(self) -> list[types.Tool]:
        """The agent's tool, then (``expose_tools``) the agent's own tools."""
        spec = self.agent.spec
        description = spec.agent.description or f"Ask the agent {self.agent.name!r} (a qwenrun agent)."
        listed = [
            types.Tool(
                name=self.tool_name,
                title=self.agent.name,
                description=f"{description} Returns its answer; pass the session_id of the result's "
                "_meta to continue the conversation.",
                inputSchema=input_schema(),
                annotations=types.ToolAnnotations(readOnlyHint=False, openWorldHint=True),
            )
        ]
        if self.frontend.expose_tools:
            with suppress(_Refused):  # a failed start: the entry-point tools are listed all the same
                await self.until_ready()  # an MCP server's tools are known once it started
            listed += [_listed(tool) for tool in self.agent.tools.values()]
        return listed

    async def call(self, ctx: Context, name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        """One ``tools/call``: the agent's turn or one of its tools; a refusal is a tool error."""
        limit = self.frontend.max_concurrent_calls
        if self.running >= limit:
            return _error(f"Error: the server is busy: {self.running} calls are in progress "
                          f"(frontend.max_concurrent_calls: {limit}); retry later")  # fmt: skip
        self.running += 1
        try:
            if name == self.tool_name:
                return await self._ask(ctx, arguments)
            if self.frontend.expose_tools and name in self.agent.tools:
                return await self._run_tool(ctx, self.agent.tools[name], arguments)
            offered = [self.tool_name, *(self.agent.tools if self.frontend.expose_tools else ())]
            return _error(f"Error: unknown tool {name!r}; this server offers: {', '.join(offered)}")
        except _Refused as exc:
            return _error(str(exc))
        finally:
            self.running -= 1

    # -- the agent's turn ------------------------------------------------------------------------

    def _arguments(self, arguments: dict[str, Any]) -> tuple[str, str | None]:
        where = f"Error: invalid arguments for {self.tool_name}"
        unknown = sorted(set(arguments) - {"message", "session_id"})
        if unknown:
            raise _Refused(f"{where}: unknown argument(s) {', '.join(map(repr, unknown))}; "
                           "expected message and optionally session_id")  # fmt: skip
        message, session_id = arguments.get("message"), arguments.get("session_id")
        if not isinstance(message, str) or not message.strip():
            got = "nothing" if message is None else f"{type(message).__name__} {str(message)[:40]!r}"
            raise _Refused(f"{where}: message: expected the question as a non-empty string, got {got}")
        size, most = len(message.encode("utf-8", "surrogatepass")), self.frontend.max_request_bytes
        if size > most:
            raise _Refused(f"{where}: message: {size} bytes, more than frontend.max_request_bytes ({most})")
        if session_id is not None:
            if not isinstance(session_id, str) or not valid_session_id(session_id):
                raise _Refused(f"{where}: session_id: expected 1 to 128 characters of A-Z a-z 0-9 _ . : -, "
                               f"got {str(session_id)[:40]!r}")  # fmt: skip
            if self.agent.store is None:
                raise _Refused(f"{where}: session_id: agent {self.agent.name!r} records no sessions "
                               "(sessions.enabled is false in its file)")  # fmt: skip
        return message, session_id

    async def _session(self, ctx: Context, session_id: str | None) -> Session:
        approver = self._approver(ctx)
        if session_id is None:
            return self.agent.session(uuid.uuid4().hex, approver=approver)
        if session_id in self.busy:
            raise _Refused(f"Error: session {session_id!r} has a turn in progress; retry when it ends")
        self.busy.add(session_id)
        try:
            return await asyncio.to_thread(self.agent.session, session_id, approver=approver)
        except BaseException:
            self.busy.discard(session_id)
            raise

    async def _ask(self, ctx: Context, arguments: dict[str, Any]) -> types.CallToolResult:
        message, session_id = self._arguments(arguments)
        await self.until_ready()
        session = await self._session(ctx, session_id)
        meta = {SESSION_META: session.id}
        report = _Reporter(ctx, self)
        timeout = self.frontend.turn_timeout_s
        final: Final | None = None
        try:
            with anyio.move_on_after(timeout) as limit:
                async with aclosing(session.stream(message)) as events:
                    async for event in events:
                        if isinstance(event, Final):
                            final = event
                        else:
                            await report(event)
        except QwenrunError as exc:  # the engine failed or refused: the session goes on
            log.warning("session %s: %s", session.id, exc)
            return _error(f"Error: {exc}", meta)
        finally:
            if session_id is not None:
                self.busy.discard(session_id)
        if limit.cancelled_caught or final is None:
            return _error(f"Error: the agent did not answer within {timeout:g} s (frontend.turn_timeout_s); "
                          "the turn was stopped", meta)  # fmt: skip
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=final.text)],
            isError=False,
            _meta={**meta, STOP_META: final.stop_reason},
        )

    # -- approval --------------------------------------------------------------------------------

    def _approver(self, ctx: Context) -> Approver | None:
        """An approver that asks the client by elicitation, or None (``ask`` calls are refused)."""
        if not _elicits(ctx):
            return None
        timeout = self.frontend.approval_timeout_s

        async def approve(request: ApprovalRequest) -> bool:
            origin = f" ({request.origin})" if request.origin else ""
            asked = f"The agent {self.agent.name!r} wants to run {request.shown()}{origin}. Allow it?"
            with anyio.move_on_after(timeout):
                try:
                    answer = await ctx.session.elicit_form(asked, _APPROVE, related_request_id=ctx.request_id)
                except McpError as exc:  # the client failed to ask: refuse
                    log.warning("elicitation failed: %s", exc.error.message)
                    return False
                return answer.action == "accept" and (answer.content or {}).get("approve", True) is True
            log.info("no answer to the approval of %s within %g s: refused", request.call.name, timeout)
            return False

        return approve

    # -- the agent's own tools (expose_tools) ----------------------------------------------------

    async def _run_tool(self, ctx: Context, tool: Tool, arguments: dict[str, Any]) -> types.CallToolResult:
        await self.until_ready()
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        approver = self._approver(ctx)
        event = ToolCall(call_id, tool.name, arguments)
        verdict = self.agent.verdict(event)  # `permissions:` rules, else the tool's approval
        if verdict.mode == "ask" and approver is None:
            why = "approval: ask" if verdict.rule is None else f"the rule {verdict.reason()}"
            return _error(
                f"Error: {tool.name} needs a person's approval ({why}), and this client cannot "
                "be asked: it does not support MCP elicitation; the call was not run"
            )
        refused = await review(event, verdict.mode, tool.origin, approver, verdict.reason())
        if refused is not None:
            return _error(refused.content)
        settings = self.agent.spec.agent
        call = ParsedCall(call_id, tool.name, arguments, "")
        result = await run_call(self.agent.tools, call, timeout_s=settings.timeout_s,
                                limit=settings.max_tool_output_chars)  # fmt: skip
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=result.content)], isError=result.is_error
        )


def _listed(tool: Tool) -> types.Tool:
    return types.Tool(name=tool.name, description=tool.description or None, inputSchema=tool.parameters)


class _Reporter:
    """Sends the events of one turn to the client that asked: log messages and progress."""

    def __init__(self, ctx: Context, owner: AgentServer) -> None:
        self.session = ctx.session
        self.request_id = ctx.request_id
        self.token = ctx.meta.progressToken if ctx.meta is not None else None
        self.owner = owner
        self.logger = f"qwenrun.{owner.agent.name}"
        self.steps = 0
        self.seen: set[str] = set()  # text / reasoning already announced in this model call

    async def __call__(self, event: Event) -> None:
        if isinstance(event, Usage):  # a model call ended
            self.seen.clear()
            return
        level: types.LoggingLevel = "debug" if isinstance(event, TextDelta | Reasoning) else "info"
        if self.owner.levels.get(self.session, 0) <= LEVELS.index(level):
            data = to_dict(event)
            await _sent(
                self.session.send_log_message(level, data, self.logger, related_request_id=self.request_id)
            )
        line = _progress_line(event, self.seen)
        if line is not None and self.token is not None:
            self.steps += 1
            related = str(self.request_id)
            await _sent(self.session.send_progress_notification(self.token, self.steps, None, line, related))


async def _sent(notification: Awaitable[None]) -> None:
    """Send a notification; a client that went away misses it (its turn ends with the transport)."""
    with suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
        await notification


def _progress_line(event: Event, seen: set[str]) -> str | None:
    """What a person reads about ``event`` while the agent works (None: nothing new)."""
    if isinstance(event, Reasoning | TextDelta):
        if event.type in seen:
            return None
        seen.add(event.type)
        return "thinking" if isinstance(event, Reasoning) else "writing the answer"
    if isinstance(event, ToolCall):
        return f"calling {_cut(shown_call(event.name, event.arguments))}"
    if isinstance(event, ToolResult):
        state = "failed" if event.is_error else "returned"
        return f"{event.name} {state}: {_cut(' '.join(event.content.split()))}"
    if isinstance(event, Repair):
        return _cut(event.reason)
    return None


def _cut(text: str) -> str:
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."

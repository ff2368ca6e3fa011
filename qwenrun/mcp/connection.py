"""One MCP server as qwenrun runs it: a supervisor task that owns the SDK's client session.

The SDK's transports (``stdio_client``, ``streamable_http_client``) and ``ClientSession`` are anyio
task groups that one task must enter and leave (python-sdk #79, #922: "Attempted to exit cancel
scope in a different task"), so a supervisor task per server opens them, publishes the session and
closes them when asked; any task may call tools on the session meanwhile. The supervisor notices a
server that went away (the messages from it end: the process exited, the HTTP transport failed),
logs it, and starts it again after a backoff (0.5 s, doubling up to 30 s; back to 0.5 s once it
came up). Leaving the stdio transport closes the server's stdin, waits 2 s, then sends SIGTERM and
SIGKILL to its process group (the SDK's shutdown sequence). Each stdio server also gets a marker
variable (:mod:`qwenrun.mcp.processes`): the supervisor watches the server's process (a child that
keeps its stdout open would hide its death), and every process that still carries the marker once
the server has gone is killed: :meth:`McpConnection.close` leaves no process of the server behind,
hung, crashed or not.

A call waits for a server that is starting (or restarts within ``RETRY_WAIT_S``) and fails at once
with the last error of one that is down. A call given up (its time limit, a cancelled turn) is
cancelled on the server too (``notifications/cancelled``: a qwenrun agent behind it stops its
turn). A call that ends without an answer (its time limit, a cancelled turn, a closed connection)
makes the supervisor ping the server; without an answer in
``PING_TIMEOUT_S`` it is restarted (a streamable HTTP server that dies mid-call leaves that call
waiting forever: python-sdk #1577). The server's stderr goes to a pipe: its last lines end the
error messages, all of them are logged at debug level. On ``notifications/tools/list_changed`` the
supervisor lists the tools again (the handler that receives it must not wait for an answer itself)
and hands the new list to ``on_tools_changed``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO, TypeVar

from qwenrun.errors import ConfigError, ToolError
from qwenrun.mcp import processes
from qwenrun.mcp.failures import ServerGone, describe
from qwenrun.mcp.spec import McpStdioServer, McpToolsSpec
from qwenrun.spec.loading import secret_from_env
from qwenrun.version import __version__

if TYPE_CHECKING:
    from mcp import ClientSession, types

__all__ = ["McpConnection"]

log = logging.getLogger(__name__)
T = TypeVar("T")

State = Literal["stopped", "starting", "ready", "down"]
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
PING_TIMEOUT_S = 5.0
STDERR_LINES = 40
MAX_TOOLS = 1000
RETRY_WAIT_S = 2.0  # a call waits for a restart due this soon, instead of failing at once
WATCH_S = 0.5  # how often the supervisor looks whether a stdio server's process still runs


class McpConnection:
    """One server of an agent file: start it, call its tools, restart it when it dies, stop it."""

    def __init__(
        self, spec: McpToolsSpec, where: str, base_dir: Path | None = None, *, restart: bool = True
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.where = where  # "agents/x.yaml: tools[2]", for error messages
        self.base_dir = base_dir  # a relative `cwd` is relative to it (the agent file's folder)
        self.restart = restart  # False: one attempt only (`qwenrun tools --doctor`)
        self.state: State = "stopped"
        self.error: str | None = None  # why it is down (or why it went down last)
        self.failures = 0  # crashes and failed starts, for reports
        self.listed: list[types.Tool] = []  # the server's tools as it listed them last
        self.on_ready: Callable[[McpConnection], None] | None = None  # after each (re)start
        self.on_tools_changed: Callable[[McpConnection], None] | None = None  # after a new tools/list
        self._session: ClientSession | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._stderr_lock = threading.Lock()
        self._drain: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = False
        self._ended = False
        self._check = False
        self._relist = False  # the server said that its tool list changed
        self._gone = asyncio.Event()
        self._stop = asyncio.Event()
        self._next_start: float | None = None  # loop time of the next start of a server that is down
        self.marker = f"{os.getpid()}-{secrets.token_hex(8)}"  # in the stdio server's environment

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the supervisor; return when the first attempt is over (ready, or down)."""
        if self._task is None or self._task.done():
            self._stopping, self._changed, self._wake, self._stop = False, *(asyncio.Event() for _ in "123")
            self._set("starting")
            self._task = asyncio.create_task(self._supervise(), name=f"qwenrun-mcp-{self.name}")
        while self.state == "starting" and not self._task.done():
            await self._changed.wait()

    async def close(self) -> None:
        """Stop the server and its supervisor; its processes are gone when this returns."""
        self._stopping = True
        self._stop.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await task
            except Exception:  # a bug of the supervisor: the server is closed anyway
                log.exception("MCP server %r: error while stopping", self.name)
        self._set("stopped", self.error)

    def _set(self, state: State, error: str | None = None) -> None:
        self.state, self.error = state, error
        self._changed.set()
        self._changed = asyncio.Event()

    async def _supervise(self) -> None:
        delay = BACKOFF_FIRST_S
        while not self._stopping:
            if self.state != "starting":
                self._set("starting")
            fatal = False
            try:
                await self._serve_once()
                error = "the server closed the connection"
            except ConfigError as exc:  # a variable that is not set: no retry fixes that
                error, fatal = str(exc), True
            except Exception as exc:
                error = describe(exc, self.spec.startup_timeout_s)
            await self._reap()
            if self._stopping:
                break
            came_up, self._session = self.state == "ready", None
            delay = BACKOFF_FIRST_S if came_up else delay
            error += await self._stderr_tail()
            again = self.restart and not fatal
            self._set("down", error + (f" (next start in {delay:g} s)" if again else ""))
            self.failures += 1
            what = "stopped" if came_up else "failed to start"
            level = logging.WARNING if self.restart else logging.DEBUG  # else the caller reports it
            log.log(level, "MCP server %r (%s) %s: %s%s", self.name, self.where, what, error,
                    f"; restarting in {delay:g} s" if again else "")  # fmt: skip
            if not again:
                return
            self._wake.clear()
            self._next_start = asyncio.get_running_loop().time() + delay
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._next_start = None
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _serve_once(self) -> None:
        """Open the transport and the session, list the tools, then wait for stop or death."""
        from mcp import ClientSession
        from mcp import types as mcp_types

        self._ended = self._check = self._relist = False
        self._wake.clear()
        self._gone = gone = asyncio.Event()  # the calls on this session stop waiting when it is set
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(gone.set)
            read, write = await self._open(stack)
            pid = await self._server_pid()  # before any call: one that kills it may come at once
            session = await stack.enter_async_context(
                ClientSession(
                    await self._watch(stack, read),
                    write,
                    message_handler=self._on_message,
                    logging_callback=self._on_log,
                    client_info=mcp_types.Implementation(name="qwenrun", version=__version__),
                )
            )
            self.listed = await self._initialize(session)
            if self._stopping:
                return
            self._session = session
            self._set("ready")
            if self.on_ready is not None:
                self.on_ready(self)
            while True:
                try:
                    await asyncio.wait_for(self._wake.wait(), WATCH_S if pid else None)
                except TimeoutError:
                    if pid is None or processes.alive(pid):
                        continue
                    raise ServerGone("the server process exited") from None
                self._wake.clear()
                if self._stopping:
                    return
                if self._ended:
                    raise ServerGone("the server closed the connection")
                if self._check:
                    self._check = False
                    await self._ping(session)
                if self._relist:
                    self._relist = False
                    await self._list_again(session)

    async def _initialize(self, session: ClientSession) -> list[types.Tool]:
        """``initialize`` and ``tools/list`` within ``startup_timeout_s`` (a stop cuts it short)."""

        async def handshake() -> list[types.Tool]:
            await session.initialize()
            return await _list_tools(session)

        started = await self._until_stop(handshake(), self.spec.startup_timeout_s)
        if self._stopping:
            return []
        if not started.done() or started.cancelled():
            raise TimeoutError
        return started.result()

    async def _until_stop(self, work: Coroutine[Any, Any, T], timeout: float | None) -> asyncio.Future[T]:
        """Run ``work`` until it ends, a stop comes or ``timeout`` passes; its future (cancelled
        unless it ended)."""
        future = asyncio.ensure_future(work)
        future.add_done_callback(_retrieve)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({future, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not future.done():
                future.cancel()
        return future

    async def _list_again(self, session: ClientSession) -> None:
        """``tools/list`` after ``notifications/tools/list_changed``; the new list goes to
        ``on_tools_changed``. An error answer keeps the old list; no answer within
        ``startup_timeout_s`` is ServerGone (a stop cuts the wait short)."""
        from mcp.shared.exceptions import McpError

        listing = await self._until_stop(_list_tools(session), self.spec.startup_timeout_s)
        if self._stopping:
            return
        if not listing.done() or listing.cancelled():
            if self._ended:
                raise ServerGone("the server closed the connection")
            raise ServerGone(f"it did not answer tools/list within {self.spec.startup_timeout_s:g} s "
                             "after it said that its tools changed")  # fmt: skip
        error = listing.exception()
        if isinstance(error, McpError):
            log.warning("MCP server %r (%s) said that its tools changed, then failed to list them: %s; "
                        "its tools stay as they were", self.name, self.where, describe(error))  # fmt: skip
            return
        if error is not None:
            raise error
        self.listed = listing.result()
        log.info("MCP server %r: its tools changed: %s", self.name, ", ".join(t.name for t in self.listed))
        if self.on_tools_changed is not None:
            self.on_tools_changed(self)

    async def _ping(self, session: ClientSession) -> None:
        """ServerGone unless the server answers a ping in time (a stop cuts the wait short)."""
        ping = await self._until_stop(session.send_ping(), PING_TIMEOUT_S)
        if self._stopping or (ping.done() and not ping.cancelled() and ping.exception() is None):
            return
        if self._ended:
            raise ServerGone("the server closed the connection")
        raise ServerGone(f"it did not answer a ping within {PING_TIMEOUT_S:g} s after a call failed")

    async def _open(self, stack: contextlib.AsyncExitStack) -> tuple[Any, Any]:
        server = self.spec.mcp
        where = f"{self.where}.mcp"
        if isinstance(server, McpStdioServer):
            from mcp import StdioServerParameters
            from mcp.client.stdio import stdio_client

            env = {**server.env, processes.MARKER: self.marker}
            for name in server.pass_env:
                hint = f"MCP server {self.name!r} needs it (pass_env)"
                env[name] = secret_from_env(name, f"{where}.pass_env", "value", "GITHUB_TOKEN", hint)
            cwd = Path(server.cwd) if server.cwd else None
            if cwd is not None and not cwd.is_absolute() and self.base_dir is not None:
                cwd = self.base_dir / cwd
            parameters = StdioServerParameters(command=server.command, args=server.args, env=env, cwd=cwd)
            errlog = self._stderr_pipe()
            try:
                read, write = await stack.enter_async_context(stdio_client(parameters, errlog=errlog))
            finally:
                errlog.close()  # the child has its own copy; EOF comes when the server is gone
            return read, write
        import httpx
        from mcp.client.streamable_http import streamable_http_client

        headers = dict(server.headers)
        for header, name in server.headers_env.items():
            hint = f"it holds the {header} header of MCP server {self.name!r}"
            key = f"{where}.headers_env.{header}"
            headers[header] = secret_from_env(name, key, "value", "FILES_TOKEN", hint)
        client = await stack.enter_async_context(
            httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30, read=300), follow_redirects=False)
        )
        transport = streamable_http_client(server.url, http_client=client)
        read, write, _ = await stack.enter_async_context(transport)
        return read, write

    async def _watch(self, stack: contextlib.AsyncExitStack, read: Any) -> Any:
        """A stream of the transport's messages that tells the supervisor when they end."""
        import anyio
        from mcp.shared.message import SessionMessage

        send, receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        stack.push_async_callback(receive.aclose)
        stack.push_async_callback(send.aclose)
        group = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(group.cancel_scope.cancel)

        async def forward() -> None:
            try:
                async with read, send:
                    async for message in read:
                        await send.send(message)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass
            finally:
                self._ended = True
                self._wake.set()

        group.start_soon(forward)
        return receive

    # -- calls ---------------------------------------------------------------------------------

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        """Call the server's tool ``name``. ToolError when the server is down or the call fails
        at the protocol level (an MCP error, a closed connection); cancellation propagates."""
        from mcp.shared.exceptions import McpError
        from mcp.types import CONNECTION_CLOSED

        session, gone = await self._ready_session()
        sent: list[int] = []  # the call's request id

        async def call_tool() -> types.CallToolResult:
            # The SDK hides the id and sends no notifications/cancelled when a call is given up
            # (python-sdk #230, #2507); send_request takes `_request_id` before its first await.
            sent.append(session._request_id)
            return await session.call_tool(name, arguments)

        # Not just `await session.call_tool`: a session that closes (the server died) can leave its
        # pending requests unanswered (the SDK cancels its receive loop on exit), so also wait for
        # the supervisor to say that this session is gone.
        call = asyncio.ensure_future(call_tool())
        call.add_done_callback(_retrieve)
        ended = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({call, ended}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the time limit, a cancelled turn: the server stops the call too
            call.cancel()
            if sent:
                _cancel_request(session, sent[0], self.name)
            self.check()
            raise
        finally:
            ended.cancel()
        if not call.done():
            call.cancel()
            raise ToolError(
                f"MCP server {self.name!r} closed the connection during the call; it is restarted"
            )
        try:
            return call.result()
        except McpError as exc:
            if exc.error.code == CONNECTION_CLOSED:
                self.check()
                raise ToolError(
                    f"MCP server {self.name!r} closed the connection during the call; it is restarted"
                ) from None
            raise ToolError(f"MCP server {self.name!r}: {exc.error.message}") from None
        except Exception as exc:  # the transport failed under the call
            self.check()
            raise ToolError(f"MCP server {self.name!r}: the call failed: {describe(exc)}") from None

    def check(self) -> None:
        """Ask the supervisor to ping the server (and restart it if it does not answer)."""
        self._check = True
        self._wake.set()

    async def _ready_session(self) -> tuple[ClientSession, asyncio.Event]:
        retried = False
        while True:
            if self.state == "ready" and self._session is not None:
                return self._session, self._gone
            due = self._next_start
            soon = due is not None and due - asyncio.get_running_loop().time() <= RETRY_WAIT_S
            if self.state == "down" and soon and not retried:
                retried = True  # wait for that one attempt only
                await self._changed.wait()
                continue
            if self.state != "starting":
                raise ToolError(f"MCP server {self.name!r} is not running: {self.error or 'stopped'}")
            await self._changed.wait()

    # -- what the server says besides answers ---------------------------------------------------

    async def _on_message(self, message: Any) -> None:
        from mcp import types as mcp_types

        if isinstance(message, Exception):
            log.warning("MCP server %r sent something that is not MCP: %s", self.name, describe(message))
        elif isinstance(message, mcp_types.ServerNotification) and isinstance(
            message.root, mcp_types.ToolListChangedNotification
        ):  # listed by the supervisor: this handler runs in the session's receive loop
            self._relist = True
            self._wake.set()

    async def _on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        log.debug("MCP server %r [%s]: %s", self.name, params.level, params.data)

    def _stderr_pipe(self) -> TextIO:
        """A pipe for the server's stderr, read by a daemon thread into :attr:`_stderr`."""
        read_fd, write_fd = os.pipe()
        reader = os.fdopen(read_fd, "r", encoding="utf-8", errors="replace")
        with self._stderr_lock:
            self._stderr.clear()

        def drain() -> None:
            with reader:
                for line in reader:
                    text = line.rstrip()[:500]
                    log.debug("MCP server %r stderr: %s", self.name, text)
                    with self._stderr_lock:
                        self._stderr.append(text)

        self._drain = threading.Thread(target=drain, name=f"qwenrun-mcp-{self.name}-stderr", daemon=True)
        self._drain.start()
        return os.fdopen(write_fd, "w")

    async def _server_pid(self) -> int | None:
        """The pid of the stdio server's process (qwenrun's child that carries the marker)."""
        if not isinstance(self.spec.mcp, McpStdioServer):
            return None
        found = await asyncio.to_thread(processes.marked, self.marker)
        return next((pid for pid, parent in found if parent == os.getpid()), None)

    async def _reap(self) -> None:
        """Kill what is left of a stdio server that has gone: every process with its marker."""
        if isinstance(self.spec.mcp, McpStdioServer):
            for pid in await asyncio.to_thread(processes.kill_marked, self.marker):
                log.warning("MCP server %r left process %s behind; it was killed", self.name, pid)

    async def _stderr_tail(self, lines: int = 8) -> str:
        """The last lines the server wrote on stderr, as the end of an error message."""
        for _ in range(20):  # the server has exited: its last lines come within moments
            if self._drain is None or not self._drain.is_alive():
                break
            await asyncio.sleep(0.05)
        with self._stderr_lock:
            tail = [line for line in self._stderr if line.strip()][-lines:]
        return "; its stderr ends with:\n  " + "\n  ".join(tail) if tail else ""


def _cancel_request(session: ClientSession, request_id: int, server: str) -> None:
    """Tell the server that the call ``request_id`` is given up (MCP's ``notifications/cancelled``),
    without waiting: the caller is being cancelled."""
    from mcp import types

    params = types.CancelledNotificationParams(requestId=request_id, reason="the call was given up")
    notification = types.ClientNotification(types.CancelledNotification(params=params))
    sending = asyncio.ensure_future(session.send_notification(notification))
    sending.add_done_callback(_retrieve)
    log.debug("MCP server %r: cancelled request %s", server, request_id)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a call's outcome as seen: a call given up on must not log 'never retrieved'."""
    if not task.cancelled():
        task.exception()


async def _list_tools(session: ClientSession) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor: str | None = None
    while len(tools) < MAX_TOOLS:
        result = await session.list_tools(cursor)
        tools.extend(result.tools)
        cursor = result.nextCursor
        if not cursor:
            break
    return tools[:MAX_TOOLS]

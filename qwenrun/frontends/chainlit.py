"""The Chainlit front end (``frontend.kind: chainlit``): ``qwenrun up agent.yaml`` serves a chat UI.

Thin: agent events become Chainlit messages and steps, nothing else. Chainlit's server and the
engine share one process and one event loop; the engine starts once, before the port opens, and
every chat session shares the one :class:`~qwenrun.agent.Agent`. Each chat session keeps its own
:class:`~qwenrun.agent.Session` (multi-turn history) in ``cl.user_session``. The answer streams
token by token; the model's reasoning streams into a collapsed ``Reasoning`` step (type ``llm``);
each tool call is a ``cl.Step`` of type ``tool`` under the turn's run; tool and engine errors show
in the chat; the stop button cancels the turn and the session stays usable. A call of an
``approval: ask`` tool waits for the Approve / Reject buttons of an action message.

No ``app.py`` and no ``chainlit run``: :func:`build_app` registers the callbacks on Chainlit's
(process-global) config and :func:`serve` serves ``chainlit.server.app`` with uvicorn like
``chainlit.cli.run_chainlit`` does, without its ``nest_asyncio.apply()``. Chainlit writes
``.chainlit/`` and ``.files/`` into its app root at import time, so it is imported with a private
temporary root (unless ``CHAINLIT_APP_ROOT`` is set) and the working directory stays clean.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hmac
import importlib
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from qwenrun.agent import Agent, Session
from qwenrun.approval import ApprovalRequest, Approver, escape
from qwenrun.config import AgentSpec
from qwenrun.errors import ConfigError, MissingExtraError, QwenrunError
from qwenrun.events import Event, Final, Reasoning, Repair, TextDelta, ToolCall, ToolResult, Usage
from qwenrun.frontends import ChainlitFrontend
from qwenrun.frontends.base import Launch, start_with_status
from qwenrun.loading import secret_from_env

__all__ = [
    "ChatApp",
    "TurnView",
    "answer",
    "build_app",
    "chat_approver",
    "check_password",
    "import_chainlit",
    "reload_agent",
    "run",
    "serve",
]

log = logging.getLogger(__name__)

APP_ROOT_ENV = "CHAINLIT_APP_ROOT"
AUTH_SECRET_ENV = "CHAINLIT_AUTH_SECRET"
REASONING_STEP = "Reasoning"  # the name of the step the model's thinking streams into
SESSION_KEY = "qwenrun_session"
TASK_KEY = "qwenrun_task"
_HTML_UNSAFE = set('<>"')

_owned_root: str | None = None  # the temporary app root qwenrun made for Chainlit's import, if any


class ChatApp:
    """The agent every chat session of the UI talks to (:func:`reload_agent` swaps it) and
    Chainlit's ASGI app that serves it. Chainlit keeps its callbacks in process-wide config, so a
    process serves one chat app; qwenrun keeps its own state here, not in module globals."""

    def __init__(self, agent: Agent, asgi: Any) -> None:
        self.agent = agent
        self.asgi = asgi


def import_chainlit() -> Any:
    """Import chainlit (typed ``Any``: it is an optional extra), under a private app root.

    Raises :class:`MissingExtraError` when the ``chainlit`` extra is not installed.
    """
    global _owned_root
    if "chainlit" not in sys.modules and not os.environ.get(APP_ROOT_ENV):
        root = _owned_root = tempfile.mkdtemp(prefix="qwenrun-chainlit-")
        atexit.register(shutil.rmtree, root, True)
        os.environ[APP_ROOT_ENV] = root
        try:
            return _import("chainlit")
        finally:  # chainlit.config read it at import time; keep the process environment as it was
            os.environ.pop(APP_ROOT_ENV, None)
    return _import("chainlit")


def _import(name: str) -> Any:
    try:
        with warnings.catch_warnings():
            # literalai -> traceloop uses pydantic's class-based config: not actionable here.
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(name)
    except ImportError as exc:
        raise MissingExtraError("chainlit", "chainlit") from exc


def _frontend(spec: AgentSpec) -> ChainlitFrontend:
    front = spec.frontend
    if not isinstance(front, ChainlitFrontend):
        raise ConfigError(f"{spec.source}: frontend.kind: expected 'chainlit', got {front.kind!r}")
    return front


def _title(spec: AgentSpec) -> str:
    title = _frontend(spec).title or spec.agent.name
    if _HTML_UNSAFE & set(title):
        # Chainlit pastes the name into its HTML page unescaped (<title>, <meta content="...">).
        raise ConfigError(f'{spec.source}: frontend.title: must not contain <, > or "')
    return title


def check_password(front: ChainlitFrontend, expected: str, username: str, password: str) -> bool:
    """Constant-time check of a login against ``frontend.username`` and the password."""
    same_user = hmac.compare_digest(username.encode(), front.username.encode())
    same_password = hmac.compare_digest(password.encode(), expected.encode())
    return same_user and same_password


def build_app(agent: Agent) -> ChatApp:
    """Register the chat callbacks of ``agent`` on Chainlit's global config.

    Title, welcome text, starters and password login come from ``agent.spec.frontend``. Calling it
    again replaces the previous agent and settings (Chainlit has one app per process).
    """
    spec = agent.spec
    front = _frontend(spec)
    title = _title(spec)
    password: str | None = None
    if front.password_env:
        where, hint = f"{spec.source}: frontend.password_env", "it holds the login password"
        password = secret_from_env(front.password_env, where, "password", "QWENRUN_CHAT_PASSWORD", hint)
    cl = import_chainlit()
    config = _import("chainlit.config").config
    logging.getLogger("chainlit").addFilter(_quiet)
    config.ui.name = title
    config.ui.description = spec.agent.description
    config.run.headless = True  # never open a browser on the server
    config.features.edit_message = False  # a qwenrun session cannot rewind its history
    if config.features.spontaneous_file_upload is not None:
        config.features.spontaneous_file_upload.enabled = False  # the agent reads text only

    chat = ChatApp(agent, _import("chainlit.server").app)

    async def on_chat_start() -> None:
        _new_session(chat, cl)
        if front.welcome:
            # A system message keeps Chainlit's welcome screen (and its starters) on display.
            await cl.Message(content=front.welcome, author=title, type="system_message").send()

    async def on_message(message: Any) -> None:
        session = cl.user_session.get(SESSION_KEY)
        if not isinstance(session, Session):
            session = _new_session(chat, cl)
        cl.user_session.set(TASK_KEY, asyncio.current_task())
        try:
            await answer(session, str(message.content), TurnView(cl, title))
        finally:
            cl.user_session.set(TASK_KEY, None)

    async def on_chat_resume(thread: Any) -> None:
        _new_session(chat, cl)

    async def on_stop() -> None:
        # Chainlit cancels its current task too; this makes sure it is the running turn.
        task = cl.user_session.get(TASK_KEY)
        if isinstance(task, asyncio.Task) and not task.done() and not task.cancelling():
            task.cancel()

    async def set_starters(user: Any = None, language: Any = None) -> list[Any]:
        return [cl.Starter(label=item.label, message=item.message) for item in front.starters]

    async def on_app_shutdown() -> None:
        # Chainlit's lifespan ends with os._exit(0): this is the last chance to stop the engine.
        await chat.agent.shutdown()
        if _owned_root is not None:  # atexit does not run after os._exit
            shutil.rmtree(_owned_root, ignore_errors=True)

    cl.on_chat_start(on_chat_start)
    cl.on_message(on_message)
    cl.on_stop(on_stop)
    cl.on_chat_resume(on_chat_resume)
    cl.set_starters(set_starters)
    cl.on_app_shutdown(on_app_shutdown)
    if password is not None:
        expected = password

        async def password_auth(username: str, password: str) -> Any:
            if check_password(front, expected, username, password):
                return cl.User(identifier=username, metadata={"provider": "credentials"})
            return None

        cl.password_auth_callback(password_auth)
        if not os.environ.get(AUTH_SECRET_ENV):  # signs the login JWTs; a restart logs users out
            os.environ[AUTH_SECRET_ENV] = secrets.token_urlsafe(48)
    else:
        config.code.password_auth_callback = None
    return chat


def _quiet(record: logging.LogRecord) -> bool:
    """Drop Chainlit's warning on every page load that there is no translated chainlit.md."""
    return not record.getMessage().startswith("Translated markdown file")


def _new_session(chat: ChatApp, cl: Any) -> Session:
    # The chat's thread id: a thread Chainlit resumes (with a data layer) gets its stored history.
    spec = chat.agent.spec
    approver = chat_approver(cl, _title(spec), _frontend(spec).approval_timeout_s)
    session = chat.agent.session(cl.context.session.thread_id, approver=approver)
    cl.user_session.set(SESSION_KEY, session)
    return session


def chat_approver(cl: Any, author: str, timeout_s: float) -> Approver:
    """Ask in the chat before a call runs: an action message with the call (escaped, in a code
    block) and Approve / Reject buttons. No answer within ``timeout_s`` rejects the call."""

    async def approve(request: ApprovalRequest) -> bool:
        text = request.shown() + (f"\nfrom {escape(request.origin)}" if request.origin else "")
        fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
        actions = [
            cl.Action(name="approve", payload={"approved": True}, label="Approve"),
            cl.Action(name="reject", payload={"approved": False}, label="Reject"),
        ]
        content = f"Run this tool call?\n\n{fence}\n{text}\n{fence}"
        ask = cl.AskActionMessage(content=content, actions=actions, author=author, timeout=timeout_s)
        answer = await ask.send()
        return isinstance(answer, dict) and answer.get("payload", {}).get("approved") is True

    return approve


async def answer(session: Session, prompt: str, view: TurnView) -> None:
    """Run one turn of ``session`` and show its events in ``view``.

    A failure (engine down, a bug) becomes an error message in the chat; cancellation (the stop
    button) closes what is open and propagates. Either way the session stays usable.
    """
    try:
        events = session.stream(prompt)
        async with contextlib.aclosing(events):
            async for event in events:
                await view.show(event)
    except asyncio.CancelledError:
        await view.close("stopped")
        raise
    except Exception as exc:  # shown to the user; the next message starts a fresh turn
        log.exception("turn of session %s failed", session.id)
        await view.close("interrupted by an error")
        await view.error(f"{type(exc).__name__}: {exc}")


class TurnView:
    """Shows the events of one turn as Chainlit messages and steps, in the order they come.

    Reasoning streams into a ``Reasoning`` step (collapsed; it ends when anything else comes).
    Text streams into an assistant message; a tool call ends it and opens a ``tool`` step (input:
    the arguments as JSON) that its result closes (output; ``is_error`` for ``Error: ...``); text
    after the tools streams into a new message. Everything nests under the current run step.
    """

    def __init__(self, cl: Any, author: str) -> None:
        self.cl = cl
        self.author = author
        current = cl.context.current_step
        self.parent_id: str | None = current.id if current is not None else None
        self.message: Any = None
        self.steps: dict[str, Any] = {}  # open tool steps by tool call id
        self.thought: Any = None  # the open reasoning step
        self._pending = ""  # leading whitespace, held back until real text comes

    async def show(self, event: Event) -> None:
        if isinstance(event, Reasoning):
            await self.reasoning(event.text)
            return
        if isinstance(event, Usage):
            return
        await self.end_reasoning()
        if isinstance(event, TextDelta):
            await self.text(event.text)
        elif isinstance(event, ToolCall):
            await self.end_message()
            step = self.cl.Step(name=event.name, type="tool", parent_id=self.parent_id, show_input="json")
            step.input = event.arguments
            step.start = _now()
            await step.send()
            self.steps[event.id] = step
        elif isinstance(event, ToolResult):
            step = self.steps.pop(event.id, None)
            if step is None:
                return
            step.output = event.content
            step.is_error = event.is_error
            step.end = _now()
            await step.update()
        elif isinstance(event, Repair):
            await self.end_message()
            step = self.cl.Step(name="repair", type="undefined", parent_id=self.parent_id)
            step.output = event.reason
            step.start = step.end = _now()
            await step.send()
        elif isinstance(event, Final):
            await self.final(event)

    async def reasoning(self, text: str) -> None:
        """Stream ``text`` into the reasoning step (opened after any streamed message)."""
        if self.thought is None:
            await self.end_message()
            step = self.cl.Step(name=REASONING_STEP, type="llm", parent_id=self.parent_id, show_input=False)
            step.start = _now()
            await step.send()
            self.thought = step
        await self.thought.stream_token(text)

    async def end_reasoning(self) -> None:
        if self.thought is not None:
            step, self.thought = self.thought, None
            step.end = _now()
            await step.update()

    async def text(self, text: str) -> None:
        if self.message is None:
            self._pending += text
            if not self._pending.strip():
                return
            text, self._pending = self._pending.lstrip(), ""
            self.message = self.cl.Message(content="", author=self.author, parent_id=self.parent_id)
        await self.message.stream_token(text)

    async def final(self, final: Final) -> None:
        if final.stop_reason == "max_iterations":
            await self.end_message()
            await self.text(final.text)
        elif final.stop_reason == "length":
            await self.text("\n\n*(cut off: the answer reached sampling.max_tokens)*")
        elif self.message is None and final.text.strip():  # not streamed (cannot happen today)
            await self.text(final.text)
        await self.end_message()

    async def end_message(self) -> None:
        """End the streamed message (Chainlit: ``send()`` after ``stream_token``)."""
        self._pending = ""
        if self.message is not None:
            message, self.message = self.message, None
            await message.send()

    async def close(self, why: str) -> None:
        """End what is still open when the turn stops early: open tool steps become errors."""
        await self.end_reasoning()
        for step in self.steps.values():
            step.output = f"({why})"
            step.is_error = True
            step.end = _now()
            await step.update()
        self.steps.clear()
        await self.end_message()

    async def error(self, text: str) -> None:
        await self.cl.ErrorMessage(content=text, author=self.author).send()


def _now() -> str:
    """A timestamp in Chainlit's format (ISO 8601, UTC, ``Z``)."""
    return datetime.now(UTC).replace(tzinfo=None).isoformat() + "Z"


def reload_agent(chat: ChatApp, path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> bool:
    """Rebuild the served agent from its (edited) file, keeping the running engine.

    Returns False, keeping the old agent, when ``model`` or ``engine`` changed, or ``tools`` with
    MCP servers in it (that needs a restart). Tools are reloaded only when ``tools`` changed; the
    running MCP servers are kept. Raises ConfigError for an
    invalid file.
    """
    old = chat.agent
    spec = AgentSpec.from_file(path, overrides)
    front = _frontend(spec)
    if spec.model != old.spec.model or spec.engine != old.spec.engine:
        log.warning("%s: model or engine changed; restart `qwenrun up` to apply", path)
        return False
    old_front = _frontend(old.spec)
    if (front.host, front.port) != (old_front.host, old_front.port):
        log.warning("%s: frontend host/port changed; restart `qwenrun up` to apply", path)
    tools = list(old.tools.values()) if spec.tools == old.spec.tools else None
    if tools is None and (spec.mcp_servers or old.spec.mcp_servers):
        log.warning("%s: tools with MCP servers changed; restart `qwenrun up` to apply", path)
        return False
    new = Agent(spec, engine=old.engine, tools=tools, strict_plugins=False, store=old.store, mcp=old.mcp)
    chat.agent = build_app(new).agent  # the callbacks are registered again for the new settings
    return True


async def _watch(chat: ChatApp, path: Path, overrides: Sequence[str]) -> None:
    """``frontend.watch``: reload the agent when its file changes, then reload open browser tabs."""
    from watchfiles import awatch

    sio = _import("chainlit.server").sio
    name = path.name
    async for _changes in awatch(
        path.parent, watch_filter=lambda _change, changed: Path(changed).name == name
    ):
        try:
            reloaded = reload_agent(chat, path, overrides)
        except QwenrunError as exc:
            log.error("%s (the running agent is kept)", exc)
            continue
        if reloaded:
            click.echo(f"{path}: agent reloaded; open chats restart", err=True)
            await sio.emit("reload", {})


def _check_port(spec: AgentSpec, host: str, port: int) -> None:
    """Fail before the engine loads (minutes for a 7B model) when the port is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _name, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise ConfigError(
            f"{spec.source}: frontend: cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None


async def _serve(chat: ChatApp, host: str, port: int, watch: Path | None, overrides: Sequence[str]) -> None:
    import uvicorn

    config = _import("chainlit.config").config
    ensure_jwt_secret = _import("chainlit.auth").ensure_jwt_secret
    await start_with_status(chat.agent)
    config.run.host, config.run.port = host, port
    ensure_jwt_secret()
    click.echo(f"Chat UI on http://{host}:{port} (Ctrl-C stops)", err=True)
    server = uvicorn.Server(
        uvicorn.Config(
            chat.asgi,
            host=host,
            port=port,
            ws=os.environ.get("UVICORN_WS_PROTOCOL", "auto"),
            ws_per_message_deflate=os.environ.get("UVICORN_WS_PER_MESSAGE_DEFLATE", "true").lower()
            in ("true", "1", "yes"),
            log_level="warning",
        )
    )
    watcher = asyncio.create_task(_watch(chat, watch, overrides)) if watch is not None else None
    try:
        await server.serve()
    finally:  # reached when the server fails to start; a normal shutdown exits in Chainlit's lifespan
        if watcher is not None:
            watcher.cancel()
        await chat.agent.shutdown()


def serve(
    agent: Agent,
    *,
    host: str | None = None,
    port: int | None = None,
    watch_file: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
) -> None:
    """Serve the chat UI of ``agent`` in this process until Ctrl-C (blocking).

    ``host``/``port`` default to the spec's ``frontend``; with ``frontend.watch`` and a
    ``watch_file`` the agent is reloaded when that file changes. The engine starts first, on the
    event loop the server then runs on. Chainlit ends the process (``os._exit(0)``) on shutdown.
    """
    front = _frontend(agent.spec)
    host = host or front.host
    port = front.port if port is None else port
    chat = build_app(agent)
    _check_port(agent.spec, host, port)
    watch = Path(watch_file) if front.watch and watch_file is not None else None
    asyncio.run(_serve(chat, host, port, watch, tuple(overrides)))


def run(launch: Launch) -> None:
    """``qwenrun up FILE`` for ``frontend.kind: chainlit``: serve the agent's chat UI."""
    import_chainlit()  # a missing extra fails here, before any model loads
    serve(launch.make_agent(launch.spec), watch_file=launch.file, overrides=launch.overrides)

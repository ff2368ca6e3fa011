"""The Chainlit front end (``frontend.kind: chainlit``): ``qwenrun up agent.yaml`` serves a chat UI.

Thin: agent events become Chainlit messages and steps, nothing else. Chainlit's server and the
engine share one process and one event loop; the engine starts once, before the port opens, and
every chat session shares the one :class:`~qwenrun.agent.loop.Agent`. Each chat session keeps its own
:class:`~qwenrun.agent.loop.Session` (multi-turn history) in ``cl.user_session``. The answer streams
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
import hmac
import importlib
import json
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
from pathlib import Path
from typing import Any

import click

from qwenrun.agent import Agent, Session
from qwenrun.approval import ApprovalRequest, Approver, escape
from qwenrun.engines.base import wait_until_dead
from qwenrun.errors import ConfigError, MissingExtraError, QwenrunError
from qwenrun.frontends.base import Launch, start_with_status
from qwenrun.frontends.chainlit.view import TurnView, answer
from qwenrun.frontends.settings import ChainlitFrontend
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.spec.loading import secret_from_env

__all__ = [
    "build_app",
    "check_password",
    "import_chainlit",
    "reload_agent",
    "run",
    "serve",
]

log = logging.getLogger(__name__)

APP_ROOT_ENV = "CHAINLIT_APP_ROOT"
AUTH_SECRET_ENV = "CHAINLIT_AUTH_SECRET"
SESSION_KEY = "qwenrun_session"
TASK_KEY = "qwenrun_task"
_HTML_UNSAFE = set('<>"')

_owned_root: str | None = None  # the temporary app root qwenrun made for Chainlit's import, if any


class ChatApp:
    """The agent every chat session of the UI talks to (:func:`reload_agent` swaps it) and
    Chainlit's ASGI app that serves it. Chainlit keeps its callbacks in process-wide config, so a
    process serves one chat app; qwenrun keeps its own state here, not in module globals.
    ``engine_died``: the engine died for good, and the process exits with 1."""

    def __init__(self, agent: Agent, asgi: Any) -> None:
        self.agent = agent
        self.asgi = asgi
        self.engine_died = False


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


def build_app(agent: Agent, chat: ChatApp | None = None) -> ChatApp:
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

    if chat is None:
        chat = ChatApp(agent, _import("chainlit.server").app)
    chat.agent = agent

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
        if chat.engine_died:  # Chainlit would exit with 0 next: a supervisor must see the failure
            click.echo("Error: the engine died, so the chat UI stopped (exit code 1): restart qwenrun, "
                       "or let a supervisor (systemd, Kubernetes) do it", err=True)  # fmt: skip
            sys.stderr.flush()
            os._exit(1)

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
        _login_form_words(front.username)
        if not os.environ.get(AUTH_SECRET_ENV):  # signs the login JWTs; a restart logs users out
            os.environ[AUTH_SECRET_ENV] = secrets.token_urlsafe(48)
    else:
        config.code.password_auth_callback = None
    return chat


def _login_form_words(username: str) -> None:
    """Chainlit's login form asks for an "Email address" (placeholder ``me@example.com``), but a
    qwenrun login is ``frontend.username`` and its password: the translation files of qwenrun's
    private app root say "Username", with the user name as placeholder, in every language. An app
    root of the user's own (``CHAINLIT_APP_ROOT``) keeps its files."""
    if _owned_root is None:
        return
    directory = Path(_import("chainlit.config").config_translation_dir)
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            field = data["auth"]["login"]["form"]["email"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        chinese = path.stem.startswith("zh")
        field["label"] = "用户名" if chinese else "Username"
        field["required"] = "用户名是必填项" if chinese else "username is a required field"
        field["placeholder"] = username
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


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
        text += f"\nasked by {escape(request.rule)}" if request.rule else ""  # a `permissions:` rule
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
    build_app(new, chat)  # the callbacks are registered again, for the new settings
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
    watchdog = asyncio.create_task(_stop_when_dead(chat, server))
    try:
        await server.serve()
    finally:  # reached when the server fails to start; a normal shutdown exits in Chainlit's lifespan
        watchdog.cancel()
        if watcher is not None:
            watcher.cancel()
        await chat.agent.shutdown()


async def _stop_when_dead(chat: ChatApp, server: Any) -> None:
    """A dead engine never comes back: stop serving, so that the process exits with 1."""
    await wait_until_dead(chat.agent.engine)
    chat.engine_died = True
    log.error("the engine has died; stopping the chat UI so that a supervisor can restart it")
    server.should_exit = True


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

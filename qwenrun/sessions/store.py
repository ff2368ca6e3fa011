"""Sessions that last: the :class:`SessionStore` interface, its records, and the store of a spec.

A stored session is a row of ``sessions`` and its *records* in order: every message of its history
as :class:`~qwenrun.agent.loop.Session` appends it (user, assistant with its tool calls, tool results,
in OpenAI format, each with metadata: usage, timing) and the events of its turns (``final`` with
the turn's usage, ``error``, ``cancelled``). :meth:`SessionStore.load` gives the history back to
resume the session; every front end (REPL, Chainlit, OpenAI server) writes to the same store.

The SQLite implementation, :class:`~qwenrun.sessions.sqlite.SQLiteStore`, is the default
(``sessions.store: sqlite``); :class:`~qwenrun.sessions.postgres.PostgresStore`
(``sessions.store: postgres``) lets replicas on several hosts share their sessions. It also keeps the
OpenAI server's stored responses (:class:`ResponseStore`): ``previous_response_id`` continues them,
and the facts of the ``memory`` toolset (:class:`MemoryStore`).
"""

from __future__ import annotations

import builtins
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from qwenrun.errors import ConfigError
from qwenrun.events import Final, Usage

if TYPE_CHECKING:
    from qwenrun.spec.agent_file import AgentSpec

__all__ = [
    "DB_ENV", "URL_ENV", "Fact", "MemoryStore", "Record", "RecordKind", "ResponseStore", "SessionInfo",
    "SessionStore", "StoredResponse", "StoredSession", "WriteObserver", "database_url", "default_path",
    "session_info", "store_path", "turn_record", "usage_meta", "valid_session_id",
]  # fmt: skip

DB_ENV = "QWENRUN_SESSIONS_DB"
URL_ENV = "QWENRUN_DATABASE_URL"
RecordKind = Literal["message", "event"]
_SESSION_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


def valid_session_id(session_id: str) -> bool:
    """1 to 128 characters of ``A-Z a-z 0-9 _ . : -`` (uuid4 hex and Chainlit thread ids fit)."""
    return bool(_SESSION_ID.match(session_id))


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What :meth:`SessionStore.list` tells about a session (``turns``: its user messages)."""

    id: str
    agent: str
    source: str | None = None  # the agent file it ran with (``qwenrun replay`` re-runs it)
    frontend: str = "library"
    model: str = ""
    title: str = ""  # the start of the first user message
    created: float = 0.0
    updated: float = 0.0
    turns: int = 0
    messages: int = 0


@dataclass(frozen=True, slots=True)
class Record:
    """One entry of a session: a message of its history or an event of turn ``turn``."""

    seq: int
    turn: int
    kind: RecordKind
    data: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A session and all its records, in the order they were appended."""

    info: SessionInfo
    records: list[Record]

    def messages(self) -> list[dict[str, Any]]:
        """The history in OpenAI format (what :meth:`SessionStore.load` returns)."""
        return [record.data for record in self.records if record.kind == "message"]


WriteObserver = Callable[[float, int, bool], None]
"""What a store reports after writing a batch: its seconds, its records, whether it failed."""


@runtime_checkable
class SessionStore(Protocol):
    """Where sessions last. ``append`` must not block its caller (it runs on the event loop)."""

    def create(self, info: SessionInfo) -> None:
        """Register a session (a no-op if its id is known)."""

    def append(
        self, session_id: str, turn: int, kind: RecordKind, data: dict[str, Any], meta: dict[str, Any]
    ) -> None:
        """Add a record after the session's last one."""

    def load(self, session_id: str) -> builtins.list[dict[str, Any]] | None:
        """The session's history (its ``message`` records), or None for an unknown id."""

    def list(self, limit: int = 50, agent: str | None = None) -> builtins.list[SessionInfo]:
        """The latest sessions, most recently updated first."""

    def get(self, session_id: str) -> StoredSession | None:
        """A session with all its records, or None."""

    def flush(self) -> None:
        """Wait until every appended record is written."""

    def subscribe(self, observer: WriteObserver) -> None:
        """Call ``observer(seconds, records, failed)`` after each batch of records is written (an
        observer that raises is logged and the store goes on)."""

    def close(self) -> None:
        """Write what is pending and release the store."""


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response of the OpenAI server's ``/v1/responses``, kept for ``previous_response_id``."""

    id: str
    owner: str  # a hash of the API key that created it ("" on a server without a key); never the key
    created: float
    response: dict[str, Any]  # the response object, as the server returned it
    conversation: list[dict[str, Any]]  # every input and output item so far: the next turn's context
    parent: str | None = None  # the previous_response_id it continues
    inherited: int = 0  # how many of ``conversation``'s first items are the parent's (stored there)


@runtime_checkable
class ResponseStore(Protocol):
    """Where stored responses last. A store keeps only the items a response adds to its ``parent``
    (the conversation is the parent's, then those); callers run it off the event loop."""

    def put_response(self, stored: StoredResponse) -> None:
        """Keep a response (replacing one of the same id); returns once another process (a replica
        on the same database) can read it. The parent's items are ``conversation[:inherited]``."""

    def get_response(self, response_id: str, newer_than: float = 0.0) -> StoredResponse | None:
        """The response of that id created after ``newer_than`` (a time.time()), or None."""

    def delete_response(self, response_id: str) -> bool:
        """Delete a response (those that continue it keep their conversation); whether it existed."""

    def prune_responses(self, older_than: float) -> None:
        """Delete the responses created before ``older_than`` (a time.time()), but not the items a
        newer response still needs; need not wait."""


@dataclass(frozen=True, slots=True)
class Fact:
    """One fact of the ``memory`` toolset: a key and its text, in a namespace and a scope."""

    key: str
    value: str
    created: float = 0.0
    updated: float = 0.0


@runtime_checkable
class MemoryStore(Protocol):
    """Where the ``memory`` toolset's facts last: by ``namespace`` (an agent's name) and ``scope``
    ("" for the whole namespace, else a session id), then ``key``. Callers run it off the event loop."""

    def put_fact(self, namespace: str, scope: str, key: str, value: str) -> None:
        """Keep a fact (replacing the key's value); returns once it is written."""

    def facts(self, namespace: str, scope: str) -> builtins.list[Fact]:
        """The facts of a scope, most recently updated first."""

    def delete_fact(self, namespace: str, scope: str, key: str) -> bool:
        """Forget a fact; whether it existed."""


def session_info(spec: AgentSpec, session_id: str, title: str = "") -> SessionInfo:
    """The :class:`SessionInfo` of a new session of an agent."""
    source = None if spec.source.startswith("<") else str(Path(spec.source).resolve())
    now = time.time()
    return SessionInfo(
        id=session_id, agent=spec.agent.name, source=source, frontend=spec.frontend.kind,
        model=spec.served_model_name, title=" ".join(title.split())[:80], created=now, updated=now,
    )  # fmt: skip


def usage_meta(usage: Usage, finish_reason: str | None = None) -> dict[str, Any]:
    """The metadata recorded beside an assistant message: the usage of the model call(s)."""
    meta: dict[str, Any] = {"usage": {
        "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
        "duration_s": round(usage.duration_s, 6), "model_calls": usage.model_calls,
    }}  # fmt: skip
    if finish_reason is not None:
        meta["finish_reason"] = finish_reason
    return meta


def turn_record(end: Final | BaseException, started: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The event (data, meta) that ends a turn: ``final``, ``error`` or ``cancelled``; ``started``
    is the turn's ``time.perf_counter()``."""
    duration = {"duration_s": round(time.perf_counter() - started, 6)}
    if isinstance(end, Final):
        data = {"type": "final", "stop_reason": end.stop_reason, "iterations": end.iterations,
                "tool_calls": end.tool_calls}  # fmt: skip
        if end.agent:  # a team's turn: the agent that answered
            data["agent"] = end.agent
        return data, {**usage_meta(end.usage), **duration}
    kind = "error" if isinstance(end, Exception) else "cancelled"
    return {"type": kind, "error": f"{type(end).__name__}: {end}".removesuffix(": ")}, duration


def default_path() -> str:
    """``$QWENRUN_SESSIONS_DB``, else ``$XDG_DATA_HOME/qwenrun/sessions.db``, else
    ``~/.local/share/qwenrun/sessions.db``."""
    if os.environ.get(DB_ENV):
        return os.environ[DB_ENV]
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join("~", ".local", "share")
    return os.path.join(data_home, "qwenrun", "sessions.db")


def store_path(spec: AgentSpec) -> str:
    """The database of a spec: ``sessions.path`` (relative to the agent file) or the default."""
    path = spec.sessions.path
    if path is None:
        return os.path.expanduser(default_path())
    if path == ":memory:":
        return path
    path = os.path.expanduser(path)
    if not os.path.isabs(path) and not spec.source.startswith("<"):
        path = os.path.join(os.path.dirname(os.path.abspath(spec.source)), path)
    return path


def database_url(spec: AgentSpec) -> str:
    """The PostgreSQL URL of a spec (``store: postgres``): ``sessions.url``, else
    ``$QWENRUN_DATABASE_URL``."""
    url = spec.sessions.url.get_secret_value() if spec.sessions.url is not None else os.environ.get(URL_ENV)
    if not url:
        raise ConfigError(
            f"{spec.source}: sessions.url: store postgres needs a database URL: write "
            f"url: ${{{URL_ENV}}} and set {URL_ENV} (postgresql://USER:PASSWORD@HOST:PORT/DB)"
        )
    return url

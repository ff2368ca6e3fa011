"""The SQLite :class:`~qwenrun.sessions.store.SessionStore` (``sessions.store: sqlite``, the default),
also the :class:`~qwenrun.sessions.store.ResponseStore` of the OpenAI server's stored responses.

:class:`SQLiteStore` never makes its caller wait for the disk: ``append`` serialises the message
and queues it; one writer thread commits what is queued in one transaction (WAL journal, a busy
timeout for other processes on the same file, retries), within milliseconds, so a crash loses at
most the turn in flight. A read of a session waits for that session's queued records only (a
list waits for all), then uses one connection per thread. ``:memory:`` is private to the object.
Responses take the same path: ``put_response`` queues, reading one waits for its own writes.
"""

from __future__ import annotations

import atexit
import builtins
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qwenrun.sessions.store import (
    Record,
    RecordKind,
    SessionInfo,
    StoredResponse,
    StoredSession,
    WriteObserver,
)

__all__ = ["SQLiteStore"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, agent TEXT NOT NULL, source TEXT, frontend TEXT NOT NULL,
    model TEXT NOT NULL, title TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    turns INTEGER NOT NULL DEFAULT 0, messages INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_by_update ON sessions (updated);
CREATE TABLE IF NOT EXISTS records (
    session_id TEXT NOT NULL, seq INTEGER NOT NULL, turn INTEGER NOT NULL, kind TEXT NOT NULL,
    data TEXT NOT NULL, meta TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL,
    response TEXT NOT NULL, conversation TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_created ON responses (created);
"""
_INFO = "id, agent, source, frontend, model, title, created, updated, turns, messages"
_CREATE = f"INSERT OR IGNORE INTO sessions ({_INFO}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 0)"
_APPEND = (
    "INSERT INTO records (session_id, seq, turn, kind, data, meta, created) VALUES "
    "(?, (SELECT COALESCE(MAX(seq) + 1, 0) FROM records WHERE session_id = ?), ?, ?, ?, ?, ?)"
)
_TOUCH = "UPDATE sessions SET updated = ?, turns = MAX(turns, ?), messages = messages + ? WHERE id = ?"
_PUT_RESPONSE = (
    "INSERT OR REPLACE INTO responses (id, owner, created, response, conversation) VALUES (?, ?, ?, ?, ?)"
)
# ("create", SessionInfo), ("append", session_id, turn, kind, data, meta, created),
# ("response", id, owner, created, response, conversation), ("unrespond", id), ("prune", before)
_Op = tuple[Any, ...]


def _key_of(op: _Op) -> str:
    """What a read waits for: a session's id, or ``responses/<id>`` (never a valid session id)."""
    if op[0] == "create":
        return str(op[1].id)
    return str(op[1]) if op[0] == "append" else f"responses/{op[1]}"


class SQLiteStore:
    """A :class:`SessionStore` in one SQLite file (or ``:memory:``, private to this object)."""

    BATCH = 500
    RETRIES = 4

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_s: float = 10.0,
        on_write: WriteObserver | None = None,
    ) -> None:
        self.path = str(path)
        self._observers: builtins.list[WriteObserver] = [on_write] if on_write is not None else []
        self._memory = self.path == ":memory:"
        self._timeout = busy_timeout_s
        if not self._memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # guards the one shared connection of a :memory: store
        self._writer = self._connect()
        with self._lock:
            self._writer.executescript(_SCHEMA)
        self._readers: builtins.list[sqlite3.Connection] = []
        self._local = threading.local()
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._state = threading.Condition()
        self._queued = self._written = 0
        self._pending: dict[str, int] = {}  # records queued but not yet written, by session
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qwenrun-session-store", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        if not self._memory:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at commit but for power loss
        return conn

    # -- writing (any thread; never waits for the disk) ---------------------------------------

    def create(self, info: SessionInfo) -> None:
        self._put(("create", info))

    def append(
        self, session_id: str, turn: int, kind: RecordKind, data: dict[str, Any], meta: dict[str, Any]
    ) -> None:
        dump = json.dumps  # serialised now: a snapshot, and the writer thread does only SQL
        self._put(("append", session_id, turn, kind, dump(data, ensure_ascii=False),
                   dump(meta, ensure_ascii=False), time.time()))  # fmt: skip

    def _put(self, op: _Op) -> None:
        session_id = _key_of(op)
        with self._state:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            self._queued += 1
            self._pending[session_id] = self._pending.get(session_id, 0) + 1
            self._queue.put(op)

    def flush(self, timeout: float | None = None) -> None:
        with self._state:
            target = self._queued
            self._state.wait_for(lambda: self._written >= target or not self._thread.is_alive(), timeout)

    def _settle(self, session_id: str) -> None:
        """Wait until this session's queued records are written (not the other sessions')."""
        with self._state:
            self._state.wait_for(lambda: session_id not in self._pending or not self._thread.is_alive())

    def close(self) -> None:
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()
        atexit.unregister(self.close)
        with self._lock:
            for conn in [self._writer, *self._readers]:
                conn.close()
            self._readers.clear()

    # -- the writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            batch: builtins.list[_Op] = []
            op = self._queue.get()
            while op is not None:
                batch.append(op)
                if len(batch) >= self.BATCH:
                    break
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
            stop = op is None
            if batch:
                self._write(batch)
            with self._state:
                self._written += len(batch)
                for done in batch:
                    session_id = _key_of(done)
                    left = self._pending.pop(session_id) - 1
                    if left:
                        self._pending[session_id] = left
                self._state.notify_all()

    def _write(self, batch: builtins.list[_Op]) -> None:
        started = time.perf_counter()
        for attempt in range(self.RETRIES):
            try:
                with self._lock:
                    self._transaction(batch)
                failed = False
                break
            except sqlite3.Error as exc:
                failed = True
                if attempt == self.RETRIES - 1:
                    log.error("session store %s: %d records lost: %s", self.path, len(batch), exc)
                else:
                    log.warning("session store %s: %s; retrying", self.path, exc)
                    time.sleep(0.05 * 4**attempt)
        for observer in self._observers:
            try:
                observer(time.perf_counter() - started, len(batch), failed)
            except Exception:  # an observer's bug must not stop the writer
                log.exception("session store observer failed")

    def subscribe(self, observer: WriteObserver) -> None:
        """Call ``observer(seconds, records, failed)`` after each batch this store writes."""
        self._observers.append(observer)

    def _transaction(self, batch: builtins.list[_Op]) -> None:
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in batch:
                if op[0] == "create":
                    info: SessionInfo = op[1]
                    conn.execute(_CREATE, (info.id, info.agent, info.source, info.frontend, info.model,
                                           info.title, info.created, info.updated))  # fmt: skip
                elif op[0] == "response":
                    conn.execute(_PUT_RESPONSE, op[1:])
                elif op[0] == "unrespond":
                    conn.execute("DELETE FROM responses WHERE id = ?", (op[1],))
                elif op[0] == "prune":
                    conn.execute("DELETE FROM responses WHERE created < ?", (op[1],))
                else:
                    _, session_id, turn, kind, data, meta, created = op
                    conn.execute(_APPEND, (session_id, session_id, turn, kind, data, meta, created))
                    conn.execute(_TOUCH, (created, turn, int(kind == "message"), session_id))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- reading (sees every record appended before the call) -------------------------------

    @contextmanager
    def _reader(self, session_id: str | None = None) -> Iterator[sqlite3.Connection]:
        if session_id is None:
            self.flush()
        else:
            self._settle(session_id)
        if self._memory:
            with self._lock:
                yield self._writer
            return
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._lock:
                self._readers.append(conn)
        yield conn

    def load(self, session_id: str) -> builtins.list[dict[str, Any]] | None:
        with self._reader(session_id) as conn:
            known = conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone()
            rows = conn.execute(
                "SELECT data FROM records WHERE session_id = ? AND kind = 'message' ORDER BY seq",
                (session_id,),
            ).fetchall()
        if known is None and not rows:
            return None
        return [json.loads(data) for (data,) in rows]

    def get(self, session_id: str) -> StoredSession | None:
        with self._reader(session_id) as conn:
            row = conn.execute(f"SELECT {_INFO} FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None:
                return None
            rows = conn.execute(
                "SELECT seq, turn, kind, data, meta, created FROM records WHERE session_id = ? ORDER BY seq",
                (session_id,),
            ).fetchall()
        records = [Record(seq, turn, kind, json.loads(data), json.loads(meta), created)
                   for seq, turn, kind, data, meta, created in rows]  # fmt: skip
        return StoredSession(SessionInfo(*row), records)

    def list(self, limit: int = 50, agent: str | None = None) -> builtins.list[SessionInfo]:
        where, args = ("WHERE agent = ?", [agent]) if agent else ("", [])
        query = f"SELECT {_INFO} FROM sessions {where} ORDER BY updated DESC, id LIMIT ?"
        with self._reader() as conn:
            rows = conn.execute(query, [*args, limit]).fetchall()
        return [SessionInfo(*row) for row in rows]

    # -- stored responses (the OpenAI server's /v1/responses) ----------------------------------

    def put_response(self, stored: StoredResponse) -> None:
        response = json.dumps(stored.response, ensure_ascii=False)  # serialised now, as append does
        conversation = json.dumps(stored.conversation, ensure_ascii=False)
        self._put(("response", stored.id, stored.owner, stored.created, response, conversation))

    def get_response(self, response_id: str, newer_than: float = 0.0) -> StoredResponse | None:
        query = "SELECT owner, created, response, conversation FROM responses WHERE id = ? AND created >= ?"
        with self._reader(f"responses/{response_id}") as conn:
            row = conn.execute(query, (response_id, newer_than)).fetchone()
        if row is None:
            return None
        owner, created, response, conversation = row
        return StoredResponse(response_id, owner, created, json.loads(response), json.loads(conversation))

    def delete_response(self, response_id: str) -> bool:
        key = f"responses/{response_id}"
        with self._reader(key) as conn:
            known = conn.execute("SELECT 1 FROM responses WHERE id = ?", (response_id,)).fetchone()
        if known is None:
            return False
        self._put(("unrespond", response_id))
        self._settle(key)
        return True

    def prune_responses(self, older_than: float) -> None:
        self._put(("prune", older_than))

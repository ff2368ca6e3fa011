"""The SQLite :class:`~qwenrun.sessions.store.SessionStore` (``sessions.store: sqlite``, the default),
also the :class:`~qwenrun.sessions.store.ResponseStore` of the OpenAI server's stored responses.

:class:`SQLiteStore` never makes its caller wait for the disk (:class:`~qwenrun.sessions.writer.QueuedStore`):
one writer thread commits what is queued in one transaction (WAL journal, a busy timeout for other
processes on the same file, retries), within milliseconds, so a crash loses at most the turn in
flight. Reads use one connection per thread. ``:memory:`` is private to the object. The schema's
version is SQLite's ``user_version``: a file of an older qwenrun is upgraded when it is opened
(responses kept whole become deltas; the ``memories`` table of the memory toolset is added), one
of a newer qwenrun is refused.
"""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qwenrun.sessions.store import Fact, Record, SessionInfo, StoredResponse, StoredSession, WriteObserver
from qwenrun.sessions.writer import (
    SCHEMA_VERSION,
    Op,
    QueuedStore,
    chain_response,
    check_version,
    delta_rows,
    memory_key,
)

__all__ = ["SQLiteStore"]

_SCHEMA_1 = """
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
_RESPONSES_2 = """
CREATE TABLE responses_2 (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL, response TEXT NOT NULL,
    parent TEXT, items TEXT NOT NULL, length INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0
);
"""
_RESPONSES_2_INDEXES = """
CREATE INDEX responses_by_created ON responses (created);
CREATE INDEX responses_by_parent ON responses (parent);
"""
_MEMORIES_3 = """
CREATE TABLE memories (
    namespace TEXT NOT NULL, scope TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, PRIMARY KEY (namespace, scope, key)
) WITHOUT ROWID
"""
_PUT_FACT = (
    "INSERT INTO memories (namespace, scope, key, value, created, updated) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (namespace, scope, key) DO UPDATE SET value = excluded.value, updated = excluded.updated"
)
_INFO = "id, agent, source, frontend, model, title, created, updated, turns, messages"
_CREATE = f"INSERT OR IGNORE INTO sessions ({_INFO}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 0)"
_APPEND = (
    "INSERT INTO records (session_id, seq, turn, kind, data, meta, created) VALUES "
    "(?, (SELECT COALESCE(MAX(seq) + 1, 0) FROM records WHERE session_id = ?), ?, ?, ?, ?, ?)"
)
_TOUCH = "UPDATE sessions SET updated = ?, turns = MAX(turns, ?), messages = messages + ? WHERE id = ?"
_PUT_RESPONSE = (
    "INSERT OR REPLACE INTO responses (id, owner, created, response, parent, items, length) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
# a response and its ancestors, newest first (the head row's own columns only at depth 0)
_CHAIN = """
WITH RECURSIVE chain(depth, parent, items, owner, created, response) AS (
    SELECT 0, parent, items, owner, created, response FROM responses
    WHERE id = ? AND deleted = 0 AND created >= ?
    UNION ALL
    SELECT c.depth + 1, r.parent, r.items, NULL, NULL, NULL FROM responses r JOIN chain c ON r.id = c.parent
) SELECT parent, items, owner, created, response FROM chain ORDER BY depth
"""
# what no live response needs: deleted (or expired) rows that are nobody's ancestor
_COLLECT = """
WITH RECURSIVE needed(id) AS (
    SELECT id FROM responses WHERE deleted = 0
    UNION SELECT r.parent FROM responses r JOIN needed n ON r.id = n.id WHERE r.parent IS NOT NULL
) DELETE FROM responses WHERE deleted = 1 AND id NOT IN (SELECT id FROM needed)
"""


class SQLiteStore(QueuedStore):
    """A :class:`SessionStore` in one SQLite file (or ``:memory:``, private to this object)."""

    transient = (sqlite3.Error,)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_s: float = 10.0,
        on_write: WriteObserver | None = None,
    ) -> None:
        self.path = str(path)
        self._memory = self.path == ":memory:"
        self._timeout = busy_timeout_s
        if not self._memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # guards the one shared connection of a :memory: store
        self._writer = self._connect()
        try:
            self._migrate(self._writer)
        except BaseException:
            self._writer.close()
            raise
        self._readers: builtins.list[sqlite3.Connection] = []
        self._local = threading.local()
        super().__init__(on_write)

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

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Create the schema, or upgrade a file of an older qwenrun to :data:`SCHEMA_VERSION`."""
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        check_version(version, self.path)
        if version == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")  # one process upgrades; the others then see the new version
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version < 1:  # a new file, or one of before the versions (same tables)
                for statement in _SCHEMA_1.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            if version < 2:  # responses kept whole -> deltas
                rows = conn.execute(
                    "SELECT id, owner, created, response, conversation FROM responses ORDER BY created, id"
                ).fetchall()
                conn.execute(_RESPONSES_2)
                deltas = delta_rows([(row[0], row[3], row[4]) for row in rows])
                conn.executemany(
                    "INSERT INTO responses_2 (id, owner, created, response, parent, items, length) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(*row[:4], *delta[1:]) for row, delta in zip(rows, deltas, strict=True)],
                )
                conn.execute("DROP TABLE responses")
                conn.execute("ALTER TABLE responses_2 RENAME TO responses")
                for statement in _RESPONSES_2_INDEXES.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            if version < 3:  # the memory toolset's facts
                conn.execute(_MEMORIES_3)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _release(self) -> None:
        with self._lock:
            for conn in [self._writer, *self._readers]:
                conn.close()
            self._readers.clear()

    # -- the writer thread ------------------------------------------------------------------

    def _transaction(self, batch: builtins.list[Op]) -> None:
        with self._lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                for op in batch:
                    self._apply(conn, op)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _apply(self, conn: sqlite3.Connection, op: Op) -> None:
        if op[0] == "create":
            info: SessionInfo = op[1]
            conn.execute(_CREATE, (info.id, info.agent, info.source, info.frontend, info.model,
                                   info.title, info.created, info.updated))  # fmt: skip
        elif op[0] == "response":
            stored: StoredResponse = op[1]
            items: str = op[2]
            parent = None
            if stored.parent is not None:
                row = conn.execute("SELECT length FROM responses WHERE id = ?", (stored.parent,)).fetchone()
                parent = stored.parent if row is not None and row[0] == stored.inherited else None
            if parent is None and stored.inherited:  # the parent is gone: keep the whole conversation
                items = json.dumps(stored.conversation, ensure_ascii=False)
            response = json.dumps(stored.response, ensure_ascii=False)
            conn.execute(_PUT_RESPONSE, (stored.id, stored.owner, stored.created, response, parent,
                                         items, len(stored.conversation)))  # fmt: skip
        elif op[0] == "unrespond":
            conn.execute("UPDATE responses SET deleted = 1 WHERE id = ?", (op[1],))
            conn.execute(_COLLECT)
        elif op[0] == "prune":
            conn.execute("UPDATE responses SET deleted = 1 WHERE created < ?", (op[1],))
            conn.execute(_COLLECT)
        elif op[0] == "fact":
            _, namespace, scope, key, value, now = op
            conn.execute(_PUT_FACT, (namespace, scope, key, value, now, now))
        elif op[0] == "unfact":
            conn.execute("DELETE FROM memories WHERE namespace = ? AND scope = ? AND key = ?", op[1:])
        else:
            _, session_id, turn, kind, data, meta, created = op
            conn.execute(_APPEND, (session_id, session_id, turn, kind, data, meta, created))
            conn.execute(_TOUCH, (created, turn, int(kind == "message"), session_id))

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

    def get_response(self, response_id: str, newer_than: float = 0.0) -> StoredResponse | None:
        with self._reader(f"responses/{response_id}") as conn:
            chain = conn.execute(_CHAIN, (response_id, newer_than)).fetchall()
        return chain_response(response_id, chain)

    def delete_response(self, response_id: str) -> bool:
        key = f"responses/{response_id}"
        with self._reader(key) as conn:
            query = "SELECT 1 FROM responses WHERE id = ? AND deleted = 0"
            known = conn.execute(query, (response_id,)).fetchone()
        if known is None:
            return False
        self._put(("unrespond", response_id))
        self._settle(key)
        return True

    # -- the memory toolset's facts ---------------------------------------------------------------

    def facts(self, namespace: str, scope: str) -> builtins.list[Fact]:
        query = ("SELECT key, value, created, updated FROM memories WHERE namespace = ? AND scope = ? "
                 "ORDER BY updated DESC, key")  # fmt: skip
        with self._reader(memory_key(namespace, scope)) as conn:
            rows = conn.execute(query, (namespace, scope)).fetchall()
        return [Fact(*row) for row in rows]

    def delete_fact(self, namespace: str, scope: str, key: str) -> bool:
        with self._reader(memory_key(namespace, scope)) as conn:
            query = "SELECT 1 FROM memories WHERE namespace = ? AND scope = ? AND key = ?"
            known = conn.execute(query, (namespace, scope, key)).fetchone()
        if known is None:
            return False
        self._unfact(namespace, scope, key)
        return True

"""The PostgreSQL :class:`~qwenrun.sessions.store.SessionStore` (``sessions.store: postgres``), also
the :class:`~qwenrun.sessions.store.ResponseStore`: replicas on several hosts share one database.

:class:`PostgresStore` is a :class:`~qwenrun.sessions.writer.QueuedStore`: one writer thread (its own
connection, reconnected after an error) commits what is queued in one transaction; reads take a
connection of a psycopg pool. psycopg's synchronous pool, not its async one: the store protocol is
synchronous (front ends call it off the event loop, in threads), so an async pool would only add
an event loop thread between the two.

Concurrent writers: an append first updates its session's row, which locks it until the
transaction commits; the next ``seq`` is read under that lock. Appends to one session from several
replicas are so serialised in commit order: none is lost, and each replica's records keep their
order (the primary key (session_id, seq) turns any other race into a retried transaction). A batch
locks its sessions' rows in id order, so two replicas never deadlock. A response's parent is read
``FOR KEY SHARE``: a parent being deleted at that moment is waited for, and the response is then
kept whole. The memory toolset's facts are rows of ``qwenrun_memories``. The schema's version is the
row of ``qwenrun_schema``; the first replica to start
creates or upgrades it under an advisory lock, one newer than this qwenrun is refused.
"""

from __future__ import annotations

import builtins
import json
import re
from typing import Any

import psycopg
from psycopg import conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from qwenrun.errors import StoreError
from qwenrun.sessions.store import Fact, Record, SessionInfo, StoredResponse, StoredSession, WriteObserver
from qwenrun.sessions.writer import (
    SCHEMA_VERSION,
    Op,
    QueuedStore,
    chain_response,
    check_version,
    memory_key,
)

__all__ = ["PostgresStore", "redact"]

_LOCK_ID = 0x7177656E72756E  # pg_advisory_xact_lock key of the schema migration ("qwenrun")
_MIGRATIONS: dict[int, str] = {
    2: """
CREATE TABLE qwenrun_sessions (
    id TEXT PRIMARY KEY, agent TEXT NOT NULL, source TEXT, frontend TEXT NOT NULL,
    model TEXT NOT NULL, title TEXT NOT NULL, created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL, turns INTEGER NOT NULL DEFAULT 0, messages INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX qwenrun_sessions_by_update ON qwenrun_sessions (updated);
CREATE TABLE qwenrun_records (
    session_id TEXT NOT NULL, seq INTEGER NOT NULL, turn INTEGER NOT NULL, kind TEXT NOT NULL,
    data TEXT NOT NULL, meta TEXT NOT NULL, created DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE TABLE qwenrun_responses (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, response TEXT NOT NULL,
    parent TEXT REFERENCES qwenrun_responses (id), items TEXT NOT NULL, length INTEGER NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX qwenrun_responses_by_created ON qwenrun_responses (created);
CREATE INDEX qwenrun_responses_by_parent ON qwenrun_responses (parent);
""",
    3: """
CREATE TABLE qwenrun_memories (
    namespace TEXT NOT NULL, scope TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (namespace, scope, key)
);
""",
}  # the schema of each version, from the one before (a new database runs them all)
_PUT_FACT = (
    "INSERT INTO qwenrun_memories (namespace, scope, key, value, created, updated) "
    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (namespace, scope, key) "
    "DO UPDATE SET value = excluded.value, updated = excluded.updated"
)
_INFO = "id, agent, source, frontend, model, title, created, updated, turns, messages"
_CREATE = (
    f"INSERT INTO qwenrun_sessions ({_INFO}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 0, 0) "
    "ON CONFLICT (id) DO NOTHING"
)
_TOUCH = (
    "UPDATE qwenrun_sessions SET updated = GREATEST(updated, %s), turns = GREATEST(turns, %s), "
    "messages = messages + %s WHERE id = %s"
)
_APPEND = (
    "INSERT INTO qwenrun_records (session_id, seq, turn, kind, data, meta, created) SELECT %s, "
    "COALESCE(MAX(seq) + 1, 0), %s, %s, %s, %s, %s FROM qwenrun_records WHERE session_id = %s"
)
_PUT_RESPONSE = """
INSERT INTO qwenrun_responses (id, owner, created, response, parent, items, length)
VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET owner = excluded.owner,
created = excluded.created, response = excluded.response, parent = excluded.parent,
items = excluded.items, length = excluded.length, deleted = false
"""
_CHAIN = """
WITH RECURSIVE chain(depth, parent, items, owner, created, response) AS (
    SELECT 0, parent, items, owner, created, response FROM qwenrun_responses
    WHERE id = %s AND NOT deleted AND created >= %s
    UNION ALL
    SELECT c.depth + 1, r.parent, r.items, NULL, NULL::DOUBLE PRECISION, NULL
    FROM qwenrun_responses r JOIN chain c ON r.id = c.parent
) SELECT parent, items, owner, created, response FROM chain ORDER BY depth
"""
# deleted (or expired) rows that no live response needs; rows another transaction locks (a
# response being written whose parent they are) are left for the next time
_COLLECT = """
WITH RECURSIVE needed(id) AS (
    SELECT id FROM qwenrun_responses WHERE NOT deleted
    UNION SELECT r.parent FROM qwenrun_responses r JOIN needed n ON r.id = n.id WHERE r.parent IS NOT NULL
) DELETE FROM qwenrun_responses WHERE id IN (
    SELECT id FROM qwenrun_responses WHERE deleted AND id NOT IN (SELECT id FROM needed)
    FOR UPDATE SKIP LOCKED
)
"""


def redact(url: str) -> str:
    """``url`` with its password (URL or ``key=value`` form) replaced by ``***``."""
    url = re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", url, flags=re.IGNORECASE)


def _password(url: str) -> str | None:
    try:
        return conninfo.conninfo_to_dict(url).get("password") or None  # type: ignore[return-value]
    except psycopg.Error:
        return None


class PostgresStore(QueuedStore):
    """A :class:`SessionStore` in a PostgreSQL database (``url``: a libpq URL or key=value string)."""

    transient = (psycopg.Error,)

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 8,
        connect_timeout_s: float = 10.0,
        on_write: WriteObserver | None = None,
    ) -> None:
        self.url = redact(url)  # what messages and logs name
        self._timeout = connect_timeout_s
        self._secret = _password(url)
        self._writer = self._connect(url)
        try:
            self._migrate(self._writer)
        except BaseException:
            self._writer.close()
            raise
        self._conninfo = url
        self._pool = ConnectionPool(
            url, min_size=1, max_size=pool_size, kwargs={"autocommit": True}, open=False,
            name="qwenrun-sessions", timeout=connect_timeout_s,
        )  # fmt: skip
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)  # a first read must not wait for it
        except PoolTimeout:
            self._pool.close()
            self._writer.close()
            raise StoreError(f"sessions.url {self.url}: the connection pool did not open") from None
        super().__init__(on_write)

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r})"

    def _scrub(self, text: str) -> str:
        """``text`` (a driver's message) without the password."""
        return text.replace(self._secret, "***") if self._secret else text

    def _connect(self, url: str) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(url, autocommit=True, connect_timeout=max(1, round(self._timeout)))
        except psycopg.Error as exc:
            detail = self._scrub(str(exc).strip())
            raise StoreError(f"sessions.url {self.url}: cannot connect to PostgreSQL: {detail}") from None

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        """Create the schema, or upgrade it to :data:`SCHEMA_VERSION` (one replica at a time)."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
            conn.execute("CREATE TABLE IF NOT EXISTS qwenrun_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) FROM qwenrun_schema").fetchone()
            version = row[0] if row and row[0] is not None else 0
            check_version(version, f"sessions.url {self.url}")
            for target in sorted(_MIGRATIONS):
                if target > version:
                    conn.execute(_MIGRATIONS[target])  # type: ignore[arg-type]
            if version < SCHEMA_VERSION:
                conn.execute("DELETE FROM qwenrun_schema")
                conn.execute("INSERT INTO qwenrun_schema (version) VALUES (%s)", (SCHEMA_VERSION,))

    def _release(self) -> None:
        self._pool.close()
        self._writer.close()

    # -- the writer thread ------------------------------------------------------------------

    def _transaction(self, batch: builtins.list[Op]) -> None:
        if self._writer.closed or self._writer.broken:
            self._writer = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5)
        conn = self._writer
        with conn.transaction():
            sessions = sorted({op[1] for op in batch if op[0] == "append"})
            if sessions:  # lock them in one order: two replicas' batches never deadlock
                conn.execute(
                    "SELECT id FROM qwenrun_sessions WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (sessions,)
                )
            for op in batch:
                self._apply(conn, op)

    def _apply(self, conn: psycopg.Connection[Any], op: Op) -> None:
        if op[0] == "create":
            info: SessionInfo = op[1]
            conn.execute(_CREATE, (info.id, info.agent, info.source, info.frontend, info.model,
                                   info.title, info.created, info.updated))  # fmt: skip
        elif op[0] == "response":
            stored: StoredResponse = op[1]
            items: str = op[2]
            parent = None
            if stored.parent is not None:
                query = "SELECT length FROM qwenrun_responses WHERE id = %s FOR KEY SHARE"
                row = conn.execute(query, (stored.parent,)).fetchone()
                parent = stored.parent if row is not None and row[0] == stored.inherited else None
            if parent is None and stored.inherited:  # the parent is gone: keep the whole conversation
                items = json.dumps(stored.conversation, ensure_ascii=False)
            response = json.dumps(stored.response, ensure_ascii=False)
            conn.execute(_PUT_RESPONSE, (stored.id, stored.owner, stored.created, response, parent,
                                         items, len(stored.conversation)))  # fmt: skip
        elif op[0] == "unrespond":
            conn.execute("UPDATE qwenrun_responses SET deleted = true WHERE id = %s", (op[1],))
            conn.execute(_COLLECT)
        elif op[0] == "prune":
            conn.execute("UPDATE qwenrun_responses SET deleted = true WHERE created < %s AND NOT deleted",
                         (op[1],))  # fmt: skip
            conn.execute(_COLLECT)
        elif op[0] == "fact":
            _, namespace, scope, key, value, now = op
            conn.execute(_PUT_FACT, (namespace, scope, key, value, now, now))
        elif op[0] == "unfact":
            query = "DELETE FROM qwenrun_memories WHERE namespace = %s AND scope = %s AND key = %s"
            conn.execute(query, op[1:])
        else:
            _, session_id, turn, kind, data, meta, created = op
            conn.execute(_TOUCH, (created, turn, int(kind == "message"), session_id))
            conn.execute(_APPEND, (session_id, turn, kind, data, meta, created, session_id))

    # -- reading (sees every record this store appended before the call, and what others committed)

    def _rows(
        self, wait_for: str | None, query: str, args: tuple[Any, ...], *, by_key: bool = False
    ) -> builtins.list[Any]:
        if wait_for is None:
            self.flush()
        else:
            self._settle(wait_for)
        try:
            with self._pool.connection() as conn, conn.transaction():
                if by_key:  # a chain: one primary-key lookup per step, never a scan per step (the
                    conn.execute("SET LOCAL enable_seqscan = off")  # planner's guess on fresh tables)
                return conn.execute(query, args).fetchall()  # type: ignore[arg-type]
        except psycopg.Error as exc:
            raise StoreError(f"sessions.url {self.url}: {self._scrub(str(exc).strip())}") from None

    def load(self, session_id: str) -> builtins.list[dict[str, Any]] | None:
        query = "SELECT data FROM qwenrun_records WHERE session_id = %s AND kind = 'message' ORDER BY seq"
        rows = self._rows(session_id, query, (session_id,))
        if not rows and not self._rows(None, "SELECT 1 FROM qwenrun_sessions WHERE id = %s", (session_id,)):
            return None
        return [json.loads(data) for (data,) in rows]

    def get(self, session_id: str) -> StoredSession | None:
        info = self._rows(session_id, f"SELECT {_INFO} FROM qwenrun_sessions WHERE id = %s", (session_id,))
        if not info:
            return None
        rows = self._rows(
            session_id,
            "SELECT seq, turn, kind, data, meta, created FROM qwenrun_records WHERE session_id = %s "
            "ORDER BY seq",
            (session_id,),
        )
        records = [Record(seq, turn, kind, json.loads(data), json.loads(meta), created)
                   for seq, turn, kind, data, meta, created in rows]  # fmt: skip
        return StoredSession(SessionInfo(*info[0]), records)

    def list(self, limit: int = 50, agent: str | None = None) -> builtins.list[SessionInfo]:
        where, args = ("WHERE agent = %s", (agent,)) if agent else ("", ())
        query = f"SELECT {_INFO} FROM qwenrun_sessions {where} ORDER BY updated DESC, id LIMIT %s"
        return [SessionInfo(*row) for row in self._rows(None, query, (*args, limit))]

    # -- stored responses (the OpenAI server's /v1/responses) ----------------------------------

    def get_response(self, response_id: str, newer_than: float = 0.0) -> StoredResponse | None:
        chain = self._rows(f"responses/{response_id}", _CHAIN, (response_id, newer_than), by_key=True)
        return chain_response(response_id, chain)

    def delete_response(self, response_id: str) -> bool:
        key = f"responses/{response_id}"
        query = "SELECT 1 FROM qwenrun_responses WHERE id = %s AND NOT deleted"
        if not self._rows(key, query, (response_id,)):
            return False
        self._put(("unrespond", response_id))
        self._settle(key)
        return True

    # -- the memory toolset's facts ---------------------------------------------------------------

    def facts(self, namespace: str, scope: str) -> builtins.list[Fact]:
        query = ("SELECT key, value, created, updated FROM qwenrun_memories WHERE namespace = %s "
                 "AND scope = %s ORDER BY updated DESC, key")  # fmt: skip
        return [Fact(*row) for row in self._rows(memory_key(namespace, scope), query, (namespace, scope))]

    def delete_fact(self, namespace: str, scope: str, key: str) -> bool:
        query = "SELECT 1 FROM qwenrun_memories WHERE namespace = %s AND scope = %s AND key = %s"
        if not self._rows(memory_key(namespace, scope), query, (namespace, scope, key)):
            return False
        self._unfact(namespace, scope, key)
        return True

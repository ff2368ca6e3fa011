"""Both session stores (SQLite, a real PostgreSQL: tests/pg_server.py) on what replicas need:
responses kept as deltas (chains, deleting one, pruning), several stores on one database writing
one session at once, schema versions (created, upgraded, a newer one refused), and the
``sessions.store: postgres`` section with its URL kept out of messages."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from pathlib import Path

import pytest
from conftest import StoreDB
from pg_server import PostgresServer

from qwenrun.errors import ConfigError, StoreError
from qwenrun.sessions import open_store
from qwenrun.sessions.postgres import PostgresStore, redact
from qwenrun.sessions.sqlite import SQLiteStore
from qwenrun.sessions.store import SessionInfo, StoredResponse
from qwenrun.sessions.writer import SCHEMA_VERSION
from qwenrun.spec.agent_file import AgentSpec


def item(n: int) -> dict[str, object]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": f"第{n}问"}]}


def chain(store: SQLiteStore | PostgresStore, length: int, prefix: str = "r", start: float = 1.0) -> None:
    """``length`` responses, each continuing the one before with two new items."""
    conversation: list[dict[str, object]] = []
    previous: StoredResponse | None = None
    for n in range(length):
        new = [*conversation, item(2 * n), item(2 * n + 1)]
        parent, inherited = (None, 0) if previous is None else (previous.id, len(conversation))
        previous = StoredResponse(
            f"{prefix}{n}", "o", start + n, {"id": f"{prefix}{n}"}, new, parent, inherited
        )
        store.put_response(previous)
        conversation = new


def kept_items(db: StoreDB) -> dict[str, int]:
    rows = db.rows(f"SELECT id, items FROM {db.table('responses')}")
    return {response_id: len(json.loads(items)) for response_id, items in rows}


def test_responses_are_stored_as_deltas_and_read_whole(store_db: StoreDB) -> None:
    store = store_db.open()
    chain(store, 30)
    assert set(kept_items(store_db).values()) == {2}  # flat: every row keeps its own two items
    last = store.get_response("r29")
    assert last is not None and last.parent == "r28" and last.inherited == 58
    assert last.conversation == [item(n) for n in range(60)]
    other = store_db.open()  # another replica reads what this one wrote, right after put_response
    again = other.get_response("r29")
    assert again is not None and again.conversation == last.conversation


def test_deleting_one_response_keeps_the_others_conversations(store_db: StoreDB) -> None:
    store = store_db.open()
    chain(store, 3)
    assert store.delete_response("r1") is True and store.delete_response("r1") is False
    assert store.get_response("r1") is None
    first, last = store.get_response("r0"), store.get_response("r2")
    assert first is not None and first.conversation == [item(0), item(1)]
    assert last is not None and last.conversation == [item(n) for n in range(6)]
    assert sorted(kept_items(store_db)) == ["r0", "r1", "r2"]  # r1's items: r2 needs them
    assert store.delete_response("r2") is True
    assert sorted(kept_items(store_db)) == ["r0"]  # nothing needs r1 now: gone with r2
    assert store.delete_response("r0") is True and kept_items(store_db) == {}


def test_pruning_keeps_what_newer_responses_need(store_db: StoreDB) -> None:
    store = store_db.open()
    chain(store, 4)  # created 1.0 .. 4.0
    chain(store, 2, prefix="old", start=0.0)  # 0.0, 1.0: nothing newer needs them
    store.prune_responses(older_than=3.5)
    store.flush()
    assert [store.get_response(f"r{n}") is None for n in range(4)] == [True, True, True, False]
    assert store.get_response("old0") is None and store.get_response("old1") is None
    last = store.get_response("r3")
    assert last is not None and last.conversation == [item(n) for n in range(8)]
    assert sorted(kept_items(store_db)) == ["r0", "r1", "r2", "r3"]
    store.prune_responses(older_than=10.0)
    store.flush()
    assert kept_items(store_db) == {}


def test_a_response_whose_parent_is_gone_is_kept_whole(store_db: StoreDB) -> None:
    store = store_db.open()
    chain(store, 1)
    whole = [item(0), item(1), item(2)]
    assert store.delete_response("r0") is True  # deleted while the next turn ran
    store.put_response(StoredResponse("r1", "o", 2.0, {"id": "r1"}, whole, "r0", 2))
    kept = store.get_response("r1")
    assert kept is not None and kept.conversation == whole and kept.parent is None
    assert kept_items(store_db) == {"r1": 3}


def test_replicas_appending_to_one_session_lose_and_reorder_nothing(store_db: StoreDB) -> None:
    replicas, per_replica = [store_db.open() for _ in range(3)], 120
    replicas[0].create(SessionInfo("shared", "x"))
    replicas[0].flush()
    start = threading.Barrier(len(replicas))

    def write(n: int) -> None:
        start.wait()
        for i in range(per_replica):
            replicas[n].append("shared", i + 1, "message", {"role": "user", "content": f"{n}:{i}"}, {})
            if i % 10 == 0:
                replicas[n].flush()  # commit in many small transactions, interleaved with the others
        replicas[n].flush()

    workers = [threading.Thread(target=write, args=(n,)) for n in range(len(replicas))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stored = replicas[1].get("shared")
    assert stored is not None
    assert [r.seq for r in stored.records] == list(range(len(replicas) * per_replica))
    contents = [r.data["content"] for r in stored.records]
    for n in range(len(replicas)):  # each replica's records in its own order, none lost
        assert [c for c in contents if c.startswith(f"{n}:")] == [f"{n}:{i}" for i in range(per_replica)]
    assert stored.info.messages == len(replicas) * per_replica and stored.info.turns == per_replica


def test_the_schema_version_is_recorded_and_a_newer_one_refused(store_db: StoreDB) -> None:
    store_db.open().close()
    if store_db.kind == "sqlite":
        assert store_db.rows("PRAGMA user_version") == [(SCHEMA_VERSION,)]
        with sqlite3.connect(store_db.where) as conn:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    else:
        assert store_db.rows("SELECT version FROM qwenrun_schema") == [(SCHEMA_VERSION,)]
        store_db.rows("UPDATE qwenrun_schema SET version = version + 1")
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this qwenrun's"):
        store_db.open()


def test_replicas_starting_at_once_create_the_schema_once(postgres: PostgresServer) -> None:
    url, opened, failures = postgres.database(), [], []

    def start() -> None:
        try:
            opened.append(PostgresStore(url))
        except Exception as exc:
            failures.append(exc)

    workers = [threading.Thread(target=start) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert failures == [] and len(opened) == 4
    opened[0].create(SessionInfo("a", "x"))
    assert all(store.get("a") is not None for store in opened)
    for store in opened:
        store.close()


def test_a_sqlite_file_of_schema_1_is_upgraded_to_deltas(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # the layout of qwenrun 0.1: each response kept whole
        conn.executescript(
            "CREATE TABLE sessions (id TEXT PRIMARY KEY, agent TEXT NOT NULL, source TEXT, frontend TEXT NOT NULL,"
            " model TEXT NOT NULL, title TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,"
            " turns INTEGER NOT NULL DEFAULT 0, messages INTEGER NOT NULL DEFAULT 0);"
            "CREATE TABLE responses (id TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL,"
            " response TEXT NOT NULL, conversation TEXT NOT NULL);"
        )
        whole: list[dict[str, object]] = []
        for n in range(5):
            whole = [*whole, item(n)]
            response = {"id": f"r{n}", "previous_response_id": f"r{n - 1}" if n else None}
            conn.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?)",
                         (f"r{n}", "", float(n), json.dumps(response), json.dumps(whole)))  # fmt: skip
        conn.execute("INSERT INTO sessions VALUES ('s', 'a', NULL, 'cli', '', '', 1, 1, 0, 0)")
    store = SQLiteStore(path)
    try:
        last = store.get_response("r4")
        assert last is not None and last.conversation == whole and last.parent == "r3"
        assert store.get("s") is not None
    finally:
        store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        sizes = [len(json.loads(items)) for (items,) in conn.execute("SELECT items FROM responses")]
    assert sizes == [1] * 5


# -- the sessions section ------------------------------------------------------------------------


def spec_of(sessions: dict[str, object]) -> AgentSpec:
    return AgentSpec.from_dict({"model": {"path": "m"}, "sessions": sessions}, source="agent.yaml")


def test_postgres_section_errors_and_the_url_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, postgres: PostgresServer
) -> None:
    with pytest.raises(ConfigError, match=r"agent.yaml: sessions: .*url is for store: postgres"):
        spec_of({"url": "postgresql://a@b/c"})
    with pytest.raises(ConfigError, match=r"agent.yaml: sessions: .*path is for store: sqlite"):
        spec_of({"store": "postgres", "path": "x.db"})
    monkeypatch.delenv("QWENRUN_DATABASE_URL", raising=False)
    with pytest.raises(ConfigError, match=r"agent.yaml: sessions.url: store postgres needs a database URL"):
        open_store(spec_of({"store": "postgres"}))
    url = postgres.database()
    monkeypatch.setenv("QWENRUN_DATABASE_URL", url)
    spec = AgentSpec.from_text("model: {path: m}\nsessions: {store: postgres, url: '${QWENRUN_DATABASE_URL}'}\n",
                               source="agent.yaml")  # fmt: skip
    assert postgres.password not in repr(spec) and postgres.password not in spec.model_dump_json()
    store = open_store(spec)
    try:
        assert isinstance(store, PostgresStore) and postgres.password not in repr(store)
    finally:
        assert store is not None
        store.close()


def test_the_password_is_in_no_error_or_log_line(
    postgres: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    assert redact("postgresql://u:s3cr3t@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("host=h password='a b' user=u") == "host=h password=*** user=u"
    wrong = postgres.url("postgres").replace(postgres.password, "not-the-password")
    with pytest.raises(StoreError) as info:
        PostgresStore(wrong)
    assert "not-the-password" not in str(info.value) and "password authentication failed" in str(info.value)
    store = PostgresStore(postgres.database())
    try:
        with caplog.at_level(logging.WARNING, logger="qwenrun.sessions"):
            store.append("s", 1, "message", {"role": "user", "content": "x"}, {})  # no session row
            store.append("s", 1, "event", {"type": "final"}, {})
            store.flush()
            store._writer.close()  # the connection drops: the next batch reconnects
            store.create(SessionInfo("t", "x"))
            store.flush()
        assert store.get("t") is not None
        assert postgres.password not in caplog.text
    finally:
        store.close()

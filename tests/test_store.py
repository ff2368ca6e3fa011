"""The session store (qwenrun/sessions/store.py, qwenrun/sessions/sqlite.py): SQLite round trips, concurrent writers, the Session hook,
resuming, and every front end (REPL, OpenAI server, Chainlit) recording to the same store."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import StoreDB
from weather import get_current_weather

from qwenrun.agent import Agent
from qwenrun.cli import common as cli
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.errors import ConfigError, EngineError
from qwenrun.frontends.openai import create_app
from qwenrun.sessions import open_store
from qwenrun.sessions.postgres import PostgresStore
from qwenrun.sessions.sqlite import SQLiteStore
from qwenrun.sessions.store import (
    DB_ENV,
    ResponseStore,
    SessionInfo,
    SessionStore,
    StoredResponse,
    store_path,
    valid_session_id,
)
from qwenrun.spec.agent_file import AgentSpec


def weather_script(request: ModelRequest) -> str:
    """Call the tool for a fresh question, answer after a tool result."""
    last = request.messages[-1]
    if last["role"] == "tool":
        return f"答：{last['content']}"
    return tool_call_text("get_current_weather", {"city": str(last["content"])[:2]})


def make_spec(source: str = "tests/store.yaml", **sections: Any) -> AgentSpec:
    data = {"model": {"path": "scripted", "served_model_name": "scripted-qwen"},
            "agent": {"name": "weather"}, **sections}  # fmt: skip
    return AgentSpec.from_dict(data, source=source)


def make_agent(store: SessionStore | None, script: Any = weather_script, **engine: Any) -> Agent:
    return Agent(make_spec(), ScriptedEngine(script, **engine), tools=[get_current_weather], store=store)


@pytest.fixture
def store(store_db: StoreDB) -> SQLiteStore | PostgresStore:
    """A store of each kind (SQLite, PostgreSQL): the tests that take it run on both."""
    return store_db.open()


def roles(store: SQLiteStore, session_id: str) -> list[str]:
    stored = store.get(session_id)
    assert stored is not None
    return [r.data["role"] if r.kind == "message" else r.data["type"] for r in stored.records]


# -- the store itself -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["file", ":memory:"])
def test_round_trip(tmp_path: Path, where: str) -> None:
    store = SQLiteStore(tmp_path / "s.db" if where == "file" else ":memory:")
    try:
        assert isinstance(store, SessionStore)
        assert store.load("nope") is None and store.get("nope") is None and store.list() == []
        store.create(SessionInfo("s1", "weather", title="hi", created=1.0, updated=1.0))
        store.create(SessionInfo("s1", "other"))  # a known id: ignored
        assert store.load("s1") == []
        store.append("s1", 1, "message", {"role": "user", "content": "广州?"}, {})
        store.append(
            "s1", 1, "message", {"role": "assistant", "content": "晴"}, {"usage": {"prompt_tokens": 3}}
        )
        store.append("s1", 1, "event", {"type": "final"}, {"duration_s": 0.5})
        assert store.load("s1") == [
            {"role": "user", "content": "广州?"},
            {"role": "assistant", "content": "晴"},
        ]
        stored = store.get("s1")
        assert stored is not None
        assert [(r.seq, r.turn, r.kind) for r in stored.records] == [
            (0, 1, "message"),
            (1, 1, "message"),
            (2, 1, "event"),
        ]
        assert stored.records[1].meta == {"usage": {"prompt_tokens": 3}}
        assert stored.messages() == store.load("s1")
        info = stored.info
        assert (info.agent, info.title, info.turns, info.messages) == ("weather", "hi", 1, 2)
        assert info.updated >= stored.records[-1].created > 1.0
        store.create(SessionInfo("s2", "calc", created=2.0, updated=2.0))
        assert [i.id for i in store.list()] == ["s1", "s2"]  # most recently updated first
        assert [i.id for i in store.list(agent="calc")] == ["s2"]
        assert [i.id for i in store.list(limit=1)] == ["s1"]
    finally:
        store.close()
    store.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        store.append("s1", 1, "message", {}, {})


def test_memory_stores_are_private(tmp_path: Path) -> None:
    first, second = SQLiteStore(":memory:"), SQLiteStore(":memory:")
    first.create(SessionInfo("a", "x"))
    assert second.get("a") is None and first.get("a") is not None
    first.close()
    second.close()


def test_records_survive_a_reopen_and_wal_is_on(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "s.db"  # parents are created
    store = SQLiteStore(path)
    store.create(SessionInfo("a", "x"))
    store.append("a", 1, "message", {"role": "user", "content": "q"}, {})
    store.close()
    again = SQLiteStore(path)
    assert again.load("a") == [{"role": "user", "content": "q"}]
    again.close()
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


@pytest.mark.parametrize("where", ["file", ":memory:"])
def test_responses_round_trip_prune_and_reopen(tmp_path: Path, where: str) -> None:
    path = tmp_path / "r.db" if where == "file" else ":memory:"
    store = SQLiteStore(path)
    assert isinstance(store, ResponseStore) and store.get_response("resp_1") is None
    old = StoredResponse("resp_1", "owner-hash", 100.0, {"id": "resp_1", "output": []}, [{"type": "message"}])
    new = StoredResponse("resp_2", "", 200.0, {"id": "resp_2", "text": "广州"}, [])
    store.put_response(old)
    store.put_response(new)
    assert store.get_response("resp_1") == old  # read right after the queued write
    assert (
        store.get_response("resp_1", newer_than=150.0) is None and store.get_response("resp_2", 150.0) == new
    )
    store.create(SessionInfo("resp_1", "x"))  # a session of the same id is another thing
    assert store.delete_response("resp_1") is True and store.delete_response("resp_1") is False
    assert store.get_response("resp_1") is None and store.get("resp_1") is not None
    store.put_response(old)
    store.prune_responses(older_than=150.0)
    store.flush()
    assert store.get_response("resp_1") is None and store.get_response("resp_2") == new
    store.close()
    if where == "file":
        again = SQLiteStore(path)
        assert again.get_response("resp_2") == new and again.list() != []
        again.close()


def test_a_database_from_before_responses_gets_the_table(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE sessions (id TEXT PRIMARY KEY, agent TEXT NOT NULL, source TEXT, "
                       "frontend TEXT NOT NULL, model TEXT NOT NULL, title TEXT NOT NULL, created REAL NOT NULL, "
                       "updated REAL NOT NULL, turns INTEGER NOT NULL DEFAULT 0, messages INTEGER NOT NULL DEFAULT 0)")  # fmt: skip
    conn.close()
    store = SQLiteStore(path)
    store.put_response(StoredResponse("resp_1", "", 1.0, {}, []))
    assert store.get_response("resp_1") is not None
    store.close()


def test_many_threads_one_store_exact_counts_and_order(store: SQLiteStore) -> None:
    threads, per_thread = 8, 150
    ids = [f"t{n}" for n in range(threads)]
    for session_id in [*ids, "shared"]:
        store.create(SessionInfo(session_id, "x"))
    start = threading.Barrier(threads)

    def write(n: int) -> None:
        start.wait()
        for i in range(per_thread):
            store.append(ids[n], 1, "message", {"role": "user", "content": f"{n}:{i}"}, {})
            store.append("shared", 1, "message", {"role": "user", "content": f"{n}:{i}"}, {})

    workers = [threading.Thread(target=write, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for n, session_id in enumerate(ids):
        assert [m["content"] for m in store.load(session_id) or []] == [f"{n}:{i}" for i in range(per_thread)]
    shared = [m["content"] for m in store.load("shared") or []]
    assert len(shared) == threads * per_thread == len(set(shared))
    for n in range(threads):  # each writer's records keep their order in the shared session
        assert [c for c in shared if c.startswith(f"{n}:")] == [f"{n}:{i}" for i in range(per_thread)]
    stored = store.get("shared")
    assert stored is not None and [r.seq for r in stored.records] == list(range(threads * per_thread))
    assert stored.info.messages == threads * per_thread


def test_several_stores_on_one_file_like_processes(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    stores = [SQLiteStore(path) for _ in range(4)]
    per_store = 200

    def write(n: int) -> None:
        stores[n].create(SessionInfo(f"s{n}", "x"))
        for i in range(per_store):
            stores[n].append(f"s{n}", i // 10 + 1, "message", {"role": "user", "content": str(i)}, {})
            stores[n].append("common", 1, "event", {"type": "mark", "who": n, "i": i}, {})
        stores[n].flush()

    workers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    reader = stores[0]
    for n in range(4):
        assert [m["content"] for m in reader.load(f"s{n}") or []] == [str(i) for i in range(per_store)]
        info = reader.get(f"s{n}")
        assert info is not None and info.info.turns == per_store // 10
    rows = sqlite3.connect(path).execute("SELECT data FROM records WHERE session_id = 'common' ORDER BY seq")
    marks = [json.loads(data) for (data,) in rows]
    assert len(marks) == 4 * per_store
    for n in range(4):
        assert [m["i"] for m in marks if m["who"] == n] == list(range(per_store))
    for opened in stores:
        opened.close()


def records_on_disk(path: Path, session_id: str) -> list[int]:
    """The sequence numbers of one session's committed records, read by another connection."""
    reader = sqlite3.connect(path)
    try:
        rows = reader.execute("SELECT seq FROM records WHERE session_id = ? ORDER BY seq", (session_id,))
        return [int(row[0]) for row in rows]
    finally:
        reader.close()


def rows_on_disk(path: Path) -> int:
    """The records another connection can read (what the store has committed)."""
    reader = sqlite3.connect(path)
    try:
        return int(reader.execute("SELECT COUNT(*) FROM records").fetchone()[0])
    finally:
        reader.close()


def test_a_locked_database_is_retried_not_lost(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "locked.db"
    writes: list[tuple[int, bool]] = []
    store = SQLiteStore(path, busy_timeout_s=2, on_write=lambda s, n, failed: writes.append((n, failed)))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    retried = threading.Event()

    class Retries(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().endswith("; retrying"):
                retried.set()

    handler = Retries()
    logging.getLogger("qwenrun.sessions").addHandler(handler)  # the writer logs under it
    try:
        store.create(SessionInfo("a", "x"))
        store.append("a", 1, "message", {"role": "user", "content": "q"}, {})  # returns: never waits for the lock
        assert rows_on_disk(path) == 0  # not written yet: the lock is still held
        assert retried.wait(60), "the writer never met the lock"
    finally:
        logging.getLogger("qwenrun.sessions").removeHandler(handler)
    blocker.execute("COMMIT")
    assert store.load("a") == [{"role": "user", "content": "q"}]
    assert writes[-1] == (2, False) or sum(n for n, failed in writes if not failed) == 2
    assert "records lost" not in caplog.text
    store.close()
    blocker.close()


def test_observers_subscribe_to_the_stores_writes_and_a_broken_one_is_only_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store: SessionStore = SQLiteStore(tmp_path / "observed.db")
    seen: list[tuple[int, bool]] = []

    def broken(seconds: float, records: int, failed: bool) -> None:
        raise RuntimeError("observer bug")

    store.subscribe(broken)
    store.subscribe(lambda seconds, records, failed: seen.append((records, failed)))
    store.create(SessionInfo("a", "x"))
    store.append("a", 1, "message", {"role": "user", "content": "q"}, {})
    store.flush()
    assert sum(records for records, failed in seen if not failed) == 2 and seen[-1][1] is False
    assert store.load("a") == [{"role": "user", "content": "q"}]
    assert "session store observer failed" in caplog.text
    store.close()


def test_session_ids() -> None:
    assert valid_session_id(uuid.uuid4().hex) and valid_session_id(str(uuid.uuid4()))
    assert valid_session_id("my-chat:2.a_b")
    for bad in ["", "a b", "x" * 129, "../etc", "ü"]:
        assert not valid_session_id(bad)


# -- configuration ---------------------------------------------------------------------------------


def test_sessions_section_defaults_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec()
    assert (spec.sessions.enabled, spec.sessions.store, spec.sessions.path) == (True, "sqlite", None)
    monkeypatch.setenv(DB_ENV, str(tmp_path / "env.db"))
    assert store_path(spec) == str(tmp_path / "env.db")
    monkeypatch.delenv(DB_ENV)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert store_path(spec) == str(tmp_path / "xdg" / "qwenrun" / "sessions.db")
    agent_file = tmp_path / "agents" / "a.yaml"
    relative = make_spec(str(agent_file), sessions={"path": "data/s.db"})
    assert store_path(relative) == str(tmp_path / "agents" / "data" / "s.db")
    assert store_path(make_spec(sessions={"path": ":memory:"})) == ":memory:"
    assert open_store(make_spec(sessions={"enabled": False})) is None
    memory = open_store(make_spec(sessions={"path": ":memory:"}))
    assert isinstance(memory, SQLiteStore)
    memory.close()
    for section, message in [
        ({"store": "redis"}, "sessions.store: Input should be 'sqlite'"),
        ({"path": ""}, "sessions.path: String should have at least 1 character"),
        ({"enable": False}, "sessions.enable: unknown key 'enable'; did you mean 'enabled'?"),
        ({"enabled": "maybe"}, "sessions.enabled: Input should be a valid boolean"),
    ]:
        with pytest.raises(ConfigError) as info:
            make_spec("a.yaml", sessions=section)
        assert str(info.value).startswith(f"a.yaml: {message}")


def test_the_cli_builds_agents_with_the_files_store(tmp_path: Path) -> None:
    spec = make_spec(str(tmp_path / "a.yaml"), sessions={"path": "s.db"})
    agent = cli.make_agent(spec)  # a VLLMEngine that is never started
    assert isinstance(agent.store, SQLiteStore) and agent.store.path == str(tmp_path / "s.db")
    agent.store.close()
    off = cli.make_agent(make_spec(sessions={"enabled": False}))
    assert off.store is None


# -- the Session hook --------------------------------------------------------------------------------


async def test_every_message_is_recorded_as_it_happens(store: SQLiteStore) -> None:
    agent = make_agent(store)
    session = agent.session()
    seen: list[list[str]] = []
    async for _event in session.stream("广州天气?"):
        seen.append(roles(store, session.id) if session.stored else [])
    # the user message is stored before the first model call returns, the tool call before it runs
    assert ["user"] in seen and ["user", "assistant"] in seen
    assert roles(store, session.id) == ["user", "assistant", "tool", "assistant", "final"]
    stored = store.get(session.id)
    assert stored is not None
    call, result, answer, final = stored.records[1:]
    assert call.meta["usage"]["model_calls"] == 1 and call.meta["usage"]["completion_tokens"] > 0
    assert result.meta["is_error"] is False and result.meta["duration_s"] >= 0
    assert answer.meta["finish_reason"] == "stop"
    assert final.data == {"type": "final", "stop_reason": "answer", "iterations": 2, "tool_calls": 1}
    assert final.meta["usage"]["model_calls"] == 2 and final.meta["duration_s"] > 0
    info = stored.info
    assert (info.agent, info.model, info.frontend, info.title, info.source) == (
        "weather", "scripted-qwen", "cli", "广州天气?", str(Path("tests/store.yaml").resolve()))  # fmt: skip
    assert stored.messages() == session.messages


async def test_resume_continues_history_and_turn_numbers(store: SQLiteStore) -> None:
    agent = make_agent(store)
    first = agent.session()
    await first.ask("广州天气?")
    resumed = agent.session(first.id)
    assert resumed.messages == first.messages and resumed.stored
    await resumed.ask("深圳呢?")
    engine = agent.engine
    assert isinstance(engine, ScriptedEngine)
    assert [m["content"] for m in engine.calls[-2].messages if m["role"] == "user"] == [
        "广州天气?",
        "深圳呢?",
    ]
    stored = store.get(first.id)
    assert stored is not None and stored.info.turns == 2
    assert [r.turn for r in stored.records] == [1] * 5 + [2] * 5
    fresh = agent.session("brand-new-id")  # an unknown id starts a session of that id
    assert fresh.messages == [] and not fresh.stored
    await fresh.ask("北京?")
    assert store.load("brand-new-id") is not None


async def test_reasoning_is_recorded_resumed_and_does_not_change_a_replay(store: SQLiteStore) -> None:
    """Each assistant message keeps its reasoning (``reasoning_content``); a resumed session has it
    back for the chat template, and ``qwenrun replay`` compares the calls as before."""
    from qwenrun.agent.replay import recorded_turns, replay

    def thinking(request: ModelRequest) -> str:
        return f"<think>\nthought {len(request.messages)}\n</think>\n\n" + weather_script(request)

    agent = make_agent(store, thinking)
    first = agent.session()
    await first.ask("广州天气?")
    stored = store.get(first.id)
    assert stored is not None
    assistants = [r.data for r in stored.records if r.kind == "message" and r.data["role"] == "assistant"]
    assert [m["reasoning_content"] for m in assistants] == ["thought 2", "thought 4"]
    assert agent.session(first.id).messages == first.messages
    diff = await replay(make_agent(None, thinking), recorded_turns(stored))
    assert not diff.differing and diff.turns[0].turn.calls == ['get_current_weather({"city": "广州"})']


async def test_errors_and_cancellations_are_recorded(store: SQLiteStore) -> None:
    agent = make_agent(store, ["unused"])
    engine = agent.engine
    assert isinstance(engine, ScriptedEngine)
    engine.dead = True
    session = agent.session()
    with pytest.raises(EngineError):
        await session.ask("hi")
    stored = store.get(session.id)
    assert stored is not None
    assert [r.data.get("type") for r in stored.records if r.kind == "event"] == ["error"]
    assert stored.records[-1].data["error"] == "EngineError: the scripted engine is dead"
    engine.dead = False
    slow = make_agent(store, ["很长的回答。" * 100], delay_s=0.01, chunk_size=2)
    talk = slow.session()
    task = asyncio.ensure_future(talk.ask("写长文"))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert roles(store, talk.id) == ["user", "assistant", "cancelled"]
    stored = store.get(talk.id)
    assert stored is not None and stored.records[1].meta == {"interrupted": True}


async def test_reset_starts_a_new_recorded_session(store: SQLiteStore) -> None:
    agent = make_agent(store)
    session = agent.session()
    await session.ask("广州?")
    old = session.id
    session.reset()
    assert session.id != old and session.messages == []
    await session.ask("深圳?")
    assert [i.turns for i in store.list()] == [1, 1]


async def test_unrecorded_sessions_and_a_failing_store(
    store: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    agent = make_agent(store)
    await agent.session(record=False).ask("广州?")
    assert store.list() == []

    class Broken(SQLiteStore):
        def append(self, *args: Any) -> None:
            raise OSError("disk full")

    broken = Broken(":memory:")
    final = await make_agent(broken).session().ask("广州?")
    assert final.text.startswith("答：")  # the turn goes on
    assert "cannot record" in caplog.text and "disk full" in caplog.text
    broken.close()


@pytest.mark.timeout(300, method="thread")  # a hang guard: a turn that waited for the disk would hang
async def test_fifty_concurrent_sessions_five_turns_each(tmp_path: Path) -> None:
    """Exact rows and order under load, and every turn's records are on disk when its answer is
    returned (a replica on the same database may resume the session next)."""
    path = tmp_path / "sessions.db"
    store = SQLiteStore(path, busy_timeout_s=600)  # the writer thread waits out a held lock
    agent = make_agent(store, delay_s=0.001)

    async def talk(n: int) -> str:
        session = agent.session(f"load-{n}")
        for turn in range(5):
            await session.ask(f"城市{n}-{turn}")
            assert len(records_on_disk(path, session.id)) == 5 * (turn + 1)
        return session.id

    try:
        ids = await asyncio.gather(*(talk(n) for n in range(50)))
        assert rows_on_disk(path) == 50 * 25  # no flush: the answers waited for their records
        check_fifty_sessions(store, path, ids)
    finally:
        store.close()


async def test_a_turn_answers_once_its_records_are_written(tmp_path: Path) -> None:
    """While another connection holds the database's write lock, a turn does not answer; once the
    lock is released it answers with its records on disk."""
    path = tmp_path / "sessions.db"
    store = SQLiteStore(path, busy_timeout_s=600)
    agent = make_agent(store, delay_s=0.001)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    session = agent.session("locked")
    turn = asyncio.ensure_future(session.ask("广州?"))
    try:
        done, _ = await asyncio.wait({turn}, timeout=0.5)
        assert not done and rows_on_disk(path) == 0  # it cannot answer: its records wait
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    try:
        final = await asyncio.wait_for(turn, timeout=60)
        assert final.text and len(records_on_disk(path, "locked")) == 5
    finally:
        store.close()


def check_fifty_sessions(store: SQLiteStore, path: Path, ids: list[str]) -> None:
    for n, session_id in enumerate(ids):
        stored = store.get(session_id)
        assert stored is not None
        assert len(stored.records) == 25 and [r.seq for r in stored.records] == list(range(25))
        assert [r.turn for r in stored.records] == [t for t in range(1, 6) for _ in range(5)]
        users = [r.data["content"] for r in stored.records if r.data.get("role") == "user"]
        assert users == [f"城市{n}-{t}" for t in range(5)]
        assert (stored.info.turns, stored.info.messages) == (5, 20)
    assert len(store.list(limit=100)) == 50 and rows_on_disk(path) == 50 * 25


# -- every front end records to the same store ---------------------------------------------------


def server_app(store: SQLiteStore | None) -> tuple[Agent, Any]:
    spec = make_spec(frontend={"kind": "openai"})
    agent = Agent(spec, ScriptedEngine(weather_script), tools=[get_current_weather], store=store)
    return agent, create_app(agent)


async def post(app: Any, body: dict[str, Any], session: str | None = None) -> httpx.Response:
    headers = {"X-Qwenrun-Session": session} if session is not None else {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        return await http.post("/v1/chat/completions", json=body, headers=headers)


def ask(text: str, *history: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    messages = [*history, {"role": "user", "content": text}]
    return {"model": "weather", "messages": messages, "stream": stream}


async def test_server_session_header_loads_history_and_records(store: SQLiteStore) -> None:
    agent, app = server_app(store)
    first = await post(app, ask("广州?"), session="chat-1")
    assert first.status_code == 200, first.text
    assert first.headers["x-qwenrun-session"] == "chat-1"
    # the server's history wins over the request's earlier messages
    second = await post(
        app, ask("深圳?", {"role": "user", "content": "ignored"}, stream=True), session="chat-1"
    )
    assert second.status_code == 200 and second.headers["x-qwenrun-session"] == "chat-1"
    engine = agent.engine
    assert isinstance(engine, ScriptedEngine)
    assert [m["content"] for m in engine.calls[-1].messages if m["role"] == "user"] == ["广州?", "深圳?"]
    assert roles(store, "chat-1") == ["user", "assistant", "tool", "assistant", "final"] * 2
    stored = store.get("chat-1")
    assert stored is not None and stored.info.frontend == "openai"
    plain = await post(app, ask("北京?"))  # no header: stateless, nothing recorded
    assert plain.status_code == 200 and "x-qwenrun-session" not in plain.headers
    assert [i.id for i in store.list()] == ["chat-1"]


async def test_server_session_header_errors(store: SQLiteStore) -> None:
    agent, app = server_app(store)
    bad = await post(app, ask("x"), session="a b")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_session_id"
    passthrough = await post(
        app, {"model": "scripted-qwen", "messages": [{"role": "user", "content": "x"}]}, "s"
    )
    assert passthrough.status_code == 400 and "agent mode" in passthrough.json()["error"]["message"]
    _, no_store = server_app(None)
    disabled = await post(no_store, ask("x"), session="s")
    assert disabled.status_code == 400 and disabled.json()["error"]["code"] == "sessions_disabled"
    engine = agent.engine
    assert isinstance(engine, ScriptedEngine)
    engine.delay_s = 0.005  # a turn takes ~0.25 s: the second request comes while it runs
    results = await asyncio.gather(post(app, ask("广州?"), "busy"), post(app, ask("深圳?"), "busy"))
    assert sorted(r.status_code for r in results) == [200, 409]
    conflict = next(r for r in results if r.status_code == 409).json()["error"]
    assert conflict["code"] == "session_busy"
    again = await post(app, ask("北京?"), "busy")  # released after the turn
    assert again.status_code == 200
    assert store.get("busy") is not None and store.get("busy").info.turns == 2  # type: ignore[union-attr]


async def test_chainlit_records_under_the_thread_id_and_resumes_it(store: SQLiteStore) -> None:
    from qwenrun.frontends.chainlit import app as web
    from qwenrun.frontends.chainlit import view as chainlit_view

    web.import_chainlit()  # first: it imports chainlit quietly, under a private app root
    spec = make_spec(frontend={"kind": "chainlit"})
    agent = Agent(spec, ScriptedEngine(weather_script), tools=[get_current_weather], store=store)
    web.build_app(agent)
    from chainlit import socket as chainlit_socket
    from chainlit.session import WebsocketSession

    thread = str(uuid.uuid4())

    async def tab(text: str, thread_id: str | None) -> WebsocketSession:
        async def emit(event: str, data: Any) -> None:
            return None

        async def emit_call(event: str, data: Any, timeout: int | None) -> None:
            return None

        sid = uuid.uuid4().hex
        session = WebsocketSession(id=str(uuid.uuid4()), socket_id=sid, emit=emit, emit_call=emit_call,
                                   user_env={}, client_type="webapp", thread_id=thread_id)  # fmt: skip
        payload = {"message": {"id": str(uuid.uuid4()), "threadId": "", "name": "User", "type": "user_message",
                               "output": text, "createdAt": chainlit_view.now()}, "fileReferences": None}  # fmt: skip
        await chainlit_socket.message(sid, payload)
        assert session.current_task is not None
        await session.current_task
        return session

    first = await tab("广州?", thread)
    assert first.thread_id == thread
    await first.delete()
    second = await tab("深圳?", thread)  # the same thread again (a resumed chat): its history is back
    await second.delete()
    engine = agent.engine
    assert isinstance(engine, ScriptedEngine)
    assert [m["content"] for m in engine.calls[-1].messages if m["role"] == "user"] == ["广州?", "深圳?"]
    stored = store.get(thread)
    assert stored is not None and (stored.info.frontend, stored.info.turns) == ("chainlit", 2)

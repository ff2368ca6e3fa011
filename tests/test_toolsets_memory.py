"""The ``memory`` toolset: facts kept in the session store (SQLite and a real PostgreSQL, the
``store_db`` fixture), surviving a reopened store; its scopes and every refusal."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import StoreDB

from qwenrun.agent import Agent
from qwenrun.agent.plugins import load_tools
from qwenrun.context import SESSION_ID
from qwenrun.engines.scripted import ScriptedEngine, tool_call_text
from qwenrun.errors import ToolError
from qwenrun.events import ToolResult
from qwenrun.sessions.sqlite import SQLiteStore
from qwenrun.sessions.store import MemoryStore
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.tools import Tool


def memory(store: MemoryStore | None, name: str = "helper", **settings: Any) -> dict[str, Tool]:
    spec = AgentSpec.from_dict(
        {"model": {"path": "x"}, "agent": {"name": name}, "tools": [{"toolset": "memory", **settings}]}
    )
    return {tool.name: tool for tool in load_tools(spec, store=store)}


async def call(tools: dict[str, Tool], name: str, session: str | None = None, **arguments: Any) -> str:
    token = SESSION_ID.set(session)
    try:
        return str(await asyncio.wait_for(tools[name].call(arguments), 60))
    finally:
        SESSION_ID.reset(token)


async def test_facts_survive_a_reopened_store(store_db: StoreDB) -> None:
    first = store_db.open()
    tools = memory(first)
    assert await call(tools, "remember", key="user name", fact="Ada Lovelace") == "Remembered 'user name'."
    assert await call(tools, "remember", key="units", fact="metric, please") == "Remembered 'units'."
    assert await call(tools, "remember", key="units", fact="imperial") == "Remembered 'units'."  # replaced
    first.close()
    again = memory(store_db.open())  # a restart: a new store on the same database
    assert await call(again, "recall") == "2 facts:\n- units: imperial\n- user name: Ada Lovelace"
    assert await call(again, "recall", query="ADA") == "1 fact:\n- user name: Ada Lovelace"
    assert await call(again, "recall", query="nothing") == "No remembered fact matches 'nothing'."
    assert await call(again, "forget", key="units") == "Forgot 'units'."
    with pytest.raises(ToolError, match="no fact is remembered under 'units'"):
        await call(again, "forget", key="units")
    table = store_db.table("memories")
    assert store_db.rows(f"SELECT namespace, scope, key, value FROM {table}") == [
        ("helper", "", "user name", "Ada Lovelace")
    ]
    assert await call(memory(store_db.open(), name="other"), "recall") == "No fact is remembered."
    shared = memory(store_db.open(), name="other", namespace="helper")  # one namespace: shared facts
    assert await call(shared, "recall") == "1 fact:\n- user name: Ada Lovelace"


async def test_session_scope_keeps_a_set_per_session(store_db: StoreDB) -> None:
    tools = memory(store_db.open(), scope="session")
    await call(tools, "remember", "s1", key="topic", fact="boats")
    assert await call(tools, "recall", "s2") == "No fact is remembered."
    assert await call(memory(store_db.open(), scope="session"), "recall", "s1") == "1 fact:\n- topic: boats"
    with pytest.raises(ToolError, match="kept per session, and the call runs outside a session"):
        await call(tools, "recall")
    assert await call(memory(store_db.open()), "recall", "s1") == "No fact is remembered."  # agent scope


async def test_refusals() -> None:
    tools = memory(SQLiteStore(":memory:"), max_facts=2, max_value_chars=10, max_results=1)
    with pytest.raises(ToolError, match="longer than 10 characters"):
        await call(tools, "remember", key="a", fact="x" * 11)
    with pytest.raises(ToolError, match="invalid arguments"):
        await call(tools, "remember", key="a/b", fact="x")
    with pytest.raises(ToolError, match="invalid arguments"):
        await call(tools, "remember", key="a", fact="")
    await call(tools, "remember", key="a", fact="one")
    await call(tools, "remember", key="b", fact="two")
    with pytest.raises(ToolError, match=r"already 2 facts \(max_facts\); forget one first"):
        await call(tools, "remember", key="c", fact="three")
    assert await call(tools, "remember", key="a", fact="uno") == "Remembered 'a'."  # a known key
    assert (await call(tools, "recall")).endswith("(1 more; narrow the query)")


async def test_without_a_store_facts_last_while_the_agent_runs() -> None:
    tools = memory(None)
    assert "no session store" in tools["recall"].description
    await call(tools, "remember", key="k", fact="v")
    assert await call(tools, "recall") == "1 fact:\n- k: v"


async def test_the_agent_remembers_in_one_run_and_recalls_in_the_next(tmp_path: Path) -> None:
    path = str(tmp_path / "sessions.db")
    spec = AgentSpec.from_dict({"model": {"path": "scripted"}, "agent": {"name": "notes"},
                                "tools": [{"toolset": "memory"}]})  # fmt: skip
    store = SQLiteStore(path)
    engine = ScriptedEngine([tool_call_text("remember", {"key": "city", "fact": "Lives in Paris"}), "Noted."])
    assert (await Agent(spec, engine, store=store).ask("I live in Paris")).text == "Noted."
    store.close()
    store = SQLiteStore(path)  # a restart
    engine = ScriptedEngine([tool_call_text("recall", {"query": "city"}), "You live in Paris."])
    session = Agent(spec, engine, store=store).session()
    events = [event async for event in session.stream("Where do I live?")]
    results = [event.content for event in events if isinstance(event, ToolResult)]
    assert results == ["1 fact:\n- city: Lives in Paris"]
    store.close()


async def test_a_database_of_schema_version_2_gains_the_memories_table(store_db: StoreDB) -> None:
    store_db.open().close()
    table = store_db.table("memories")
    store_db.rows(f"DROP TABLE {table}")  # as a qwenrun before the memory toolset left it
    if store_db.kind == "sqlite":
        store_db.rows("PRAGMA user_version = 2")
    else:
        store_db.rows("UPDATE qwenrun_schema SET version = 2")
    tools = memory(store_db.open())
    await call(tools, "remember", key="k", fact="v")
    assert store_db.rows(f"SELECT key, value FROM {table}") == [("k", "v")]


def test_the_parameters_in_the_toolsets_page_are_the_tools_own() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "toolsets.md").read_text(encoding="utf-8")
    shown = [json.loads(line) for block in re.findall(r"^```json\n(.*?)^```", text, re.S | re.M)
             for line in block.splitlines()]  # fmt: skip
    spec = AgentSpec.from_dict({"model": {"path": "x"}, "tools": [
        {"toolset": "shell", "root": "/", "allow": ["*"]}, {"toolset": "python"}, {"toolset": "memory"}]})  # fmt: skip
    tools = {tool.name: tool.parameters for tool in load_tools(spec)}
    assert [entry["name"] for entry in shown] == ["run_command", "run_python", "remember", "recall", "forget"]
    for entry in shown:
        assert entry["parameters"] == tools[entry["name"]], entry["name"]


async def test_todo_lists_are_kept_in_the_store_too(store_db: StoreDB) -> None:
    spec = AgentSpec.from_dict({"model": {"path": "x"}, "agent": {"name": "helper"},
                                "tools": [{"toolset": "todo"}, {"toolset": "memory", "scope": "session"}]})  # fmt: skip
    tools = {tool.name: tool for tool in load_tools(spec, store=store_db.open())}
    plan = [{"text": "find the file", "status": "done"}, {"text": "read it"}]
    shown = "To-do (1 of 2 done):\n1. [x] find the file\n2. [ ] read it"
    assert await call(tools, "todo_write", "s1", items=plan) == shown
    store_db.opened[-1].close()
    again = {tool.name: tool for tool in load_tools(spec, store=store_db.open())}  # a restart
    assert await call(again, "todo_read", "s1") == shown
    assert await call(again, "todo_read", "s2") == "The to-do list is empty."
    assert await call(again, "recall", "s1") == "No fact is remembered."  # not one of memory's facts
    assert store_db.rows(f"SELECT namespace, scope, key FROM {store_db.table('memories')}") == [
        ("helper/todo", "s1", "list")
    ]

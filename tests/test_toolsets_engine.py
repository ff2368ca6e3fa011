"""Built-in toolsets through the agent loop on the real vLLM engine (the tiny random-weight Qwen2
model): the forced call is pinned to exact text (:class:`~qwenrun.engines.scripted.PinnedEngine`),
the real chat template renders the tools and their results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qwenrun.agent import Agent
from qwenrun.agent.plugins import load_tools
from qwenrun.engines.scripted import PinnedEngine
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.events import Final, ToolCall, ToolResult
from qwenrun.sessions.sqlite import SQLiteStore
from qwenrun.spec.agent_file import AgentSpec

pytestmark = pytest.mark.engine


def call_json(name: str, arguments: dict[str, Any]) -> str:
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def toolset_spec(tiny_spec: AgentSpec, *entries: dict[str, Any], **top: Any) -> AgentSpec:
    data = tiny_spec.model_dump(mode="json")
    data["tools"] = list(entries)
    data["agent"] = {**data["agent"], "tool_choice": "required", "max_iterations": 2, **top.pop("agent", {})}
    data["sampling"] = {**data["sampling"], "max_tokens": 160}
    return AgentSpec.from_dict({**data, **top}, source="tests/toolsets-tiny.yaml")


async def test_python_and_shell_run_through_the_real_engine(
    engine: VLLMEngine, tiny_spec: AgentSpec, tmp_path: Path
) -> None:
    spec = toolset_spec(
        tiny_spec,
        {"toolset": "python", "approval": "auto"},
        {"toolset": "shell", "root": str(tmp_path), "allow": ["echo *"], "approval": "auto"},
        sessions={"enabled": False},
    )
    code = "print(sum(range(10)))"
    pinned = PinnedEngine(engine, call_json("run_python", {"code": code}))
    agent = Agent(spec, pinned, load_tools(spec))
    events = [event async for event in agent.session().stream("What is 0 + 1 + ... + 9?")]
    calls = [(e.name, e.arguments) for e in events if isinstance(e, ToolCall)]
    results = [(e.content, e.is_error) for e in events if isinstance(e, ToolResult)]
    assert calls == [("run_python", {"code": code})]
    assert results == [("exit status 0\n--- stdout ---\n45", False)]
    assert isinstance(events[-1], Final) and events[-1].tool_calls == 1
    prompt = engine.render(pinned.requests[1], agent.tool_schemas())
    assert '"name": "run_python"' in prompt and '"name": "run_command"' in prompt
    assert "<tool_response>\nexit status 0\n--- stdout ---\n45\n</tool_response>" in prompt


async def test_memory_is_kept_in_the_session_store_through_the_real_engine(
    engine: VLLMEngine, tiny_spec: AgentSpec, tmp_path: Path
) -> None:
    spec = toolset_spec(tiny_spec, {"toolset": "memory"}, agent={"name": "tiny-memory"})
    store = SQLiteStore(str(tmp_path / "sessions.db"))
    fact = {"key": "user name", "fact": "Ada"}
    pinned = PinnedEngine(engine, call_json("remember", fact))
    session = Agent(spec, pinned, store=store).session()
    events = [event async for event in session.stream("My name is Ada.")]
    assert [(e.name, e.arguments) for e in events if isinstance(e, ToolCall)] == [("remember", fact)]
    assert [(e.content, e.is_error) for e in events if isinstance(e, ToolResult)] == [
        ("Remembered 'user name'.", False)
    ]
    store.close()
    reopened = SQLiteStore(str(tmp_path / "sessions.db"))  # a restart
    try:
        assert [(f.key, f.value) for f in reopened.facts("tiny-memory", "")] == [("user name", "Ada")]
        assert reopened.get(session.id) is not None  # the turn itself was recorded beside it
    finally:
        reopened.close()

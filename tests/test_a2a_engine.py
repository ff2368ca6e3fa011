"""The A2A front end on the real vLLM engine (the tiny random-weight Qwen2 model): the official
A2A client sends, streams, gets and cancels tasks of a server that runs as a task of the session
loop (the engine belongs to it), and the example pair of agents/ runs on it. The model's words are
noise: the tests assert structure, and that a canceled task's engine request is aborted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from a2a.helpers import get_artifact_text
from a2a.types import CancelTaskRequest, GetTaskRequest, TaskState
from google.protobuf.json_format import MessageToDict
from loopback import serve_in_loop
from test_a2a import connected, events, send, user

from qwenrun.agent import Agent
from qwenrun.agent.plugins import load_tools
from qwenrun.engines.scripted import PinnedEngine, tool_call_body
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.events import Final, ToolResult
from qwenrun.frontends.a2a import create_app
from qwenrun.sessions import open_store
from qwenrun.spec.agent_file import AgentSpec

pytestmark = pytest.mark.engine

AGENTS = Path(__file__).resolve().parent.parent / "agents"


def a2a_spec(tiny_spec: AgentSpec, **sampling: Any) -> AgentSpec:
    data = tiny_spec.model_dump(mode="json", exclude_unset=True)
    data["sampling"] = {**data.get("sampling", {}), **sampling}
    data["frontend"] = {"kind": "a2a"}
    data["sessions"] = {"path": ":memory:"}
    return AgentSpec.from_dict(data, source="tests/a2a-tiny.yaml")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def short(engine: VLLMEngine, tiny_spec: AgentSpec) -> AsyncIterator[tuple[Agent, str]]:
    """An agent of 32-token answers on the shared engine, served over A2A."""
    spec = a2a_spec(tiny_spec)
    agent = Agent(spec, engine, tools=[], store=open_store(spec))
    async with serve_in_loop(create_app(agent, shutdown_engine=False)) as url:
        yield agent, url


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def long(engine: VLLMEngine, tiny_spec: AgentSpec) -> AsyncIterator[str]:
    """An agent whose answers take 1500 tokens (seconds on this machine)."""
    spec = a2a_spec(tiny_spec, max_tokens=1500, extra={"ignore_eos": True})
    agent = Agent(spec, engine, tools=[], store=open_store(spec))
    async with serve_in_loop(create_app(agent, shutdown_engine=False)) as url:
        yield url


async def test_send_then_get_on_the_real_engine(short: tuple[Agent, str]) -> None:
    agent, url = short
    async with connected(url, streaming=False) as client:
        task = await send(client, user("深圳天气如何?"))
        got = await client.get_task(GetTaskRequest(id=task.id))
        second = await send(client, user("谢谢", context=task.context_id))
    assert task.status.state == got.status.state == TaskState.TASK_STATE_COMPLETED
    assert [a.artifact_id for a in got.artifacts] == ["answer"]
    assert got.artifacts == task.artifacts
    meta = MessageToDict(task.metadata)
    assert meta["stop_reason"] in ("answer", "length") and meta["usage"]["completion_tokens"] > 0
    assert second.status.state == TaskState.TASK_STATE_COMPLETED and second.context_id == task.context_id
    assert agent.store is not None
    stored = agent.store.get(task.context_id)
    assert stored is not None and [m["role"] for m in stored.messages()] == ["user", "assistant"] * 2


async def test_stream_on_the_real_engine(short: tuple[Agent, str]) -> None:
    _, url = short
    async with connected(url) as client:
        stream = await events(client, user("深圳天气如何?"))
    chunks = [e.artifact_update for e in stream if e.HasField("artifact_update")]
    assert stream[0].task.status.state == TaskState.TASK_STATE_SUBMITTED
    assert stream[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    assert chunks and chunks[-1].last_chunk and not chunks[-1].append
    streamed = "".join(get_artifact_text(c.artifact) for c in chunks[:-1])
    assert streamed == get_artifact_text(chunks[-1].artifact)  # the whole answer, as streamed
    assert dict(stream[-1].status_update.metadata)["stop_reason"] in ("answer", "length")


async def test_cancel_aborts_the_engine_request(long: str, engine: VLLMEngine) -> None:
    async with connected(long, streaming=False, polling=True) as client:
        task = await send(client, user("写一篇长文章"))
        await _until(lambda: engine.num_unfinished_requests() == 1)
        running = await client.get_task(GetTaskRequest(id=task.id))
        canceled = await client.cancel_task(CancelTaskRequest(id=task.id))
        await _until(lambda: engine.num_unfinished_requests() == 0)
        after = await client.get_task(GetTaskRequest(id=task.id))
    assert running.status.state == TaskState.TASK_STATE_WORKING
    assert canceled.status.state == after.status.state == TaskState.TASK_STATE_CANCELED
    assert engine.num_unfinished_requests() == 0


async def _until(condition: Any, timeout_s: float = 60) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


async def test_the_example_pair_on_the_real_engine(
    engine: VLLMEngine, tiny_spec: AgentSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """agents/a2a-assistant.yaml asks agents/a2a-weather.yaml over A2A, both on the tiny model: the
    assistant's call of ask_agent is pinned (its words would be noise), the remote answer is the
    model's; the tool result is exactly what the remote agent answered and recorded."""
    tiny = [f"model.path={tiny_spec.model.path}", "sampling.max_tokens=32", "sampling.temperature=0"]
    remote_spec = AgentSpec.from_file(AGENTS / "a2a-weather.yaml", [*tiny, "sessions.path=':memory:'"])
    remote = Agent(remote_spec, engine, tools=[], store=open_store(remote_spec))
    async with serve_in_loop(create_app(remote, shutdown_engine=False)) as url:
        monkeypatch.setenv("WEATHER_AGENT_URL", f"{url}/")
        spec = AgentSpec.from_file(
            AGENTS / "a2a-assistant.yaml", [*tiny, "agent.tool_choice=ask_agent", "sessions.enabled=false"]
        )
        pinned = PinnedEngine(engine, tool_call_body("ask_agent", {"message": "深圳天气如何?"}))
        local = Agent(spec, pinned, load_tools(spec))
        events = [event async for event in local.session().stream("深圳天气如何?")]
    (result,) = [event for event in events if isinstance(event, ToolResult)]
    assert remote.store is not None
    (info,) = remote.store.list()
    stored = remote.store.load(info.id)
    assert stored is not None and stored[0] == {"role": "user", "content": "深圳天气如何?"}
    assert not result.is_error and result.content == stored[-1]["content"]
    assert isinstance(events[-1], Final) and events[-1].tool_calls == 1

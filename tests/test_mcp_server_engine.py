"""``frontend.kind: mcp`` on the real vLLM engine (the tiny random-weight model, the session's shared
engine), with the official ``mcp`` client: list, call, stream (progress and log notifications) and
cancel over streamable HTTP (the server in this process); the same over stdio, where the server is
``qwenrun up agents/weather-mcp.yaml`` as a child process whose engine is qwenrun's OpenAI front end
in this process, on the shared engine; and the example pair of ``agents/``: the assistant, in this
process, asks the weather agent, its child process, through MCP. The weights are random, so tool
calls and answers are pinned by structured outputs (:class:`~qwenrun.engines.scripted.PinnedEngine`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import yaml
from loopback import serve_in_loop
from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from test_mcp_server import call_then_cancel, text, until

from qwenrun.agent import Agent
from qwenrun.engines.scripted import PinnedEngine
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.events import Final, ToolResult
from qwenrun.frontends.mcp.http import create_app
from qwenrun.frontends.mcp.server import SESSION_META
from qwenrun.frontends.openai import create_app as openai_app
from qwenrun.frontends.settings import McpFrontend
from qwenrun.sessions.sqlite import SQLiteStore
from qwenrun.spec.agent_file import AgentSpec

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parent.parent
QWENRUN = str(Path(sys.executable).with_name("qwenrun"))
WEATHER_CALL = json.dumps({"name": "get_current_weather", "arguments": {"city": "Shenzhen"}})
ANSWER = "Shenzhen is cloudy, 28 to 31 degrees."
MOCK = "目前Shenzhen多云到晴，气温28~31℃，吹轻微的偏北风。"  # the weather plugin's mock backend


def weather_spec(tiny_spec: AgentSpec, tmp_path: Path, **frontend: Any) -> AgentSpec:
    data = tiny_spec.model_dump(mode="json")
    data["agent"] = {**data["agent"], "name": "weather", "tool_choice": "required", "max_iterations": 3}
    data["tools"] = [{"name": "get_current_weather", "settings": {"backend": "mock"}}]
    data["frontend"] = {"kind": "mcp", "transport": "http", "port": 0, **frontend}
    data["sessions"] = {"path": str(tmp_path / "sessions.db")}
    return AgentSpec.from_dict(data, source="tests/weather-mcp.yaml")


async def test_http_lists_calls_streams_and_cancels_on_the_engine(
    engine: VLLMEngine, tiny_spec: AgentSpec, tmp_path: Path
) -> None:
    spec = weather_spec(tiny_spec, tmp_path)
    pinned = PinnedEngine(engine, WEATHER_CALL, answer=ANSWER)
    store = SQLiteStore(tmp_path / "sessions.db")
    agent = Agent(spec, pinned, store=store)
    assert isinstance(spec.frontend, McpFrontend)
    logs: list[dict[str, Any]] = []
    progress: list[str | None] = []
    writing = asyncio.Event()

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params.data)
        if params.data["type"] == "text":
            writing.set()

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message)

    app = create_app(agent, spec.frontend, shutdown_agent=False)  # the engine is the session's
    async with (
        serve_in_loop(app) as url,
        httpx.AsyncClient(timeout=httpx.Timeout(30, read=300)) as http,
        streamable_http_client(f"{url}/mcp", http_client=http) as (reader, writer, _),
        ClientSession(reader, writer, logging_callback=on_log) as client,
    ):
        await client.initialize()
        listed = (await client.list_tools()).tools
        assert [tool.name for tool in listed] == ["weather"]
        result = await client.call_tool("weather", {"message": "Shenzhen weather?"}, progress_callback=on_progress)
        assert (result.isError, text(result)) == (False, ANSWER)
        assert progress == [
            'calling get_current_weather({"city": "Shenzhen"})',
            f"get_current_weather returned: {MOCK}",
            "writing the answer",
        ]
        assert [entry["type"] for entry in logs[:2]] == ["tool_call", "tool_result"]
        assert "".join(entry["text"] for entry in logs if entry["type"] == "text").strip() == ANSWER
        assert result.meta is not None
        store.flush()
        stored = store.get(result.meta[SESSION_META])
        assert stored is not None and stored.info.frontend == "mcp"
        assert [record.data.get("content") for record in stored.records if record.data.get("role") == "tool"] == [MOCK]

        # cancel: a long answer (1500 tokens take seconds here), stopped at its first text
        agent.engine = PinnedEngine(engine, WEATHER_CALL, answer_overrides={"max_tokens": 1500, "ignore_eos": True})
        agent.spec.agent.tool_choice = "none"
        writing.clear()
        await call_then_cancel(client, "weather", {"message": "Talk.", "session_id": "to-cancel"}, writing)
        await until(lambda: engine.num_unfinished_requests() == 0)  # the vLLM request was aborted
    store.flush()
    cancelled = store.get("to-cancel")
    assert cancelled is not None
    shown = [(record.data.get("role") or record.data["type"], record.meta.get("interrupted")) for record in cancelled.records]
    assert shown == [("user", None), ("assistant", True), ("cancelled", None)]  # the answer was cut
    store.close()


# -- stdio: the weather agent of agents/ as a child process ----------------------------------------


@dataclass(frozen=True)
class Endpoint:
    url: str
    engine: str  # the `--set` of a child process's agent file that uses it


class PacedEngine:
    """An engine whose answers come no faster than ``per_token_s`` a token: a long answer then
    lasts (1500 tokens: 30 s) far beyond what a cancellation takes to reach it, however fast the
    tiny model writes on this CPU."""

    def __init__(self, engine: PinnedEngine, per_token_s: float) -> None:
        self._engine, self._per_token_s = engine, per_token_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, request: Any) -> AsyncIterator[Any]:
        seen = 0
        async with aclosing(self._engine.generate(request)) as deltas:  # closing it aborts vLLM's request
            async for delta in deltas:
                yield delta
                await asyncio.sleep(self._per_token_s * max(delta.completion_tokens - seen, 1))
                seen = delta.completion_tokens


@asynccontextmanager
async def serving(
    engine: VLLMEngine, tiny_spec: AgentSpec, per_token_s: float = 0.0, **pinned: Any
) -> AsyncIterator[Endpoint]:
    """qwenrun's OpenAI server on the shared engine, pinned (``PinnedEngine(engine, WEATHER_CALL,
    **pinned)``), paced to ``per_token_s`` a token when given."""
    data = tiny_spec.model_dump(mode="json")
    data["agent"] = {**data["agent"], "name": "tiny-agent"}
    data["frontend"] = {"kind": "openai"}
    data["sessions"] = {"enabled": False}
    spec = AgentSpec.from_dict(data, source="tests/endpoint.yaml")
    pinned_engine = PinnedEngine(engine, WEATHER_CALL, **pinned)
    served: Any = PacedEngine(pinned_engine, per_token_s) if per_token_s else pinned_engine
    app = openai_app(Agent(spec, served, tools=[]), shutdown_engine=False)
    async with serve_in_loop(app) as url:
        setting = "engine={kind: openai, base_url: '" + url + "/v1', model: " + str(tiny_spec.served_model_name) + "}"
        yield Endpoint(url, setting)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def endpoint(engine: VLLMEngine, tiny_spec: AgentSpec) -> AsyncIterator[Endpoint]:
    """An endpoint whose model calls the weather tool when forced, else answers ANSWER."""
    async with serving(engine, tiny_spec, answer=ANSWER) as settings:
        yield settings


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def long_endpoint(engine: VLLMEngine, tiny_spec: AgentSpec) -> AsyncIterator[Endpoint]:
    """An endpoint whose answers are 1500 tokens long, 20 ms a token (30 s)."""
    overrides = {"max_tokens": 1500, "ignore_eos": True}
    async with serving(engine, tiny_spec, per_token_s=0.02, answer_overrides=overrides) as settings:
        yield settings


def callee_sets(endpoint: Endpoint, tmp_path: Path) -> list[str]:
    """The ``--set`` options of the weather agent here: the endpoint as its engine, a forced first
    call (the pinned call), the test's sessions database."""
    return ["--set", endpoint.engine, "--set", "agent.tool_choice=required", "--set", f"sessions.path={tmp_path / 'weather.db'}"]


async def test_stdio_lists_calls_and_streams(endpoint: Endpoint, tmp_path: Path) -> None:
    args = ["up", str(ROOT / "agents" / "weather-mcp.yaml"), *callee_sets(endpoint, tmp_path)]
    logs: list[dict[str, Any]] = []
    progress: list[str | None] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params.data)

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message)

    errors = tmp_path / "stderr.txt"
    with errors.open("w") as errlog:
        async with (
            stdio_client(StdioServerParameters(command=QWENRUN, args=args), errlog=errlog) as (reader, writer),
            ClientSession(reader, writer, logging_callback=on_log) as client,
        ):
            await client.initialize()
            assert [tool.name for tool in (await client.list_tools()).tools] == ["weather"]
            result = await client.call_tool("weather", {"message": "Shenzhen weather?"}, progress_callback=on_progress)
    assert text(result) == ANSWER
    assert progress == ['calling get_current_weather({"city": "Shenzhen"})', f"get_current_weather returned: {MOCK}",
                        "writing the answer"]  # fmt: skip
    assert [entry["type"] for entry in logs[:2]] == ["tool_call", "tool_result"]
    assert "".join(entry["text"] for entry in logs if entry["type"] == "text").strip() == ANSWER
    command = f"qwenrun up {ROOT / 'agents' / 'weather-mcp.yaml'} --set 'engine={{kind: openai, base_url:"
    assert f"MCP server of agent 'weather' on stdio; a client starts it with:\n  {command}" in errors.read_text()


async def test_stdio_cancel_stops_the_turn_and_the_engine_request(
    engine: VLLMEngine, long_endpoint: Endpoint, tmp_path: Path
) -> None:
    sets = [*callee_sets(long_endpoint, tmp_path), "--set", "agent.tool_choice=none"]
    args = ["up", str(ROOT / "agents" / "weather-mcp.yaml"), *sets]
    writing = asyncio.Event()

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        if params.data["type"] == "text":
            writing.set()

    with (tmp_path / "stderr.txt").open("w") as errlog:
        async with (
            stdio_client(StdioServerParameters(command=QWENRUN, args=args), errlog=errlog) as (reader, writer),
            ClientSession(reader, writer, logging_callback=on_log) as client,
        ):
            await client.initialize()
            await call_then_cancel(client, "weather", {"message": "Talk.", "session_id": "stopped"}, writing)
            # the child's turn ended, its stream to the endpoint closed, and the endpoint aborted vLLM's request
            await until(lambda: engine.num_unfinished_requests() == 0)
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{long_endpoint.url}/metrics")).text
    assert re.search(r'endpoint="/v1/chat/completions",mode="passthrough",status="499"\} 1\.0', metrics), metrics
    store = SQLiteStore(tmp_path / "weather.db")
    stopped = store.get("stopped")
    assert stopped is not None
    assert [record.data["type"] for record in stopped.records if record.kind == "event"] == ["cancelled"]
    partial = [record for record in stopped.records if record.data.get("role") == "assistant"]
    assert [record.meta for record in partial] == [{"interrupted": True}]  # what the client saw of it
    store.close()


async def test_the_assistant_asks_the_weather_agent_through_mcp(
    engine: VLLMEngine, endpoint: Endpoint, tiny_spec: AgentSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pair of agents/: assistant-mcp.yaml (here, pinned to call `weather`) starts
    weather-mcp.yaml with its `mcp:` entry; the weather agent calls its own tool and answers."""
    path = ROOT / "agents" / "assistant-mcp.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    entry = data["tools"][0]["mcp"]
    assert (entry["command"], entry["args"][:2]) == ("qwenrun", ["up", "weather-mcp.yaml"])
    entry["args"] += callee_sets(endpoint, tmp_path)
    monkeypatch.setenv("PATH", f"{Path(QWENRUN).parent}:{os.environ['PATH']}")  # `qwenrun` of this venv
    data["model"] = tiny_spec.model_dump(mode="json")["model"]
    data["engine"] = tiny_spec.model_dump(mode="json")["engine"]
    data["agent"]["tool_choice"] = "required"
    data["sessions"] = {"enabled": False}
    spec = AgentSpec.from_dict(data, source=str(path))  # the entry's `cwd: .` is agents/
    question = json.dumps({"name": "weather", "arguments": {"message": "Shenzhen weather?"}})
    pinned = PinnedEngine(engine, question, answer="The weather agent says it is cloudy.")
    async with Agent(spec, pinned, tools=[]) as assistant:
        assert list(assistant.tools) == ["weather"]
        events = [event async for event in assistant.session(record=False).stream("Shenzhen weather?")]
    results = [event for event in events if isinstance(event, ToolResult)]
    assert [(result.name, result.content, result.is_error) for result in results] == [("weather", ANSWER, False)]
    final = events[-1]
    assert isinstance(final, Final) and final.text == "The weather agent says it is cloudy."
    store = SQLiteStore(tmp_path / "weather.db")
    (session,) = store.list()
    assert (session.agent, session.frontend, session.title) == ("weather", "mcp", "Shenzhen weather?")
    store.close()

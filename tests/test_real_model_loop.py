"""The real-model tier, on the loop's defences against a small model's habits (issue 27): the demo's
second question, whose call echoes the schema's ``required`` into its arguments, is answered from the
tool's result; where the client runs the loop (the OpenAI Agents SDK, a client-side tool, the
pass-through server), the call written again is not the final answer, through Chat Completions and
Responses alike. Qwen2.5-Coder-0.5B through ``agents/weather-small.yaml`` (float32, temperature 0)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from loopback import serve_in_loop
from openai import AsyncOpenAI

from agents import Agent as SdkAgent
from agents import (
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    function_tool,
)
from qwenrun.agent import Agent
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.events import Final, Notice, ToolCall, ToolResult
from qwenrun.frontends.openai import create_app
from qwenrun.spec.agent_file import AgentSpec

pytestmark = pytest.mark.real_model

SECOND_QUESTION = "那深圳呢？明天适合出门吗?"  # the demo's second question (scripts/demo.sh)


def mock_sentence(city: str) -> str:
    """What the weather plugin's mock backend answers (plugins/qwenrun-weather)."""
    return f"目前{city}多云到晴，气温28~31℃，吹轻微的偏北风。"


def from_the_result(text: str) -> bool:
    """An answer in prose built from the mock sentence, not a call written as text."""
    return (
        "多云到晴" in text and "28~31℃" in text and '"name"' not in text and "get_current_weather" not in text
    )


async def test_the_demos_second_question_is_answered_from_the_tool(
    real_spec: AgentSpec, real_engine: VLLMEngine
) -> None:
    """The model calls ``get_current_weather(city="深圳", required=["city"])``: the undeclared
    ``required`` is dropped (a notice says so) and the call runs; before, the tool refused it
    ("Extra inputs are not permitted") and the model answered "Sorry, but I can't assist with that."."""
    session = Agent(real_spec, real_engine).session(record=False)
    events = [event async for event in session.stream(SECOND_QUESTION)]
    calls = [e for e in events if isinstance(e, ToolCall)]
    results = [e for e in events if isinstance(e, ToolResult)]
    notices = [e for e in events if isinstance(e, Notice)]
    assert [(c.name, c.arguments) for c in calls] == [("get_current_weather", {"city": "深圳"})], events
    assert [(r.content, r.is_error) for r in results] == [(mock_sentence("深圳"), False)], events
    assert all(n.code == "extra_arguments" and n.id == calls[0].id for n in notices), notices
    final = events[-1]
    assert isinstance(final, Final) and final.stop_reason == "answer" and from_the_result(final.text), final


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def client(real_spec: AgentSpec, real_engine: VLLMEngine) -> AsyncIterator[AsyncOpenAI]:
    """The OpenAI server on a free 127.0.0.1 port (uvicorn in the session loop), and the official client."""
    agent = Agent(real_spec, real_engine)
    async with (
        serve_in_loop(create_app(agent, shutdown_engine=False)) as url,
        AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300) as client,
    ):
        yield client


SDK_CALLS: list[str] = []


@function_tool
def get_current_weather(city: str) -> str:
    """Get the current weather of a city.

    Args:
        city: The city, e.g. 广州.
    """
    SDK_CALLS.append(city)
    return mock_sentence(city)


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_the_agents_sdk_gets_an_answer_not_the_call_again(client: AsyncOpenAI, real_spec: AgentSpec,
                                                                api: str) -> None:  # fmt: skip
    """The client runs the loop: the model calls the SDK's tool, then, given its result, writes the
    call again (and stray JSON); qwenrun stops it there and asks for the answer with the tools off.
    Before, the SDK's final answer was ``{"name": "get_current_weather", "arguments": ...}``."""
    SDK_CALLS.clear()
    served = real_spec.served_model_name
    model: Any = (
        OpenAIChatCompletionsModel(served, client) if api == "chat" else OpenAIResponsesModel(served, client)
    )
    sdk = SdkAgent(name="weather", tools=[get_current_weather], model=model,
                   model_settings=ModelSettings(temperature=0))  # fmt: skip
    result = await Runner.run(
        sdk, "广州天气情况如何?", run_config=RunConfig(tracing_disabled=True), max_turns=4
    )
    assert SDK_CALLS and set(SDK_CALLS) <= {"广州", "Guangzhou"}, SDK_CALLS
    assert isinstance(result.final_output, str) and from_the_result(result.final_output), result.final_output

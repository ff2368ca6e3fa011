"""``/v1/responses`` on the real vLLM engine (the tiny random-weight Qwen2 model), driven by the
official ``openai`` client and the OpenAI Agents SDK, in both modes, streamed and not.

The weights are random, so structured outputs decide what the model writes (``PinnedEngine``): a
forced call continues with the exact call JSON, and every other answer is exactly ``ANSWER`` (so it
stops, as the Agents SDK requires: it refuses an ``incomplete`` response). The server runs as a
task of the session loop (the engine belongs to that loop); conversations are kept in SQLite.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from loopback import serve_in_loop
from openai import AsyncOpenAI
from weather import get_current_weather

from agents import Agent as SdkAgent
from agents import ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool
from qwenrun.agent import Agent
from qwenrun.engines.scripted import PinnedEngine
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.frontends.openai import create_app
from qwenrun.sessions.sqlite import SQLiteStore
from qwenrun.spec.agent_file import AgentSpec

pytestmark = pytest.mark.engine

SERVED = "tiny-qwen2"
AGENT = "weather"
QUESTION = "深圳天气如何?"
ANSWER = "It is sunny in Shenzhen."
CALL = json.dumps({"name": "get_current_weather", "arguments": {"city": "深圳"}}, ensure_ascii=False)
TOOL: Any = {
    "type": "function", "name": "get_current_weather", "description": "Get the current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}  # fmt: skip
NO_TRACES = RunConfig(tracing_disabled=True)
ran: list[str] = []  # the cities the client-side tool (pass-through) was called with



@function_tool(name_override="get_current_weather")
def client_weather(city: str) -> str:
    """Get the current weather of a city."""
    ran.append(city)
    return f"{city}: sunny, 25°C"


def weather_spec(tiny_spec: AgentSpec) -> AgentSpec:
    data = tiny_spec.model_dump(mode="json")
    data["tools"] = [{"name": "get_current_weather"}]  # the test's own function below serves it
    data["agent"] = {**data["agent"], "name": AGENT, "tool_choice": "required"}  # agent mode: always a call
    data["frontend"] = {"kind": "openai"}
    return AgentSpec.from_dict(data, source="tests/responses-tiny.yaml")


def make_agent(engine: VLLMEngine, tiny_spec: AgentSpec, store: SQLiteStore) -> tuple[Agent, PinnedEngine]:
    pinned = PinnedEngine(engine, CALL, answer=ANSWER)
    return Agent(weather_spec(tiny_spec), pinned, tools=[get_current_weather], store=store), pinned


@pytest.fixture(scope="module")
def served(
    engine: VLLMEngine, tiny_spec: AgentSpec, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Agent, PinnedEngine]:
    return make_agent(engine, tiny_spec, SQLiteStore(tmp_path_factory.mktemp("responses") / "sessions.db"))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def base_url(served: tuple[Agent, PinnedEngine]) -> AsyncIterator[str]:
    agent, _ = served
    async with serve_in_loop(create_app(agent, shutdown_engine=False)) as url:
        yield url
    assert agent.store is not None
    agent.store.close()


@pytest_asyncio.fixture(loop_scope="session")
async def client(base_url: str) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


# -- the openai client ---------------------------------------------------------------------------


async def test_pass_through_call_then_answer(client: AsyncOpenAI) -> None:
    first = await client.responses.create(model=SERVED, input=QUESTION, tools=[TOOL], tool_choice="required")
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_current_weather" and call.status == "completed"
    assert json.loads(call.arguments) == {"city": "深圳"} and first.status == "completed"
    assert first.usage is not None and first.usage.input_tokens > 50 and first.usage.output_tokens > 0
    output: Any = [
        {"type": "function_call_output", "call_id": call.call_id, "output": get_current_weather("深圳")}
    ]
    second = await client.responses.create(
        model=SERVED, input=output, tools=[TOOL], previous_response_id=first.id
    )
    assert second.status == "completed" and second.output_text == ANSWER
    assert (await client.responses.retrieve(second.id)).output_text == ANSWER


async def test_pass_through_streams_the_documented_events(client: AsyncOpenAI) -> None:
    async with client.responses.stream(
        model=SERVED, input=QUESTION, tools=[TOOL], tool_choice="required"
    ) as stream:
        calls = [event async for event in stream]
        first = await stream.get_final_response()
    (call,) = first.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "深圳"}
    assert [event.type for event in calls] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    output: Any = [{"type": "function_call_output", "call_id": call.call_id, "output": "晴"}]
    stream = await client.responses.create(
        model=SERVED, input=output, tools=[TOOL], previous_response_id=first.id, stream=True
    )
    events = [event async for event in stream]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == ANSWER and len(deltas) > 1  # streamed token by token
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[-1].type == "response.completed" and events[-1].response.output_text == ANSWER


@pytest.mark.parametrize("streamed", [False, True])
async def test_agent_mode_runs_the_tool_on_the_server(client: AsyncOpenAI, streamed: bool) -> None:
    if streamed:
        stream = await client.responses.create(model=AGENT, input=QUESTION, stream=True)
        events = [event async for event in stream]
        assert "response.mcp_call.completed" in [event.type for event in events]
        out = events[-1].response
    else:
        out = await client.responses.create(model=AGENT, input=QUESTION)
    tool, message = out.output
    assert tool.type == "mcp_call" and tool.name == "get_current_weather" and tool.server_label == AGENT
    assert json.loads(tool.arguments) == {"city": "深圳"} and tool.output == get_current_weather("深圳")
    assert message.type == "message" and out.output_text == ANSWER and out.status == "completed"
    assert out.usage is not None and out.usage.input_tokens > 100  # two model calls


# -- the OpenAI Agents SDK ----------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True])
async def test_agents_sdk_pass_through_runs_its_own_tool(client: AsyncOpenAI, streamed: bool) -> None:
    sdk = SdkAgent(name="helper", instructions="Answer with the weather.", tools=[client_weather],
                   model=OpenAIResponsesModel(model=SERVED, openai_client=client),
                   model_settings=ModelSettings(tool_choice="required"))  # fmt: skip
    ran.clear()
    if streamed:
        run = Runner.run_streamed(sdk, QUESTION, run_config=NO_TRACES)
        items = [
            event.item.type async for event in run.stream_events() if event.type == "run_item_stream_event"
        ]
        final = run.final_output
    else:
        result = await Runner.run(sdk, QUESTION, run_config=NO_TRACES)
        items, final = [item.type for item in result.new_items], result.final_output
    assert final == ANSWER and ran == ["深圳"]
    assert items == ["tool_call_item", "tool_call_output_item", "message_output_item"]


@pytest.mark.parametrize("streamed", [False, True])
async def test_agents_sdk_agent_mode(client: AsyncOpenAI, streamed: bool) -> None:
    sdk = SdkAgent(name="asker", model=OpenAIResponsesModel(model=AGENT, openai_client=client))
    if streamed:
        run = Runner.run_streamed(sdk, QUESTION, run_config=NO_TRACES, auto_previous_response_id=True)
        items = [
            event.item.type async for event in run.stream_events() if event.type == "run_item_stream_event"
        ]
        final, last = run.final_output, run.last_response_id
    else:
        result = await Runner.run(sdk, QUESTION, run_config=NO_TRACES, auto_previous_response_id=True)
        items, final, last = (
            [item.type for item in result.new_items],
            result.final_output,
            result.last_response_id,
        )
    assert final == ANSWER and items == ["tool_call_item", "message_output_item"]
    assert last is not None and (await client.responses.retrieve(last)).output_text == ANSWER


# -- conversations: concurrent, and across a restart ---------------------------------------------


async def test_concurrent_conversations_never_mix(
    client: AsyncOpenAI, served: tuple[Agent, PinnedEngine]
) -> None:
    _, pinned = served

    async def conversation(number: int) -> None:
        previous = None
        for turn in range(2):
            kwargs: Any = {"previous_response_id": previous} if previous else {}
            out = await client.responses.create(
                model=SERVED, input=f"对话{number} 第{turn}轮", stream=turn == 1, **kwargs
            )
            if turn == 1:
                out = [event async for event in out][-1].response
            assert out.output_text == ANSWER
            previous = out.id

    await asyncio.wait_for(asyncio.gather(*(conversation(number) for number in range(6))), timeout=300)
    seconds = [messages for messages in pinned.requests if messages[-1]["content"].endswith("第1轮")]
    assert len(seconds) == 6
    for messages in seconds:
        number = messages[-1]["content"].split()[0]
        assert messages == [
            {"role": "user", "content": f"{number} 第0轮"},
            {"role": "assistant", "content": ANSWER},
            {"role": "user", "content": f"{number} 第1轮"},
        ]


async def test_a_restart_keeps_the_conversation(
    engine: VLLMEngine, tiny_spec: AgentSpec, tmp_path: Path
) -> None:
    path = tmp_path / "sessions.db"
    for number, prompt in enumerate(["第一个问题", "第二个问题"]):
        agent, pinned = make_agent(
            engine, tiny_spec, SQLiteStore(path)
        )  # a new app, store and agent each time
        async with (
            serve_in_loop(create_app(agent, shutdown_engine=False)) as url,
            AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client,
        ):
            if number == 0:
                first = await client.responses.create(model=SERVED, input=prompt)
            else:
                assert (await client.responses.retrieve(first.id)).output_text == ANSWER
                second = await client.responses.create(
                    model=SERVED, input=prompt, previous_response_id=first.id
                )
                assert second.output_text == ANSWER
                assert [m["content"] for m in pinned.requests[0]] == ["第一个问题", ANSWER, "第二个问题"]
        assert agent.store is not None
        agent.store.close()

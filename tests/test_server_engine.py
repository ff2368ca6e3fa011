"""The OpenAI-compatible server on the real vLLM engine (the tiny random-weight Qwen2 model).

The server runs as a task in the session's event loop (the engine belongs to that loop) and is
driven with ``AsyncOpenAI``. The model's words are noise, so tool calls are forced with
``tool_choice`` (vLLM structured outputs) and the tests assert structure, not values, except where
the schema leaves one possible value.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import openai
import pytest
import pytest_asyncio
from loopback import serve_in_loop
from openai import AsyncOpenAI
from pydantic import Field
from weather import weather_tool

from qwenrun.agent import Agent
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.frontends.openai import create_app
from qwenrun.spec.agent_file import AgentSpec

pytestmark = pytest.mark.engine

SERVED = "tiny-qwen2"
USER: Any = [{"role": "user", "content": "深圳天气如何?"}]


SHORT_CITY = weather_tool({"type": "string", "maxLength": 8})  # random text, but it ends
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def get_current_weather(city: Annotated[str, Field(max_length=8)]) -> str:
    """Get the current weather of a city.

    Args:
        city: The city, e.g. 深圳.
    """
    return f"目前{city}多云到晴，气温28~31℃。"


@pytest.fixture(scope="module")
def agent(engine: VLLMEngine, tiny_spec: AgentSpec) -> Agent:
    return Agent(tiny_spec, engine, tools=[get_current_weather])


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def base_url(agent: Agent) -> AsyncIterator[str]:
    """The app on a free port, served by a task of the session loop; the engine is shared."""
    async with serve_in_loop(create_app(agent, shutdown_engine=False)) as url:
        yield url


@pytest_asyncio.fixture(loop_scope="session")
async def client(base_url: str) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


async def test_models_and_health(base_url: str, agent: Agent, client: AsyncOpenAI) -> None:
    assert [model.id async for model in client.models.list()] == [SERVED, agent.name]
    async with httpx.AsyncClient(base_url=base_url) as http:
        assert (await http.get("/health")).status_code == 200


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_current_weather"}}]
)
async def test_forced_tool_call(client: AsyncOpenAI, tool_choice: Any) -> None:
    out = await client.chat.completions.create(
        model=SERVED, messages=USER, tools=[SHORT_CITY, TIME_TOOL], tool_choice=tool_choice, max_tokens=64,
        parallel_tool_calls=False,  # one call: the grammar of a single call
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].id.startswith("call_") and calls[0].type == "function"
    if isinstance(tool_choice, dict):
        assert calls[0].function.name == "get_current_weather"
    if calls[0].function.name == "get_current_weather":
        arguments = json.loads(calls[0].function.arguments)
        assert list(arguments) == ["city"] and isinstance(arguments["city"], str)
        assert len(arguments["city"]) <= 8
    assert out.usage is not None and out.usage.prompt_tokens > 50 and 0 < out.usage.completion_tokens <= 64


async def test_exact_call_and_round_trip(client: AsyncOpenAI) -> None:
    only_shenzhen = weather_tool({"enum": ["深圳"]})  # the constraint leaves one possible value
    tools: Any = [only_shenzhen]
    out = await client.chat.completions.create(
        model=SERVED, messages=USER, tools=tools, tool_choice="required", max_tokens=64
    )
    call = (out.choices[0].message.tool_calls or [])[0]
    assert call.function.name == "get_current_weather"
    assert json.loads(call.function.arguments) == {"city": "深圳"}
    history: Any = [
        *USER,
        out.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": get_current_weather("深圳")},
    ]
    answer = await client.chat.completions.create(
        model=SERVED, messages=history, tools=tools, tool_choice="none", max_tokens=16
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert isinstance(answer.choices[0].message.content, str) and not answer.choices[0].message.tool_calls


async def test_streamed_forced_call(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=SERVED, messages=USER, tools=[SHORT_CITY], tool_choice="required", max_tokens=64,
        stream=True, stream_options={"include_usage": True}, parallel_tool_calls=False,
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]
    deltas = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert len(deltas) == 2 and deltas[0].id and deltas[0].function and deltas[1].function
    assert deltas[0].function.name == "get_current_weather" and deltas[0].function.arguments == ""
    assert list(json.loads(deltas[1].function.arguments or "")) == ["city"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


async def test_agent_mode_turn_with_a_tool_step(client: AsyncOpenAI, agent: Agent) -> None:
    out = await client.chat.completions.create(
        model=agent.name, messages=USER, tool_choice="required", max_tokens=48
    )
    choice = out.choices[0]
    steps = (choice.message.model_extra or {})["qwenrun_steps"]
    types = [step["type"] for step in steps]
    assert types[:2] == ["tool_call", "tool_result"], steps
    assert steps[0]["name"] == "get_current_weather" and steps[1]["id"] == steps[0]["id"]
    assert steps[1]["is_error"] is False and steps[1]["content"].startswith("目前")
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert out.usage is not None and out.usage.prompt_tokens > 100 and out.usage.completion_tokens > 0


async def test_agent_mode_streams(client: AsyncOpenAI, agent: Agent) -> None:
    stream = await client.chat.completions.create(
        model=agent.name, messages=USER, tool_choice="required", max_tokens=48, stream=True
    )
    chunks = [chunk async for chunk in stream]
    steps = [(c.model_extra or {}).get("qwenrun_step") for c in chunks]
    assert [step["type"] for step in steps if step][:2] == ["tool_call", "tool_result"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


async def test_sixteen_concurrent_streams(client: AsyncOpenAI, engine: VLLMEngine) -> None:
    async def ask(index: int) -> tuple[set[str], str | None, str]:
        stream = await client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": f"第{index}个问题：深圳天气如何？"}],
            max_tokens=16, stream=True,
        )  # fmt: skip
        ids, finish, text = set(), None, ""
        async for chunk in stream:
            ids.add(chunk.id)
            finish = chunk.choices[0].finish_reason or finish
            text += chunk.choices[0].delta.content or ""
        return ids, finish, text

    results = await asyncio.wait_for(asyncio.gather(*(ask(index) for index in range(16))), timeout=300)
    assert all(len(ids) == 1 for ids, _, _ in results)
    assert len({next(iter(ids)) for ids, _, _ in results}) == 16
    assert all(finish in ("stop", "length") for _, finish, _ in results)
    assert engine.num_unfinished_requests() == 0


async def test_disconnect_aborts_the_request(client: AsyncOpenAI, engine: VLLMEngine) -> None:
    stream = await client.chat.completions.create(model=SERVED, messages=USER, max_tokens=1500, stream=True)
    received = 0
    async for _ in stream:
        received += 1
        if received == 3:
            break
    assert engine.num_unfinished_requests() == 1  # 1500 tokens take seconds: it is still running
    await stream.close()
    for _ in range(100):
        if engine.num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.num_unfinished_requests() == 0


# -- parity with vllm serve on the real engine ----------------------------------------------------


async def test_a_prompt_longer_than_the_context_is_a_400_with_the_counts(client: AsyncOpenAI) -> None:
    """vLLM answers 400 for a prompt that does not fit; a 503 would make clients retry it."""
    long: Any = [{"role": "user", "content": " ".join(str(i % 10) for i in range(3000))}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=SERVED, messages=long, max_tokens=8, stream=stream)
        error: Any = info.value.body
        assert re.fullmatch(r"the prompt is \d+ tokens, but max_model_len is 2048 \(.*", error["message"])
        assert info.value.code == "context_length_exceeded" and error["param"] == "messages"
    out = await client.chat.completions.create(model=SERVED, messages=USER, max_tokens=4)  # the engine is fine
    assert out.choices[0].finish_reason in ("stop", "length")


async def test_json_schema_response_format(client: AsyncOpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"enum": ["深圳"]}}, "required": ["city"],
              "additionalProperties": False}  # fmt: skip
    out = await client.chat.completions.create(
        model=SERVED, messages=USER, max_tokens=32,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )  # fmt: skip
    assert json.loads(out.choices[0].message.content or "") == {"city": "深圳"}
    anything = await client.chat.completions.create(
        model=SERVED, messages=USER, max_tokens=16, response_format={"type": "json_object"}
    )
    assert (anything.choices[0].message.content or "").startswith("{")  # JSON by the grammar


async def test_n_choices_and_logprobs(client: AsyncOpenAI) -> None:
    out = await client.chat.completions.create(
        model=SERVED, messages=USER, max_tokens=6, n=2, seed=3, temperature=1.0, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [choice.index for choice in out.choices] == [0, 1]
    assert out.usage is not None and out.usage.completion_tokens == 12
    for choice in out.choices:
        assert choice.finish_reason == "length" and choice.logprobs and choice.logprobs.content
        assert len(choice.logprobs.content) == 6
        for entry in choice.logprobs.content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob


async def test_required_tool_choice_allows_several_calls(client: AsyncOpenAI) -> None:
    """The grammar of tool_choice "required" (parallel calls allowed) compiles and holds in vLLM:
    with schemas that leave one value each, every call the random model writes is exact."""
    only_shenzhen = weather_tool({"enum": ["深圳"]}, additionalProperties=False)
    no_arguments = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}}  # fmt: skip
    out = await client.chat.completions.create(
        model=SERVED, messages=USER, tools=[only_shenzhen, no_arguments], tool_choice="required", max_tokens=96
    )
    calls = out.choices[0].message.tool_calls or []
    assert out.choices[0].finish_reason == "tool_calls" and calls, out.choices[0].message.content
    for call in calls:
        expected = {"get_current_weather": {"city": "深圳"}, "get_time": {}}[call.function.name]
        assert json.loads(call.function.arguments) == expected

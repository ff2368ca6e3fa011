"""The OpenAI server on the real engine with Qwen3 thinking and both tool-call formats, through
the official ``openai`` client: pass-through (``reasoning`` / ``reasoning_content`` like ``vllm
serve --reasoning-parser qwen3``, tool calls of the engine's format, XML arguments streamed), agent
mode, and ``engine.kind: openai`` reading another qwenrun's reasoning. Once per flavour of the tiny
model (``flavour_engine``); the text is pinned as in ``test_toolcalls_engine.py``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from loopback import serve_in_loop
from openai import AsyncOpenAI, BadRequestError
from test_toolcalls_engine import (
    ANSWER,
    ANSWER_REASONING,
    CODE,
    QUESTION,
    REASONING,
    SEED,
    agent_spec,
    echo,
    get_time,
    is_qwen3,
    pinned,
    weather_agent,
)
from weather import weather_tool

from qwenrun.agent import Agent
from qwenrun.agent.plugins import load_tools
from qwenrun.engines.openai import OpenAIEngine
from qwenrun.engines.scripted import tool_call_body
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.events import Final, Reasoning, ToolCall, ToolResult
from qwenrun.frontends.openai import create_app
from qwenrun.spec.agent_file import AgentSpec

pytestmark = pytest.mark.engine

USER: Any = [{"role": "user", "content": QUESTION}]
WEATHER: Any = [weather_tool()]


@contextlib.asynccontextmanager
async def served(agent: Agent) -> AsyncIterator[tuple[str, AsyncOpenAI]]:
    """The agent's server on a free port (the engine is shared) and an official client of it."""
    app = create_app(agent, shutdown_engine=False)
    async with (
        serve_in_loop(app) as url,
        AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client,
    ):
        yield url, client


def extra(item: Any) -> dict[str, Any]:
    """Fields the openai client's types do not declare (reasoning, reasoning_content, ...)."""
    return item.model_extra or {}


async def collect(stream: Any) -> tuple[str, str, str, dict[int, list[str]], list[Any]]:
    """(content, reasoning, reasoning_content, argument fragments by call index, chunks) of a stream."""
    content = reasoning = legacy = ""
    fragments: dict[int, list[str]] = {}
    chunks = [chunk async for chunk in stream]
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += extra(delta).get("reasoning") or ""
            legacy += extra(delta).get("reasoning_content") or ""
            for call in delta.tool_calls or ():
                if call.function and call.function.arguments:
                    fragments.setdefault(call.index, []).append(call.function.arguments)
    return content, reasoning, legacy, fragments, chunks


async def test_passthrough_weather_round_trip(flavour_engine: VLLMEngine) -> None:
    """A think block plus a call of the engine's format come back as ``reasoning`` /
    ``reasoning_content`` and ``tool_calls`` (a call after </think>: vLLM #39056, #42021); the
    answer to the tool result likewise, streamed and not."""
    async with served(weather_agent(flavour_engine)) as (_, client):
        served_name = flavour_engine.spec.served_model_name
        out = await client.chat.completions.create(model=served_name, messages=USER, tools=WEATHER,
                                                   tool_choice="required")  # fmt: skip
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls" and message.content is None
        assert (extra(message)["reasoning"], extra(message)["reasoning_content"]) == (REASONING, REASONING)
        calls = message.tool_calls or []
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
            ("get_current_weather", {"city": "广州"})
        ]
        history: Any = [*USER, message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": calls[0].id, "content": SEED}]  # fmt: skip
        answer = await client.chat.completions.create(model=served_name, messages=history, tools=WEATHER)
        assert answer.choices[0].message.content == ANSWER and not answer.choices[0].message.tool_calls
        assert extra(answer.choices[0].message)["reasoning_content"] == ANSWER_REASONING

        stream = await client.chat.completions.create(model=served_name, messages=USER, tools=WEATHER,
                                                      tool_choice="required", stream=True)  # fmt: skip
        content, reasoning, legacy, fragments, chunks = await collect(stream)
        assert (content, reasoning, legacy) == ("", REASONING, REASONING)
        assert json.loads("".join(fragments[0])) == {"city": "广州"} and list(fragments) == [0]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        stream = await client.chat.completions.create(model=served_name, messages=history, tools=WEATHER,
                                                      stream=True, extra_body={"include_reasoning": False})  # fmt: skip
        content, reasoning, legacy, fragments, _ = await collect(stream)
        assert (content, reasoning, legacy, fragments) == (ANSWER, "", "", {})


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [({"type": "function", "function": {"name": "get_time"}}, {}),
     ({"type": "function", "function": {"name": "echo", "parameters": {
         "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}, {"text": CODE})],
    ids=["no-parameters", "closing-tags-in-a-value"],
)  # fmt: skip
async def test_passthrough_arguments_stream_and_stay_whole(
    flavour_engine: VLLMEngine, tool: dict[str, Any], arguments: dict[str, Any]
) -> None:
    """XML arguments stream as the fragments of their values (vLLM #30439; sent once the call is
    complete), a Hermes call's as one;
    a call without parameters has ``{}`` (vLLM #28806); a value quoting ``</tool_call>`` and
    ``</parameter>`` stays whole (vLLM PR #45310)."""
    name = tool["function"]["name"]
    agent = Agent(agent_spec(flavour_engine, tools=(name,), tool_choice="auto"),
                  pinned(flavour_engine, name, arguments), [echo, get_time])  # fmt: skip
    async with served(agent) as (_, client):
        served_name = flavour_engine.spec.served_model_name
        out = await client.chat.completions.create(model=served_name, messages=USER, tools=[tool],
                                                   tool_choice="required")  # fmt: skip
        (call,) = out.choices[0].message.tool_calls or []
        assert (call.function.name, call.function.arguments) == (
            name,
            json.dumps(arguments, ensure_ascii=False),
        )  # type: ignore[union-attr]
        stream = await client.chat.completions.create(model=served_name, messages=USER, tools=[tool],
                                                      tool_choice="required", stream=True)  # fmt: skip
        _, reasoning, _, fragments, chunks = await collect(stream)
        assert reasoning == REASONING and "".join(fragments[0]) == call.function.arguments  # type: ignore[union-attr]
        if is_qwen3(flavour_engine):
            assert len(fragments[0]) == 1  # a Hermes call is JSON: sent once complete
        else:  # "{" with the name, then '"text": "', the value as it is written, '"', "}"
            assert len(fragments[0]) > (3 if arguments else 1)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_passthrough_call_inside_the_think_block_is_text_of_the_reasoning(
    flavour_engine: VLLMEngine,
) -> None:
    call = tool_call_body("get_current_weather", {"city": "北京"}, format=flavour_engine.tool_call_format)
    thought = f"Maybe\n<tool_call>\n{call}\n</tool_call>\nno."
    spec = agent_spec(flavour_engine, tool_choice="auto")
    agent = Agent(
        spec, pinned(flavour_engine, answer=f"<think>\n{thought}\n</think>\n\nNo call."), load_tools(spec)
    )
    async with served(agent) as (_, client):
        out = await client.chat.completions.create(model=flavour_engine.spec.served_model_name, messages=USER,
                                                   tools=WEATHER)  # fmt: skip
        choice = out.choices[0]
        assert (choice.finish_reason, choice.message.content, choice.message.tool_calls) == (
            "stop",
            "No call.",
            None,
        )
        assert extra(choice.message)["reasoning"] == thought


async def test_agent_mode_returns_the_turns_reasoning(flavour_engine: VLLMEngine) -> None:
    agent = weather_agent(flavour_engine)
    async with served(agent) as (_, client):
        out = await client.chat.completions.create(model=agent.name, messages=USER)
        message = out.choices[0].message
        assert message.content == ANSWER
        assert extra(message)["reasoning_content"] == f"{REASONING}\n\n{ANSWER_REASONING}"
        assert [step["type"] for step in extra(message)["qwenrun_steps"]] == ["tool_call", "tool_result"]
        stream = await client.chat.completions.create(model=agent.name, messages=USER, stream=True)
        content, reasoning, legacy, _, _ = await collect(stream)
        assert (content, reasoning, legacy) == (ANSWER, *[f"{REASONING}\n\n{ANSWER_REASONING}"] * 2)


async def test_per_request_thinking_switch_and_budget(flavour_engine: VLLMEngine) -> None:
    """``chat_template_kwargs: {enable_thinking: false}`` reaches the chat template (Qwen3's renders
    an empty think block, so a forced call needs none); ``thinking_token_budget`` goes to vLLM,
    which refuses it without a reasoning parser (400); reserved template variables are a 400."""
    spec = agent_spec(flavour_engine, tools=("echo",), tool_choice="auto")
    agent = Agent(spec, flavour_engine, [echo])
    only = [{"type": "function", "function": {"name": "echo", "parameters": {
        "type": "object", "properties": {"text": {"enum": ["hi"]}}, "required": ["text"]}}}]  # fmt: skip
    async with served(agent) as (_, client):
        served_name = flavour_engine.spec.served_model_name
        for thinking in (True, False):
            out = await client.chat.completions.create(
                model=served_name, messages=USER, tools=only, tool_choice="required", max_tokens=64,
                extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
            )  # fmt: skip
            (call,) = out.choices[0].message.tool_calls or []
            assert json.loads(call.function.arguments) == {"text": "hi"}  # type: ignore[union-attr]
            assert extra(out.choices[0].message).get("reasoning") is None  # the empty block has none
        budget = {"thinking_token_budget": 4, "ignore_eos": True}
        if is_qwen3(flavour_engine):
            out = await client.chat.completions.create(model=served_name, messages=USER, max_tokens=24,
                                                       extra_body=budget)  # fmt: skip
            assert out.choices[0].finish_reason == "length"
        else:
            with pytest.raises(BadRequestError, match="thinking_token_budget"):
                await client.chat.completions.create(model=served_name, messages=USER, max_tokens=24,
                                                     extra_body=budget)  # fmt: skip
        with pytest.raises(BadRequestError, match="chat_template_kwargs: the server sets tools itself"):
            await client.chat.completions.create(model=served_name, messages=USER,
                                                 extra_body={"chat_template_kwargs": {"tools": []}})  # fmt: skip


async def test_remote_engine_reads_the_endpoints_reasoning(flavour_engine: VLLMEngine) -> None:
    """``engine.kind: openai`` on another qwenrun: the reasoning comes apart from the text
    (``reasoning``) and becomes Reasoning events; the call comes as ``tool_calls``."""
    async with served(weather_agent(flavour_engine)) as (url, _):
        spec = AgentSpec.from_dict(
            {
                "model": {"path": "remote", "tool_call_format": flavour_engine.tool_call_format},
                "engine": {"kind": "openai", "base_url": f"{url}/v1", "model": flavour_engine.spec.served_model_name},
                "agent": {"name": "remote-weather", "tool_choice": "required", "max_iterations": 3},
                "tools": [{"name": "get_current_weather", "settings": {"backend": "mock"}}],
                "sessions": {"enabled": False},
            },
            source="tests/remote.yaml",
        )  # fmt: skip
        remote = Agent(spec, tools=load_tools(spec))
        assert isinstance(remote.engine, OpenAIEngine)
        async with remote:
            events = [event async for event in remote.session().stream(QUESTION)]
    thoughts = [event.text for event in events if isinstance(event, Reasoning)]
    assert "".join(thoughts) == REASONING + ANSWER_REASONING
    assert [(e.name, e.arguments) for e in events if isinstance(e, ToolCall)] == [
        ("get_current_weather", {"city": "广州"})
    ]
    assert [e.content for e in events if isinstance(e, ToolResult)] == [SEED]
    assert isinstance(events[-1], Final) and events[-1].text == ANSWER

"""The OpenAI-compatible server on the scripted engine: a real uvicorn server on 127.0.0.1 and the
official ``openai`` client (sync and async, streaming and not), plus raw HTTP for bad requests."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from openai import AsyncOpenAI, OpenAI
from weather import get_current_weather, weather_tool

from qwenrun.agent import Agent
from qwenrun.engines.base import Constraint, Delta, Request
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.errors import ConfigError, EngineError
from qwenrun.frontends.openai import create_app, serve
from qwenrun.spec.agent_file import AgentSpec, ToolChoiceRule
from qwenrun.toolcalls.forcing import forced_call
from qwenrun.toolcalls.hermes import FORCED_PREFILL

SERVED = "Qwen2.5-7B-Instruct"
AGENT = "weather"
QUESTION = "深圳天气如何?"
WEATHER_TOOL = weather_tool({"type": "string", "description": "The city, e.g. 深圳"})
CALL = tool_call_text("get_current_weather", {"city": "深圳"})
ANSWER = "深圳今天多云到晴，气温28~31℃。"



def make_spec(**frontend: Any) -> AgentSpec:
    return AgentSpec.from_dict(
        {
            "model": {"path": "/models/qwen", "served_model_name": SERVED},
            "sampling": {"max_tokens": 1024},
            "agent": {"name": AGENT, "system_prompt": "You are the weather agent."},
            "frontend": {"kind": "openai", "max_tokens_cap": 512, "max_request_bytes": 20_000, **frontend},
        },
        source="tests/server.yaml",
    )


# -- a real server in a thread ----------------------------------------------------------------------


class _QuietServer(uvicorn.Server):
    def capture_signals(self) -> Any:  # leave the test runner's signal handlers alone
        from contextlib import nullcontext

        return nullcontext()


@contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free port of 127.0.0.1 in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    server = _QuietServer(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "the server failed to start"
            assert time.monotonic() < deadline, "the server did not start in 10 s"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@dataclass
class Harness:
    url: str
    engine: ScriptedEngine
    agent: Agent
    replies: list[str]
    script: Callable[[ModelRequest], str] | None = None

    def reply(self, request: ModelRequest) -> str:
        if self.script is not None:
            return self.script(request)
        if not self.replies:
            raise EngineError("the test gave no reply for this call")
        return self.replies.pop(0)

    def sync_client(self, **kwargs: Any) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)

    def async_client(self, **kwargs: Any) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)


def build(engine: ScriptedEngine, **frontend: Any) -> tuple[Agent, FastAPI]:
    agent = Agent(make_spec(**frontend), engine, tools=[get_current_weather])
    return agent, create_app(agent)


@contextmanager
def scripted_server() -> Iterator[Harness]:
    """A running server whose ScriptedEngine answers from the harness's script and replies."""
    holder: list[Harness] = []
    engine = ScriptedEngine(lambda request: holder[0].reply(request))
    agent, app = build(engine)
    with running(app) as url:
        holder.append(Harness(url, engine, agent, []))
        yield holder[0]


@pytest.fixture(scope="module")
def server() -> Iterator[Harness]:
    with scripted_server() as harness:
        yield harness


@pytest.fixture
def srv(server: Harness) -> Harness:
    """The shared server, with a fresh script and call log."""
    server.engine.calls.clear()
    server.engine.chunk_size, server.engine.delay_s = 3, 0.0
    server.replies.clear()
    server.script = None
    return server


def prompt_tokens(request: ModelRequest) -> int:  # what ScriptedEngine reports
    return sum(len(str(message.get("content") or "")) for message in request.messages)


def completion_tokens(reply: str, chunk_size: int = 3) -> int:
    return math.ceil(len(reply) / chunk_size)


def metric(text: str, name: str, labels: Mapping[str, str]) -> float:
    """The value of one sample of the Prometheus text format (0 if absent)."""
    want = "{" + ",".join(f'{key}="{value}"' for key, value in sorted(labels.items())) + "}"
    for line in text.splitlines():
        if line.startswith(name + "{"):
            sample, _, value = line.rpartition(" ")
            body = sample[len(name) + 1 : -1].split(",")
            if "{" + ",".join(sorted(body)) + "}" == want:
                return float(value)
    return 0.0


# -- pass-through: the seed's flow ------------------------------------------------------------------


def test_seed_flow_round_trip(srv: Harness) -> None:
    srv.replies[:] = [CALL, ANSWER]
    with srv.sync_client() as client:
        first = client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER_TOOL]
        )
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        calls = choice.message.tool_calls or []
        assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
        assert calls[0].function.name == "get_current_weather"
        assert json.loads(calls[0].function.arguments) == {"city": "深圳"}
        assert first.model == SERVED and first.id.startswith("chatcmpl-")
        assert first.usage is not None
        assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (
            len(QUESTION),
            completion_tokens(CALL),
        )
        assert first.usage.total_tokens == len(QUESTION) + completion_tokens(CALL)

        history: list[Any] = [
            {"role": "user", "content": QUESTION},
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": calls[0].id, "content": get_current_weather("深圳")},
        ]
        second = client.chat.completions.create(model=SERVED, messages=history, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == ANSWER
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
    # the engine got the client's messages and tools as they are
    request = srv.engine.calls[1]
    assert request.tools == [WEATHER_TOOL]
    assert request.messages[1]["tool_calls"][0]["function"] == {
        "name": "get_current_weather",
        "arguments": calls[0].function.arguments,
    }
    assert request.messages[2] == history[2]
    assert request.constraint is None and request.prefill == ""


async def test_streamed_tool_call_reassembles(srv: Harness) -> None:
    srv.replies[:] = ["我来查一下。" + CALL]
    async with srv.async_client() as client:
        stream = await client.chat.completions.create(
            model=SERVED,
            messages=[{"role": "user", "content": QUESTION}],
            tools=[WEATHER_TOOL],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "我来查一下。"
    deltas = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    header, arguments = deltas  # OpenAI's shape: id and name first, then the arguments
    assert header.index == 0 and header.id and header.type == "function"
    assert header.function is not None and header.function.name == "get_current_weather"
    assert header.function.arguments == ""
    assert arguments.index == 0 and arguments.id is None and arguments.function is not None
    assert json.loads(arguments.function.arguments) == {"city": "深圳"}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == completion_tokens("我来查一下。" + CALL)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_and_non_stream_agree(srv: Harness) -> None:
    reply = "  \n" + "Hello there!\n\n" + CALL + "\n" + CALL.replace("深圳", "广州") + "\n"
    srv.script = lambda request: reply
    messages: Any = [{"role": "user", "content": QUESTION}]
    with srv.sync_client() as client:
        whole = client.chat.completions.create(model=SERVED, messages=messages, tools=[WEATHER_TOOL])
        with client.chat.completions.create(
            model=SERVED, messages=messages, tools=[WEATHER_TOOL], stream=True
        ) as stream:
            chunks = list(stream)
    message = whole.choices[0].message
    assert message.content == "Hello there!"
    assert [json.loads(c.function.arguments)["city"] for c in message.tool_calls or []] == ["深圳", "广州"]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == message.content
    headers = [t for c in chunks for t in c.choices[0].delta.tool_calls or [] if t.id]
    assert [(t.index, t.function.name if t.function else None) for t in headers] == [
        (0, "get_current_weather"),
        (1, "get_current_weather"),
    ]
    assert chunks[-1].usage is None  # not asked for


def test_text_without_tools_is_plain_content(srv: Harness) -> None:
    srv.replies[:] = ["<tool_call> is just text here"]
    with srv.sync_client() as client:
        out = client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content == "<tool_call> is just text here"
    assert srv.engine.calls[0].tools is None


def test_malformed_call_comes_back_as_text(srv: Harness) -> None:
    bad = '<tool_call>\n{"name": "get_current_weather", "arguments": {"city": 深圳}\n</tool_call>'
    srv.replies[:] = [bad]
    with srv.sync_client() as client:
        out = client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL]
        )
    assert out.choices[0].finish_reason == "stop" and not out.choices[0].message.tool_calls
    assert out.choices[0].message.content == bad


BARE_CALL = '```json\n{"name": "get_current_weather", "arguments": {"city": "深圳"}}\n```'


@pytest.mark.parametrize("stream", [False, True])
def test_bare_json_call_becomes_tool_calls(srv: Harness, stream: bool) -> None:
    srv.script = lambda request: BARE_CALL  # what small Qwen models write instead of the tags
    messages: Any = [{"role": "user", "content": QUESTION}]
    with srv.sync_client() as client:
        if not stream:
            out = client.chat.completions.create(model=SERVED, messages=messages, tools=[WEATHER_TOOL])
            choice = out.choices[0]
            assert (choice.finish_reason, choice.message.content) == ("tool_calls", None)
            (call,) = choice.message.tool_calls or []
            assert call.type == "function" and call.id.startswith("call_")
            assert (call.function.name, json.loads(call.function.arguments)) == (
                "get_current_weather",
                {"city": "深圳"},
            )
            return
        with client.chat.completions.create(
            model=SERVED, messages=messages, tools=[WEATHER_TOOL], stream=True
        ) as chunks:
            received = list(chunks)
    assert "".join(c.choices[0].delta.content or "" for c in received) == ""
    calls = [t for c in received for t in c.choices[0].delta.tool_calls or []]
    assert calls[0].function is not None and calls[0].function.name == "get_current_weather"
    assert json.loads(calls[1].function.arguments if calls[1].function else "") == {"city": "深圳"}
    assert [c.choices[0].finish_reason for c in received if c.choices[0].finish_reason] == ["tool_calls"]


def test_bare_json_is_text_for_an_undeclared_tool_or_without_tools(srv: Harness) -> None:
    other = BARE_CALL.replace("get_current_weather", "delete_everything")
    srv.replies[:] = [other, BARE_CALL]
    with srv.sync_client() as client:
        undeclared = client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL]
        )
        no_tools = client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "hi"}])
    assert undeclared.choices[0].message.content == other and not undeclared.choices[0].message.tool_calls
    assert no_tools.choices[0].message.content == BARE_CALL and not no_tools.choices[0].message.tool_calls


def test_broken_bare_json_call_comes_back_as_it_was_written(srv: Harness) -> None:
    broken = '{"name": "get_current_weather", "arguments": {"city": 深圳}}'
    srv.replies[:] = [broken]
    with srv.sync_client() as client:
        out = client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL]
        )
    assert out.choices[0].message.content == broken and out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("tool_choice", "sends_tools", "forced_name"),
    [
        ("auto", True, None),
        ("none", False, None),
        ("required", True, "get_current_weather"),
        ({"type": "function", "function": {"name": "get_current_weather"}}, True, "get_current_weather"),
    ],
)
def test_tool_choice_reaches_the_engine(
    srv: Harness, tool_choice: Any, sends_tools: bool, forced_name: str | None
) -> None:
    srv.replies[:] = [CALL if sends_tools else "no tools today"]
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    with srv.sync_client() as client:
        out = client.chat.completions.create(
            model=SERVED,
            messages=[{"role": "user", "content": QUESTION}],
            tools=[WEATHER_TOOL, other],
            tool_choice=tool_choice,
        )
    request = srv.engine.calls[0]
    assert (request.tools is not None) == sends_tools
    if forced_name is None:
        assert request.constraint is None and request.prefill == ""
    else:
        assert request.prefill == FORCED_PREFILL and isinstance(request.constraint, Constraint)
        schema = request.constraint.json
        if tool_choice == "required":  # several calls may follow: a structural tag around the schema
            assert schema is None and request.constraint.structural_tag is not None
            schema = request.constraint.structural_tag["format"]["elements"][0]["json_schema"]
        assert schema is not None
        options = schema.get("anyOf", [schema])
        names = [option["properties"]["name"]["enum"][0] for option in options]
        assert forced_name in names
        assert names == (["get_current_weather", "get_time"] if tool_choice == "required" else [forced_name])
    calls = out.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == (["get_current_weather"] if sends_tools else [])


def test_parallel_tool_calls_false_keeps_the_first(srv: Harness) -> None:
    two = CALL + "\n" + CALL.replace("深圳", "广州")
    srv.script = lambda request: two
    with srv.sync_client() as client:
        kwargs: Any = {
            "model": SERVED,
            "messages": [{"role": "user", "content": QUESTION}],
            "tools": [WEATHER_TOOL],
        }
        both = client.chat.completions.create(**kwargs)
        one = client.chat.completions.create(**kwargs, parallel_tool_calls=False)
        with client.chat.completions.create(**kwargs, parallel_tool_calls=False, stream=True) as stream:
            streamed = [t for c in stream for t in c.choices[0].delta.tool_calls or [] if t.id]
    assert len(both.choices[0].message.tool_calls or []) == 2
    calls = one.choices[0].message.tool_calls or []
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "深圳"}]
    assert [t.index for t in streamed] == [0]


def test_sampling_overrides_and_max_tokens_cap(srv: Harness) -> None:
    srv.script = lambda request: "ok"
    messages: Any = [{"role": "user", "content": "hi"}]
    with srv.sync_client() as client:
        client.chat.completions.create(
            model=SERVED,
            messages=messages,
            max_tokens=100,
            temperature=0.2,
            top_p=0.5,
            stop="END",
            seed=7,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
        )
        client.chat.completions.create(model=SERVED, messages=messages, max_tokens=100_000)  # over the cap
        client.chat.completions.create(model=SERVED, messages=messages)  # spec's 1024 is over the cap too
        client.chat.completions.create(
            model=SERVED, messages=messages, max_completion_tokens=64, max_tokens=9
        )
    first, capped, default, newer = (call.overrides for call in srv.engine.calls)
    assert first == {
        "max_tokens": 100,
        "temperature": 0.2,
        "top_p": 0.5,
        "stop": ["END"],
        "seed": 7,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
    }
    assert capped == default == {"max_tokens": 512}
    assert newer == {"max_tokens": 64}


def test_only_streaming_requests_ask_the_engine_for_deltas(srv: Harness) -> None:
    """A non-streaming pass-through request lets the engine answer in one piece (FINAL_ONLY)."""
    srv.script = lambda request: "ok"
    messages: Any = [{"role": "user", "content": "hi"}]
    with srv.sync_client() as client:
        assert (
            client.chat.completions.create(model=SERVED, messages=messages).choices[0].message.content == "ok"
        )
        chunks = client.chat.completions.create(model=SERVED, messages=messages, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ok"
    assert [call.incremental for call in srv.engine.calls] == [False, True]


def test_vllm_extra_sampling_parameters_pass_through(srv: Harness) -> None:
    """What `vllm serve` takes in ``extra_body`` reaches the engine; a contradiction is a 400."""
    srv.script = lambda request: "ok"
    messages: Any = [{"role": "user", "content": "hi"}]
    extra = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.05, "min_tokens": 8, "ignore_eos": True}
    with srv.sync_client() as client:
        client.chat.completions.create(model=SERVED, messages=messages, max_tokens=16, extra_body=extra)
        with pytest.raises(openai.BadRequestError) as too_many:
            client.chat.completions.create(
                model=SERVED, messages=messages, max_tokens=4, extra_body={"min_tokens": 5}
            )
        with pytest.raises(openai.BadRequestError) as bad_k:
            client.chat.completions.create(model=SERVED, messages=messages, extra_body={"top_k": -5})
    assert [call.overrides for call in srv.engine.calls] == [{"max_tokens": 16, **extra}]
    assert "min_tokens (5) is larger than max_tokens (4)" in str(too_many.value)
    assert too_many.value.body["param"] == "min_tokens"  # type: ignore[index]
    assert "top_k" in str(bad_k.value)


# -- parity with vllm serve: structured outputs, n, logprobs, several forced calls, Content-Type ----------

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_json_response_formats_constrain_the_engine(srv: Harness) -> None:
    srv.script = lambda request: '{"city": "深圳"}'
    messages: Any = [{"role": "user", "content": QUESTION}]
    formats: list[Any] = [
        {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}},
        {"type": "json_object"},
        {"type": "text"},
    ]
    with srv.sync_client() as client:
        answers = [
            client.chat.completions.create(model=SERVED, messages=messages, response_format=f)
            for f in formats
        ]
        with client.beta.chat.completions.stream(
            model=SERVED, messages=messages, response_format=formats[0]
        ) as stream:
            streamed = stream.get_final_completion()
    assert [answer.choices[0].message.content for answer in answers] == ['{"city": "深圳"}'] * 3
    assert streamed.choices[0].message.content == '{"city": "深圳"}'
    schema, any_object, text, streamed_schema = (call.constraint for call in srv.engine.calls)
    assert schema == streamed_schema == Constraint(json=SCHEMA)
    assert any_object == Constraint(json_object=True) and text is None


def test_n_choices_run_as_n_requests_with_consecutive_seeds(srv: Harness) -> None:
    srv.script = lambda request: f"answer with seed {request.overrides.get('seed')}"
    messages: Any = [{"role": "user", "content": "hi"}]
    with srv.sync_client() as client:
        out = client.chat.completions.create(model=SERVED, messages=messages, n=3, seed=7)
        chunks = list(client.chat.completions.create(
            model=SERVED, messages=messages, n=2, stream=True, stream_options={"include_usage": True}
        ))  # fmt: skip
    assert [choice.index for choice in out.choices] == [0, 1, 2]
    assert [choice.message.content for choice in out.choices] == [
        f"answer with seed {seed}" for seed in (7, 8, 9)
    ]
    assert sorted(call.overrides["seed"] for call in srv.engine.calls[:3]) == [7, 8, 9]
    reply = completion_tokens("answer with seed 7")
    assert out.usage is not None and out.usage.completion_tokens == 3 * reply
    assert out.usage.prompt_tokens == prompt_tokens(srv.engine.calls[0])  # one prompt, shared
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: "answer with seed None", 1: "answer with seed None"}
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason == "stop"]
    assert sorted(finished) == [0, 1]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2 * completion_tokens(
        texts[0]
    )


def test_logprobs_of_every_token(srv: Harness) -> None:
    srv.script = lambda request: "sunny today"
    messages: Any = [{"role": "user", "content": "hi"}]
    with srv.sync_client() as client:
        out = client.chat.completions.create(model=SERVED, messages=messages, logprobs=True, top_logprobs=2)
        plain = client.chat.completions.create(model=SERVED, messages=messages)
        chunks = list(
            client.chat.completions.create(model=SERVED, messages=messages, logprobs=True, stream=True)
        )
    assert [call.logprobs for call in srv.engine.calls] == [2, None, 0]
    content = out.choices[0].logprobs.content if out.choices[0].logprobs else None
    assert content is not None and "".join(entry.token for entry in content) == "sunny today"
    assert content[0].token == "sun" and content[0].logprob == -1.5 and content[0].bytes == list(b"sun")
    assert [top.token for top in content[0].top_logprobs] == ["sun", "sun0"]
    assert plain.choices[0].logprobs is None
    streamed = [
        entry
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for entry in c.choices[0].logprobs.content or []
    ]
    assert "".join(entry.token for entry in streamed) == "sunny today" and streamed[0].top_logprobs == []


@pytest.mark.parametrize("parallel", [None, True, False])
def test_required_tool_choice_may_return_several_calls(srv: Harness, parallel: bool | None) -> None:
    two = CALL + "\n" + CALL.replace("深圳", "广州")
    srv.script = lambda request: two
    kwargs: Any = {"model": SERVED, "messages": [{"role": "user", "content": QUESTION}],
                   "tools": [WEATHER_TOOL], "tool_choice": "required"}  # fmt: skip
    if parallel is not None:
        kwargs["parallel_tool_calls"] = parallel
    with srv.sync_client() as client:
        out = client.chat.completions.create(**kwargs)
    cities = [json.loads(call.function.arguments)["city"] for call in out.choices[0].message.tool_calls or []]
    constraint = srv.engine.calls[0].constraint
    assert constraint is not None
    if parallel is False:  # one call, by the grammar and by the parser
        assert cities == ["深圳"] and constraint.json is not None
    else:
        assert cities == ["深圳", "广州"] and constraint.structural_tag is not None


def test_several_calls_grammar_accepts_one_or_more_calls_and_nothing_else() -> None:
    """The structural tag of tool_choice "required" with parallel calls, checked by xgrammar."""
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string as accepts

    forced = forced_call("hermes", [WEATHER_TOOL], "required", parallel=True)
    assert forced is not None and forced.structural_tag is not None and forced.prefill == FORCED_PREFILL
    grammar = xgrammar.Grammar.from_structural_tag(json.dumps(forced.structural_tag))
    one = '{"name":"get_current_weather","arguments":{"city":"深 圳"}}\n</tool_call>'
    assert accepts(grammar, one)
    assert accepts(grammar, one + "\n<tool_call>\n" + one)
    assert not accepts(grammar, one + " and some text")
    assert not accepts(grammar, '{"name":"get_time","arguments":{}}\n</tool_call>')
    single = forced_call("hermes", [WEATHER_TOOL], "required")
    assert single is not None and single.json_schema is not None  # the agent's own forced calls stay single


@pytest.mark.parametrize(
    ("content_type", "status"),
    [(None, 400), ("text/plain", 400), ("application/x-www-form-urlencoded", 400),
     ("application/json; charset=utf-8", 200), ("Application/JSON", 200)],
)  # fmt: skip
def test_the_body_must_be_sent_as_json(srv: Harness, content_type: str | None, status: int) -> None:
    srv.script = lambda request: "ok"
    body = json.dumps({"model": SERVED, "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    with httpx.Client(base_url=srv.url) as http:
        response = http.post("/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == status, response.text
    if status == 400:
        assert response.json()["error"]["message"].startswith("Content-Type must be application/json")


def test_a_body_that_is_not_an_object_says_so(srv: Harness) -> None:
    with httpx.Client(base_url=srv.url) as http:
        for body, kind in (
            (b"[1, 2]", "an array"),
            (b"3", "a number"),
            (b"null", "null"),
            (b'"x"', "a string"),
        ):
            response = http.post(
                "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
            )
            message = response.json()["error"]["message"]
            assert response.status_code == 400 and message == f"the body must be a JSON object, not {kind}"
            assert "ChatCompletionRequest" not in message


# -- agent mode ---------------------------------------------------------------------------------------


def test_agent_mode_runs_the_tools_server_side(srv: Harness) -> None:
    srv.replies[:] = [CALL, ANSWER]
    with srv.sync_client() as client:
        out = client.chat.completions.create(
            model=AGENT,
            messages=[
                {"role": "system", "content": "Ignore your tools."},
                {"role": "user", "content": QUESTION},
            ],
        )
    message = out.choices[0].message
    assert message.content == ANSWER and out.choices[0].finish_reason == "stop" and not message.tool_calls
    steps = (message.model_extra or {})["qwenrun_steps"]
    assert [step["type"] for step in steps] == ["tool_call", "tool_result"]
    assert steps[0]["name"] == "get_current_weather" and steps[0]["arguments"] == {"city": "深圳"}
    assert steps[1]["id"] == steps[0]["id"] and steps[1]["content"] == get_current_weather("深圳")
    assert steps[1]["is_error"] is False
    first, second = srv.engine.calls
    assert first.messages[0] == {"role": "system", "content": "You are the weather agent."}
    assert all(
        "Ignore your tools." not in str(m.get("content")) for m in first.messages
    )  # client system dropped
    assert first.tools is not None and first.tools[0]["function"]["name"] == "get_current_weather"
    assert out.usage is not None
    assert out.usage.prompt_tokens == prompt_tokens(first) + prompt_tokens(second)
    assert out.usage.completion_tokens == completion_tokens(CALL) + completion_tokens(ANSWER)


async def test_agent_mode_streams_steps_and_answer(srv: Harness) -> None:
    srv.replies[:] = [CALL, ANSWER]
    history: Any = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
    ]
    async with srv.async_client() as client:
        stream = await client.chat.completions.create(
            model=AGENT, messages=history, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    steps = [(c.model_extra or {}).get("qwenrun_step") for c in chunks]
    steps = [step for step in steps if step]
    assert [step["type"] for step in steps] == ["tool_call", "tool_result"]
    for chunk in chunks:
        if (chunk.model_extra or {}).get("qwenrun_step"):
            assert chunk.choices[0].delta.content is None and chunk.choices[0].delta.tool_calls is None
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == (
        completion_tokens(CALL) + completion_tokens(ANSWER)
    )
    # the history before the last user message became the session's history
    assert srv.engine.calls[0].messages[1:] == [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": QUESTION},
    ]


def test_agent_mode_tool_choice_none_and_bad_requests(srv: Harness) -> None:
    srv.replies[:] = ["不查了。"]
    with srv.sync_client() as client:
        out = client.chat.completions.create(
            model=AGENT, messages=[{"role": "user", "content": QUESTION}], tool_choice="none"
        )
        assert out.choices[0].message.content == "不查了。" and srv.engine.calls[0].tools is None
        with pytest.raises(openai.BadRequestError) as tools_given:
            client.chat.completions.create(
                model=AGENT, messages=[{"role": "user", "content": "x"}], tools=[WEATHER_TOOL]
            )
        with pytest.raises(openai.BadRequestError) as not_user_last:
            client.chat.completions.create(
                model=AGENT,
                messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            )
        with pytest.raises(openai.BadRequestError) as unknown_tool:
            client.chat.completions.create(
                model=AGENT,
                messages=[{"role": "user", "content": "x"}],
                tool_choice={"type": "function", "function": {"name": "nope"}},
            )
    assert tools_given.value.body["param"] == "tools"  # type: ignore[index]
    assert not_user_last.value.body["param"] == "messages"  # type: ignore[index]
    assert unknown_tool.value.body["param"] == "tool_choice"  # type: ignore[index]
    assert len(srv.engine.calls) == 1


def test_agent_mode_applies_the_files_tool_choice_rules(srv: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request without tool_choice gets the rule that matches its user message (a forced call of
    the weather tool), or the file's tool_choice; a request's own tool_choice wins."""
    spec = srv.agent.spec
    rules = [ToolChoiceRule(when="天气", tool_choice="get_current_weather")]
    settings = spec.agent.model_copy(update={"tool_choice_rules": rules})
    monkeypatch.setattr(srv.agent, "spec", spec.model_copy(update={"agent": settings}))
    srv.replies[:] = [CALL, ANSWER, "不客气。", "不查了。"]
    with srv.sync_client() as client:
        def ask(content: str, **options: Any) -> str | None:
            out = client.chat.completions.create(model=AGENT, messages=[{"role": "user", "content": content}],
                                                 **options)  # fmt: skip
            return out.choices[0].message.content

        assert ask(QUESTION) == ANSWER
        assert ask("谢谢") == "不客气。"
        assert ask(QUESTION, tool_choice="none") == "不查了。"
    assert [(call.tool_choice, call.constraint is not None) for call in srv.engine.calls] == [
        ("get_current_weather", True), ("auto", False), ("auto", False), ("none", False)
    ]  # fmt: skip


# -- models, health, metrics ----------------------------------------------------------------------------


def test_models_health_and_metrics(srv: Harness) -> None:
    srv.replies[:] = [CALL, CALL, ANSWER]
    with srv.sync_client() as client:
        assert [model.id for model in client.models.list()] == [SERVED, AGENT]
        assert client.models.retrieve(AGENT).id == AGENT
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gpt-4")
        client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER_TOOL]
        )
        client.chat.completions.create(model=AGENT, messages=[{"role": "user", "content": QUESTION}])
    with httpx.Client(base_url=srv.url) as http:
        assert http.get("/health").json() == {"status": "ok"}
        response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    chat = "/v1/chat/completions"
    assert (
        metric(text, "qwenrun_requests_total", {"endpoint": chat, "mode": "passthrough", "status": "200"})
        >= 1
    )
    assert metric(text, "qwenrun_requests_total", {"endpoint": chat, "mode": "agent", "status": "200"}) >= 1
    assert (
        metric(text, "qwenrun_requests_total", {"endpoint": "/v1/models", "mode": "none", "status": "200"})
        >= 1
    )
    for mode in ("passthrough", "agent"):
        assert metric(text, "qwenrun_tool_calls_total", {"tool": "get_current_weather", "mode": mode}) >= 1
        assert metric(text, "qwenrun_prompt_tokens_total", {"mode": mode}) >= len(QUESTION)
        assert metric(text, "qwenrun_completion_tokens_total", {"mode": mode}) >= completion_tokens(CALL)
        assert metric(text, "qwenrun_request_duration_seconds_count", {"endpoint": chat, "mode": mode}) >= 1
    assert metric(text, "qwenrun_requests_in_flight", {"endpoint": "/metrics"}) == 1  # this very request
    assert metric(text, "qwenrun_requests_in_flight", {"endpoint": chat}) == 0


async def test_health_is_503_before_start_and_after_an_engine_failure() -> None:
    engine = ScriptedEngine(["never"])
    _, app = build(engine)
    transport = httpx.ASGITransport(app=app)  # no lifespan: the engine never started
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        assert (await http.get("/health")).status_code == 503
    with running(app) as url, httpx.Client(base_url=url) as http:
        assert http.get("/health").status_code == 200
        engine.dead = True
        body = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}]}
        for stream in (False, True):
            response = http.post("/v1/chat/completions", json={**body, "stream": stream})
            assert response.status_code == 503
            assert response.json()["error"]["type"] == "server_error"
            assert response.json()["error"]["code"] == "engine_unavailable"
        assert http.get("/health").status_code == 503
    assert not engine.started  # the lifespan shut the engine down


class BreakingEngine(ScriptedEngine):
    """Dies after two deltas of every answer."""

    async def generate(self, request: Request) -> AsyncIterator[Delta]:  # type: ignore[override]
        sent = 0
        async for delta in super().generate(request):
            if sent == 2:
                raise EngineError("the engine died mid-answer")
            sent += 1
            yield delta


async def test_engine_error_mid_request() -> None:
    engine = BreakingEngine(lambda request: "a long answer that never ends")
    _, app = build(engine)
    with running(app) as url:
        async with AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
            messages: Any = [{"role": "user", "content": "hi"}]
            with pytest.raises(openai.InternalServerError) as error:
                await client.chat.completions.create(model=SERVED, messages=messages)
            assert error.value.status_code == 503 and "mid-answer" in error.value.message
            stream = await client.chat.completions.create(model=SERVED, messages=messages, stream=True)
            seen: list[str] = []
            with pytest.raises(openai.APIError, match="mid-answer"):
                async for chunk in stream:
                    seen.append(chunk.choices[0].delta.content or "")
            assert "".join(seen) == "a long"
            for _ in range(3):  # the server is alive and keeps answering
                models = await client.models.list()
                assert len(models.data) == 2
        async with httpx.AsyncClient(base_url=url) as http:
            text = (await http.get("/metrics")).text
    labels = {"endpoint": "/v1/chat/completions", "mode": "passthrough", "status": "503"}
    assert metric(text, "qwenrun_requests_total", labels) == 2  # the JSON 503 and the in-stream one


async def test_keep_alive_pings_during_a_slow_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    import qwenrun.frontends.openai.app as server_app

    async def slow_weather(city: str) -> str:
        """Get the weather, slowly."""
        await asyncio.sleep(0.3)
        return f"{city}: sunny"

    monkeypatch.setattr(server_app, "PING_S", 0.05)
    call = tool_call_text("slow_weather", {"city": "深圳"})
    engine = ScriptedEngine(lambda request: ANSWER if request.messages[-1]["role"] == "tool" else call)
    app = create_app(Agent(make_spec(), engine, tools=[slow_weather]))
    with running(app) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            body = {"model": AGENT, "messages": [{"role": "user", "content": QUESTION}], "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = [line async for line in response.aiter_lines()]
        async with AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
            stream = await client.chat.completions.create(model=AGENT, messages=body["messages"], stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert any(line.startswith(": ping") for line in lines)  # SSE comments, which clients skip
    assert [line for line in lines if line.startswith("data:")][-1] == "data: [DONE]"
    assert text == ANSWER


# -- security -----------------------------------------------------------------------------------------


def test_api_key(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    key = "sk-test-0123456789abcdef"
    monkeypatch.setenv("QWENRUN_TEST_KEY", key)
    engine = ScriptedEngine(lambda request: "ok")
    _, app = build(engine, api_key_env="QWENRUN_TEST_KEY")
    caplog.set_level(logging.DEBUG)
    with running(app) as url:
        for wrong in ("sk-wrong", key[:-1], key + "0"):
            with OpenAI(base_url=f"{url}/v1", api_key=wrong, max_retries=0) as client:
                with pytest.raises(openai.AuthenticationError) as error:
                    client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "x"}])
                assert error.value.body["code"] == "invalid_api_key"  # type: ignore[index]
                with pytest.raises(openai.AuthenticationError):
                    client.models.list()
        with OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as client:
            out = client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "x"}])
            assert out.choices[0].message.content == "ok"
            assert len(client.models.list().data) == 2
        with httpx.Client(base_url=url) as http:
            missing = http.post("/v1/chat/completions", json={"model": SERVED, "messages": USER})
            assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
            assert missing.headers["www-authenticate"] == "Bearer"
            assert http.get("/health").status_code == 200  # open
            assert http.get("/metrics").status_code == 401
            assert http.get("/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            assert http.get("/v1/models", headers={"Authorization": f"Basic {key}"}).status_code == 401
    assert key not in caplog.text
    assert len(engine.calls) == 1


def test_api_key_env_named_but_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QWENRUN_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match="QWENRUN_UNSET_KEY is not set"):
        build(ScriptedEngine([]), api_key_env="QWENRUN_UNSET_KEY")


def test_agent_name_must_differ_from_the_model() -> None:
    spec = AgentSpec.from_dict(
        {"model": {"path": "m", "served_model_name": "same"}, "agent": {"name": "same"}}
    )
    with pytest.raises(ConfigError, match="must differ"):
        create_app(Agent(spec, ScriptedEngine([]), tools=[]))


@pytest.mark.parametrize(
    ("host", "key", "warned"),
    [("0.0.0.0", None, True), ("::", None, True), ("0.0.0.0", "k", False), ("127.0.0.1", None, False)],
)
def test_serve_warns_on_public_host_without_key(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    host: str,
    key: str | None,
    warned: bool,
) -> None:
    ran: dict[str, Any] = {}

    def run(server: uvicorn.Server, sockets: Any = None) -> None:
        ran.update(host=server.config.host, port=server.config.port)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    if key:
        monkeypatch.setenv("QWENRUN_TEST_KEY", key)
    agent = Agent(
        make_spec(host=host, port=8123, api_key_env="QWENRUN_TEST_KEY" if key else None),
        ScriptedEngine([]),
        tools=[],
    )
    with caplog.at_level(logging.WARNING, logger="qwenrun.frontends.openai"):
        serve(agent)
    assert ran["host"] == host and ran["port"] == 8123
    assert ("without an API key" in caplog.text) == warned


# -- bad requests ---------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]
BAD_SCHEMA = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "strin"}}}},
}


@pytest.mark.parametrize(
    ("body", "status", "error_type", "param"),
    [
        (b'{"model": "x", "messages": [', 400, "invalid_request_error", None),
        (b"\xff\xfe not utf-8", 400, "invalid_request_error", None),
        (b"[1, 2]", 400, "invalid_request_error", None),
        ({"model": "gpt-4", "messages": USER}, 404, "invalid_request_error", "model"),
        ({"model": SERVED}, 400, "invalid_request_error", "messages"),
        ({"model": SERVED, "messages": []}, 400, "invalid_request_error", "messages"),
        ({"messages": USER}, 400, "invalid_request_error", "model"),
        (
            {"model": SERVED, "messages": [{"role": "wizard", "content": "hi"}]},
            400,
            "invalid_request_error",
            "messages[0]",
        ),
        (
            {"model": SERVED, "messages": [{"role": "user"}]},
            400,
            "invalid_request_error",
            "messages[0].content",
        ),
        (
            {
                "model": SERVED,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            },
            400,
            "invalid_request_error",
            "messages[0].content",
        ),
        (
            {"model": SERVED, "messages": [*USER, {"role": "tool", "content": "x"}]},
            400,
            "invalid_request_error",
            "messages[1].tool_call_id",
        ),
        (
            {"model": SERVED, "messages": [*USER, {"role": "assistant"}]},
            400,
            "invalid_request_error",
            "messages[1]",
        ),
        ({"model": SERVED, "messages": USER, "n": 0}, 400, "invalid_request_error", "n"),
        (
            {"model": SERVED, "messages": USER, "n": 257},
            400,
            "invalid_request_error",
            "n",
        ),  # > engine.max_num_seqs
        ({"model": AGENT, "messages": USER, "n": 2}, 400, "invalid_request_error", "n"),
        ({"model": AGENT, "messages": USER, "logprobs": True}, 400, "invalid_request_error", "logprobs"),
        (
            {"model": SERVED, "messages": USER, "top_logprobs": 2},
            400,
            "invalid_request_error",
            "top_logprobs",
        ),
        (
            {"model": SERVED, "messages": USER, "logprobs": True, "top_logprobs": 21},
            400,
            "invalid_request_error",
            "top_logprobs",
        ),
        (
            {"model": AGENT, "messages": USER, "structured_outputs": {"regex": "a+"}},
            400,
            "invalid_request_error",
            "structured_outputs",
        ),
        (
            {"model": SERVED, "messages": USER, "response_format": {"type": "structural_tag"}},
            400,
            "invalid_request_error",
            "response_format.type",
        ),
        (
            {"model": SERVED, "messages": USER, "response_format": {"type": "json_schema"}},
            400,
            "invalid_request_error",
            "response_format",
        ),
        (
            {
                "model": SERVED,
                "messages": USER,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                },
            },
            400,
            "invalid_request_error",
            "response_format.json_schema.schema",
        ),
        (
            {
                "model": SERVED,
                "messages": USER,
                "tools": [WEATHER_TOOL],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            400,
            "invalid_request_error",
            "response_format",
        ),
        (b'"just a string"', 400, "invalid_request_error", None),
        ({"model": SERVED, "messages": USER, "temperature": 5}, 400, "invalid_request_error", "temperature"),
        ({"model": SERVED, "messages": USER, "max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
        (
            {"model": SERVED, "messages": USER, "tools": [BAD_SCHEMA]},
            400,
            "invalid_request_error",
            "tools[0].function.parameters",
        ),
        (
            {"model": SERVED, "messages": USER, "tools": [{"type": "function", "function": {"name": "a b"}}]},
            400,
            "invalid_request_error",
            "tools[0].function.name",
        ),
        (
            {"model": SERVED, "messages": USER, "tools": [WEATHER_TOOL, WEATHER_TOOL]},
            400,
            "invalid_request_error",
            "tools",
        ),
        (
            {"model": SERVED, "messages": USER, "tool_choice": "required"},
            400,
            "invalid_request_error",
            "tool_choice",
        ),
        (
            {
                "model": SERVED,
                "messages": USER,
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            400,
            "invalid_request_error",
            "tool_choice",
        ),
        ({"model": SERVED, "messages": "x" * 30_000}, 413, "invalid_request_error", None),
    ],
)
def test_bad_requests(srv: Harness, body: Any, status: int, error_type: str, param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=srv.url) as http:
        response = http.post(
            "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == error_type and error["param"] == param and error["message"]
        assert http.get("/health").status_code == 200  # still alive
    assert srv.engine.calls == []


def test_oversized_chunked_body_and_unknown_routes(srv: Harness) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the bytes read are counted
        for _ in range(30):
            yield b" " * 1000

    with httpx.Client(base_url=srv.url) as http:
        response = http.post(
            "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    with httpx.Client(base_url=srv.url) as http:
        missing = http.get("/v1/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        wrong_method = http.get("/v1/chat/completions")
        assert wrong_method.status_code == 405 and "error" in wrong_method.json()
        assert http.get("/docs").status_code == 404  # no unauthenticated API docs


def test_the_openai_client_sees_openai_errors(srv: Harness) -> None:
    with srv.sync_client() as client:
        with pytest.raises(openai.NotFoundError) as unknown:
            client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.BadRequestError) as two:
            client.chat.completions.create(model=AGENT, messages=[{"role": "user", "content": "x"}], n=2)
    assert unknown.value.code == "model_not_found"
    assert two.value.param == "n" and "pass-through mode only" in two.value.message


# -- concurrency and cancellation -----------------------------------------------------------------------


async def test_fifty_concurrent_streams_get_their_own_answers(srv: Harness) -> None:
    def answer(request: ModelRequest) -> str:
        question = request.messages[-1]["content"]
        return f"answer to {question}: " + "".join(reversed(question)) * 3

    srv.script = answer
    srv.engine.delay_s = 0.001  # interleave the streams

    async def ask(client: AsyncOpenAI, index: int) -> tuple[str, str]:
        question = f"question {index} {'x' * index}"
        stream = await client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": question}], stream=True
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
        return question, text

    async with srv.async_client() as client:
        results = await asyncio.gather(*(ask(client, index) for index in range(50)))
    for question, text in results:
        assert text == f"answer to {question}: " + "".join(reversed(question)) * 3
    assert len(srv.engine.calls) == 50 and srv.engine.active == 0


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.mark.parametrize("model", [SERVED, AGENT])
async def test_disconnect_mid_stream_cancels_generation(srv: Harness, model: str) -> None:
    srv.script = lambda request: "word " * 500
    srv.engine.delay_s = 0.01
    async with srv.async_client() as client:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "talk"}], stream=True
        )
        received = 0
        async for _ in stream:
            received += 1
            if received == 5:
                break
        assert srv.engine.active == 1
        await stream.close()
    assert await wait_until(lambda: srv.engine.active == 0), "the generation went on after the disconnect"
    assert len(srv.engine.calls) == 1
    mode = "agent" if model == AGENT else "passthrough"
    labels = {"endpoint": "/v1/chat/completions", "mode": mode, "status": "499"}
    assert await wait_until(
        lambda: metric(httpx.get(f"{srv.url}/metrics").text, "qwenrun_requests_total", labels) >= 1
    )


async def test_disconnect_cancels_a_non_streaming_request(srv: Harness) -> None:
    srv.script = lambda request: "word " * 500
    srv.engine.delay_s = 0.01
    async with httpx.AsyncClient(base_url=srv.url, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                "/v1/chat/completions", json={"model": SERVED, "messages": [{"role": "user", "content": "x"}]}
            )
    assert await wait_until(lambda: srv.engine.active == 0)
    assert len(srv.engine.calls) == 1


def test_import_does_not_load_vllm() -> None:
    import subprocess
    import sys

    code = "import sys, qwenrun.frontends.openai; sys.exit('vllm' in sys.modules or 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, env={**os.environ}).returncode == 0


def test_a_tool_schema_is_checked_once_and_a_bad_one_refused_every_time() -> None:
    """The verdict on a tool's parameters schema is kept by its canonical JSON (a conversation
    sends the same tools with every request), and a bad schema is refused on every request."""
    from qwenrun.frontends.openai import schemas

    schemas._schema_problem.cache_clear()
    good = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    bad = {"type": "object", "properties": {"x": {"type": "strin"}}}
    for _ in range(3):
        assert schemas.FunctionDefinition(name="f", parameters=dict(reversed(good.items()))).parameters
        with pytest.raises(ValueError, match=r"not a valid JSON Schema at properties\.x\.type"):
            schemas.FunctionDefinition(name="f", parameters=bad)
    info = schemas._schema_problem.cache_info()
    assert (info.misses, info.hits) == (2, 4)

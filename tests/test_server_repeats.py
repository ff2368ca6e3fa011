"""Pass-through mode where the client runs the tool loop: a call that the request's messages already
hold with its result, written again, stops the generation and the answer comes with the tools off
(``frontend.answer_repeated_calls``), through the official client and the OpenAI Agents SDK, for
Chat Completions and Responses alike (scripted engine; the real 0.5B model: ``test_real_model.py``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from test_server import ANSWER, QUESTION, SERVED, WEATHER_TOOL, Harness, build, completion_tokens, running

from agents import Agent as SdkAgent
from agents import OpenAIChatCompletionsModel, OpenAIResponsesModel, RunConfig, Runner, function_tool
from qwenrun.agent.model_call import ANSWER_NOTE
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text

ARGUMENTS = {"city": "深圳"}
BARE = json.dumps({"name": "get_current_weather", "arguments": ARGUMENTS}, ensure_ascii=False)
LOOPING = f"{BARE}\n{BARE}\n{BARE}\n" + '{"city": "深圳"}\n' * 6  # the call again, then stray JSON lines
RESULT = "目前深圳多云到晴，气温28~31℃，吹轻微的偏北风。"
ANSWERED: Any = [
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
     "function": {"name": "get_current_weather", "arguments": json.dumps(ARGUMENTS, ensure_ascii=False)}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
]  # fmt: skip
NO_TRACES = RunConfig(tracing_disabled=True)


def looping(request: ModelRequest) -> str:
    """A small model's habit: the call, then with its result the call again; with the tools off, the answer."""
    if request.tools is None:
        return ANSWER
    return BARE if request.messages[-1]["role"] == "user" else LOOPING


@contextmanager
def serve(script: Callable[[ModelRequest], str] = looping, **frontend: Any) -> Iterator[Harness]:
    engine = ScriptedEngine(script)
    agent, app = build(engine, **frontend)
    with running(app) as url:
        yield Harness(url, engine, agent, [])


@pytest.fixture
def srv() -> Iterator[Harness]:
    with serve() as harness:
        yield harness


@pytest.mark.parametrize("stream", [False, True])
def test_a_repeated_call_is_answered_with_the_tools_off(srv: Harness, stream: bool) -> None:
    with srv.sync_client() as client:
        if stream:
            chunks = list(client.chat.completions.create(model=SERVED, messages=ANSWERED, tools=[WEATHER_TOOL],
                                                         stream=True, stream_options={"include_usage": True}))  # fmt: skip
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            usage = chunks[-1].usage
        else:
            out = client.chat.completions.create(model=SERVED, messages=ANSWERED, tools=[WEATHER_TOOL])
            content, calls = out.choices[0].message.content or "", out.choices[0].message.tool_calls or []
            finish, usage = [out.choices[0].finish_reason], out.usage
    assert (content, calls, finish) == (ANSWER, [], ["stop"])
    first, second = srv.engine.calls
    assert first.tools == [WEATHER_TOOL] and [m["role"] for m in first.messages] == [
        "user",
        "assistant",
        "tool",
    ]
    assert second.tools is None and second.tool_choice == "none"
    assert second.messages == [*first.messages, {"role": "system", "content": ANSWER_NOTE}]
    # the repeat was read to its closing brace, no further: the generation stopped there
    assert usage is not None and usage.completion_tokens == completion_tokens(BARE) + completion_tokens(
        ANSWER
    )


def test_answer_repeated_calls_false_returns_what_the_model_wrote() -> None:
    with serve(answer_repeated_calls=False) as srv, srv.sync_client() as client:
        out = client.chat.completions.create(model=SERVED, messages=ANSWERED, tools=[WEATHER_TOOL])
        assert out.choices[0].message.content == LOOPING.strip()  # the stray lines make it text
        assert len(srv.engine.calls) == 1


def test_only_calls_of_this_turn_count_and_only_with_tool_choice_auto() -> None:
    later: Any = [*ANSWERED, {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "现在呢?"}]
    unanswered: Any = [*ANSWERED[:2], {"role": "user", "content": "?"}]
    with serve(lambda request: BARE if request.tools else ANSWER) as srv, srv.sync_client() as client:
        for messages, choice in ((later, "auto"), (unanswered, "auto"), (ANSWERED, "required")):
            out = client.chat.completions.create(model=SERVED, messages=messages, tools=[WEATHER_TOOL],
                                                 tool_choice=choice)  # fmt: skip
            (call,) = out.choices[0].message.tool_calls or []
            assert json.loads(call.function.arguments) == ARGUMENTS, (messages, choice)
        assert all(request.tools is not None for request in srv.engine.calls)


@pytest.mark.parametrize("stream", [False, True])
def test_a_new_call_before_the_repeat_is_returned(stream: bool) -> None:
    other = tool_call_text("get_current_weather", {"city": "广州"})
    reply = other + tool_call_text("get_current_weather", ARGUMENTS) * 5
    with serve(lambda request: reply) as srv, srv.sync_client() as client:
        if stream:
            chunks = list(client.chat.completions.create(model=SERVED, messages=ANSWERED, tools=[WEATHER_TOOL],
                                                         stream=True))  # fmt: skip
            calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
            arguments = [
                json.loads(t.function.arguments) for t in calls if t.function and t.function.arguments
            ]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        else:
            out = client.chat.completions.create(model=SERVED, messages=ANSWERED, tools=[WEATHER_TOOL])
            arguments = [json.loads(t.function.arguments) for t in out.choices[0].message.tool_calls or []]
            finish = [out.choices[0].finish_reason]
        assert (arguments, finish) == ([{"city": "广州"}], ["tool_calls"])
        assert len(srv.engine.calls) == 1  # no answer asked for: the client runs the new call first


def test_the_responses_api_answers_a_repeat_too(srv: Harness) -> None:
    items: Any = [
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": "call_1", "name": "get_current_weather",
         "arguments": json.dumps(ARGUMENTS, ensure_ascii=False)},
        {"type": "function_call_output", "call_id": "call_1", "output": RESULT},
    ]  # fmt: skip
    tool: Any = {
        "type": "function",
        "name": "get_current_weather",
        "parameters": WEATHER_TOOL["function"]["parameters"],
    }
    with srv.sync_client() as client:
        response = client.responses.create(model=SERVED, input=items, tools=[tool], store=False)
    assert response.output_text == ANSWER and [item.type for item in response.output] == ["message"]
    assert srv.engine.calls[-1].tools is None


@function_tool
def get_current_weather(city: str) -> str:
    """Get the current weather of a city.

    Args:
        city: The city, e.g. 深圳.
    """
    return f"目前{city}多云到晴，气温28~31℃，吹轻微的偏北风。"


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("streamed", [False, True])
async def test_the_agents_sdk_gets_prose_not_the_call_again(srv: Harness, api: str, streamed: bool) -> None:
    async with srv.async_client() as client:
        model: Any = (OpenAIChatCompletionsModel if api == "chat" else OpenAIResponsesModel)(SERVED, client)
        sdk = SdkAgent(name="weather", tools=[get_current_weather], model=model)
        if streamed:
            run = Runner.run_streamed(sdk, QUESTION, run_config=NO_TRACES)
            _ = [event async for event in run.stream_events()]
            final = run.final_output
        else:
            final = (await Runner.run(sdk, QUESTION, run_config=NO_TRACES)).final_output
    assert final == ANSWER
    tools_on = [request.tools is not None for request in srv.engine.calls]
    assert tools_on == [True, True, False]  # the call, its repeat (stopped), the answer with the tools off
    last = srv.engine.calls[1].messages[-1]
    assert (last["role"], last["content"]) == ("tool", RESULT)  # the SDK ran its tool and sent the result

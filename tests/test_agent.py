"""The agent loop on the scripted engine: tool rounds, parallel calls, errors, limits, repair."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from qwenrun.agent import Agent
from qwenrun.agent.loop import ANSWER_NOTE
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.events import Event, Final, Reasoning, Repair, TextDelta, ToolCall, ToolResult, Usage
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.toolcalls.hermes import FORCED_PREFILL, forced_call
from qwenrun.tools import Tool

SEED_SENTENCE = "目前{city}多云到晴，气温28~31℃，吹轻微的偏北风。"


def get_current_weather(city: str) -> str:
    """Get the current weather of a city.

    Args:
        city: The city, e.g. 广州.
    """
    return SEED_SENTENCE.format(city=city)


async def slow(seconds: float) -> str:
    """Sleep, then answer."""
    await asyncio.sleep(seconds)
    return "slept"


def boom() -> str:
    """Always fails."""
    raise ValueError("the tool broke")


def make_agent(script: Any, **agent_settings: Any) -> tuple[Agent, ScriptedEngine]:
    spec = AgentSpec.from_dict({"model": {"path": "scripted"}, "agent": {"timeout_s": 0.5, **agent_settings}})
    engine = ScriptedEngine(script)
    return Agent(spec, engine, tools=[get_current_weather, slow, boom]), engine


async def collect(agent: Agent, prompt: str, **kwargs: Any) -> list[Event]:
    return [event async for event in agent.session().stream(prompt, **kwargs)]


async def test_the_seed_weather_flow() -> None:
    agent, engine = make_agent(
        [tool_call_text("get_current_weather", {"city": "广州"}), "广州今天多云到晴，28~31℃。"]
    )
    events = await collect(agent, "广州天气情况如何?")
    calls = [e for e in events if isinstance(e, ToolCall)]
    results = [e for e in events if isinstance(e, ToolResult)]
    final = events[-1]
    assert [(c.name, c.arguments) for c in calls] == [("get_current_weather", {"city": "广州"})]
    assert [(r.id, r.content, r.is_error) for r in results] == [
        (calls[0].id, "目前广州多云到晴，气温28~31℃，吹轻微的偏北风。", False)
    ]
    assert isinstance(final, Final)
    assert final.text == "广州今天多云到晴，28~31℃。"
    assert (final.stop_reason, final.iterations, final.tool_calls, final.usage.model_calls) == (
        "answer",
        2,
        1,
        2,
    )
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == final.text
    assert len([e for e in events if isinstance(e, Usage)]) == 2
    # the second model call saw the assistant's call and the tool result, OpenAI style
    second = engine.calls[1].messages
    assert second[0]["role"] == "system"
    assert second[1] == {"role": "user", "content": "广州天气情况如何?"}
    assert second[2]["tool_calls"][0]["function"] == {
        "name": "get_current_weather",
        "arguments": json.dumps({"city": "广州"}, ensure_ascii=False),
    }
    assert second[3] == {
        "role": "tool",
        "tool_call_id": calls[0].id,
        "name": "get_current_weather",
        "content": results[0].content,
    }
    assert engine.calls[0].tools is not None
    assert [t["function"]["name"] for t in engine.calls[0].tools] == ["get_current_weather", "slow", "boom"]


async def test_parallel_calls_run_concurrently() -> None:
    both = tool_call_text("slow", {"seconds": 0.3}) + tool_call_text("slow", {"seconds": 0.3})
    agent, _ = make_agent([both, "done"])
    started = time.perf_counter()
    events = await collect(agent, "go")
    elapsed = time.perf_counter() - started
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [r.content for r in results] == ["slept", "slept"]
    assert len({r.id for r in results}) == 2
    assert elapsed < 0.55, f"two 0.3 s tools took {elapsed:.2f} s: not parallel"


async def test_parallel_tool_calls_off_runs_only_the_first() -> None:
    both = tool_call_text("get_current_weather", {"city": "A"}) + tool_call_text(
        "get_current_weather", {"city": "B"}
    )
    agent, _ = make_agent([both, "done"], parallel_tool_calls=False)
    events = await collect(agent, "go")
    assert [e.arguments for e in events if isinstance(e, ToolCall)] == [{"city": "A"}]


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (tool_call_text("slow", {"seconds": 5}), "Error: slow timed out after 0.5 s"),
        (tool_call_text("boom", {}), "Error: ValueError: the tool broke"),
        (
            tool_call_text("nope", {}),
            "Error: unknown tool 'nope'; available: get_current_weather, slow, boom",
        ),
        (
            tool_call_text("get_current_weather", {"town": "x"}),
            "Error: invalid arguments for get_current_weather: city: Field required; town: Extra inputs are not "
            "permitted",
        ),
    ],
)
async def test_tool_failures_become_error_results(call: str, expected: str) -> None:
    agent, engine = make_agent([call, "sorry"])
    events = await collect(agent, "go")
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [(r.content, r.is_error) for r in results] == [(expected, True)]
    assert engine.calls[1].messages[-1]["content"] == expected
    assert isinstance(events[-1], Final) and events[-1].text == "sorry"


async def test_max_iterations_stops_a_loop() -> None:
    agent, engine = make_agent(  # a new city every time: not a repeated call
        lambda request: tool_call_text("get_current_weather", {"city": f"x{len(request.messages)}"}),
        max_iterations=3,
    )
    events = await collect(agent, "loop forever")
    final = events[-1]
    assert isinstance(final, Final)
    assert (final.stop_reason, final.iterations, final.tool_calls) == ("max_iterations", 3, 3)
    assert len(engine.calls) == 3


async def test_malformed_call_is_repaired_with_a_forced_call() -> None:
    def script(request: ModelRequest) -> str:
        if request.constraint is None and len(request.messages) == 2:
            return '<tool_call>\n{"name": "get_current_weather", "arguments": {"city": 广州}\n</tool_call>'
        if request.constraint is not None:
            return FORCED_PREFILL + '{"name": "get_current_weather", "arguments": {"city": "广州"}}'
        return "ok"

    agent, engine = make_agent(script)
    events = await collect(agent, "广州天气情况如何?")
    repairs = [e for e in events if isinstance(e, Repair)]
    assert len(repairs) == 1 and "retrying with a forced get_current_weather call" in repairs[0].reason
    assert [e.arguments for e in events if isinstance(e, ToolCall)] == [{"city": "广州"}]
    assert (engine.calls[1].tool_choice, engine.calls[1].prefill) == ("get_current_weather", FORCED_PREFILL)
    assert engine.calls[1].constraint is not None
    assert engine.calls[1].constraint.json == {
        "type": "object",
        "properties": {
            "name": {"enum": ["get_current_weather"]},
            "arguments": agent.tools["get_current_weather"].parameters,
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


async def test_tool_choice_required_forces_only_the_first_call() -> None:
    def script(request: ModelRequest) -> str:
        if request.constraint is not None:
            return '{"name": "get_current_weather", "arguments": {"city": "广州"}}'
        return "answer"

    agent, engine = make_agent(script)
    events = await collect(agent, "q", tool_choice="required")
    assert isinstance(events[-1], Final) and events[-1].text == "answer"
    constraint = engine.calls[0].constraint
    assert constraint is not None and constraint.json is not None
    assert [o["properties"]["name"]["enum"] for o in constraint.json["anyOf"]] == [
        ["get_current_weather"],
        ["slow"],
        ["boom"],
    ]
    assert engine.calls[1].constraint is None


async def test_tool_choice_none_sends_no_tools() -> None:
    agent, engine = make_agent(["just text"], tool_choice="none")
    events = await collect(agent, "q")
    assert engine.calls[0].tools is None and engine.calls[0].constraint is None
    assert isinstance(events[-1], Final) and events[-1].text == "just text"


async def test_named_tool_choice() -> None:
    tools = [
        Tool.from_function(get_current_weather).openai_schema(),
        Tool.from_function(slow).openai_schema(),
    ]
    schema, prefill = forced_call(tools, "slow")
    assert prefill == FORCED_PREFILL
    assert schema is not None and schema["properties"]["name"] == {"enum": ["slow"]}
    assert forced_call(tools, "auto") == (None, "")
    assert forced_call(tools, "no_such_tool") == (None, "")


async def test_tool_schemas_stay_the_same_object_until_the_tools_change() -> None:
    agent, engine = make_agent([tool_call_text("slow", {"seconds": 0}), "done"])
    first = agent.tool_schemas()
    assert agent.tool_schemas() is first  # an engine may cache what it derives from them
    assert (await agent.session().ask("q", tool_choice="required")).text == "done"
    assert engine.calls[0].tool_choice == "required"
    del agent.tools["slow"]
    second = agent.tool_schemas()
    assert second is not first and [t["function"]["name"] for t in second] == ["get_current_weather", "boom"]


async def test_ask_gives_the_final_event_of_stream() -> None:
    """``ask`` skips the text deltas but must end exactly like ``stream``."""
    replies = [tool_call_text("get_current_weather", {"city": "广州"}, "先查一下。"), "广州今天多云到晴。<"]
    streamed_agent, _ = make_agent(list(replies))
    asked_agent, asked_engine = make_agent(list(replies))
    streamed = await collect(streamed_agent, "广州天气情况如何?")
    asked = await asked_agent.ask("广州天气情况如何?")
    assert any(isinstance(event, TextDelta) for event in streamed)
    final = streamed[-1]
    assert isinstance(final, Final)
    assert (
        asked.text,
        asked.stop_reason,
        asked.iterations,
        asked.tool_calls,
        asked.usage.completion_tokens,
    ) == (final.text, final.stop_reason, final.iterations, final.tool_calls, final.usage.completion_tokens)
    assert asked.text == "广州今天多云到晴。<" and asked.tool_calls == 1
    assert asked_engine.calls[1].messages[2]["content"] == "先查一下。"  # the text before the call is kept


async def test_history_is_kept_across_turns_and_reset() -> None:
    agent, engine = make_agent(["first", "second"])
    session = agent.session()
    assert (await session.ask("one")).text == "first"
    assert (await session.ask("two")).text == "second"
    assert [m["role"] for m in engine.calls[1].messages] == ["system", "user", "assistant", "user"]
    session.reset()
    assert session.messages == []


async def test_cancelling_a_turn_keeps_the_session() -> None:
    spec = AgentSpec.from_dict({"model": {"path": "scripted"}})
    engine = ScriptedEngine(["a long answer " * 20, "next"], chunk_size=2, delay_s=0.01)
    agent = Agent(spec, engine, tools=[])
    session = agent.session()
    seen: list[str] = []

    async def consume() -> None:
        async for event in session.stream("talk"):
            if isinstance(event, TextDelta):
                seen.append(event.text)

    task = asyncio.ensure_future(consume())
    while len(seen) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.active == 0
    assert session.messages[-1] == {"role": "assistant", "content": "".join(seen)}
    assert (await session.ask("again")).text == "next"


async def test_many_sessions_share_one_agent() -> None:
    agent, _ = make_agent(lambda r: f"echo {r.messages[-1]['content']}")
    finals = await asyncio.gather(*(agent.session().ask(f"q{i}") for i in range(50)))
    assert [f.text for f in finals] == [f"echo q{i}" for i in range(50)]


# -- bare JSON calls and repeated calls ----------------------------------------------------------------

BARE = '```json\n{"name": "get_current_weather", "arguments": {"city": "广州"}}\n```'


async def test_bare_json_call_runs_the_tool() -> None:
    agent, engine = make_agent([BARE, "广州多云到晴。"])
    events = await collect(agent, "广州天气情况如何?")
    (call,) = [e for e in events if isinstance(e, ToolCall)]
    assert (call.name, call.arguments) == ("get_current_weather", {"city": "广州"})
    (result,) = [e for e in events if isinstance(e, ToolResult)]
    assert result.content == SEED_SENTENCE.format(city="广州")
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["广州多", "云到晴", "。"]  # streamed
    assert isinstance(events[-1], Final) and events[-1].text == "广州多云到晴。"
    assert engine.calls[1].messages[2]["tool_calls"][0]["function"]["name"] == "get_current_weather"


async def test_bare_json_reading_can_be_switched_off() -> None:
    agent, engine = make_agent([BARE], lenient_tool_calls=False)
    events = await collect(agent, "广州天气情况如何?")
    assert not [e for e in events if isinstance(e, ToolCall)]
    assert isinstance(events[-1], Final) and events[-1].text == BARE
    assert len(engine.calls) == 1


async def test_bare_json_naming_an_undeclared_tool_is_an_answer() -> None:
    text = '{"name": "format_disk", "arguments": {}}'
    agent, _ = make_agent([text])
    final = await agent.ask("hi")
    assert (final.text, final.tool_calls) == (text, 0)


async def test_a_repeated_call_is_not_run_again_and_the_answer_comes_with_tools_off() -> None:
    agent, engine = make_agent([BARE, BARE, "广州多云到晴。"])
    events = await collect(agent, "广州天气情况如何?")
    assert len([e for e in events if isinstance(e, ToolResult)]) == 1  # run once
    final = events[-1]
    assert isinstance(final, Final) and final.text == "广州多云到晴。"
    assert (final.iterations, final.tool_calls, final.usage.model_calls) == (3, 1, 3)
    assert [call.tools is not None for call in engine.calls] == [True, True, False]  # tools off
    # the repeat was not recorded; a transient note asks for the answer
    assert engine.calls[2].messages == [*engine.calls[1].messages, {"role": "system", "content": ANSWER_NOTE}]
    assert [m["role"] for m in engine.calls[1].messages] == ["system", "user", "assistant", "tool"]
    assert [m["role"] for m in agent.session().messages] == []
    final_history = [m["role"] for m in engine.calls[2].messages[:-1]]
    assert final_history == ["system", "user", "assistant", "tool"]


async def test_only_the_new_calls_of_a_partly_repeated_answer_run() -> None:
    again = tool_call_text("get_current_weather", {"city": "广州"}) + tool_call_text(
        "get_current_weather", {"city": "深圳"}
    )
    agent, engine = make_agent([BARE, again, "两地都多云。"])
    events = await collect(agent, "广州和深圳天气?")
    cities = [e.arguments["city"] for e in events if isinstance(e, ToolCall)]
    assert cities == ["广州", "深圳"]
    assert len(engine.calls[2].messages[-2]["tool_calls"]) == 1  # the repeat is left out


# -- thinking and the Qwen3-Coder format -----------------------------------------------------------


async def test_reasoning_streams_apart_and_stays_on_the_assistant_messages() -> None:
    agent, engine = make_agent(
        ["<think>\nI need the weather.\n</think>\n\n" + tool_call_text("get_current_weather", {"city": "广州"}),
         "<think>\nThe tool said it.\n</think>\n\n多云。"]
    )  # fmt: skip
    session = agent.session()
    events = [event async for event in session.stream("广州天气?")]
    thoughts = "".join(event.text for event in events if isinstance(event, Reasoning))
    assert thoughts == "I need the weather.The tool said it."
    assert [e.name for e in events if isinstance(e, ToolCall)] == ["get_current_weather"]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "多云。"
    assert session.messages[1]["reasoning_content"] == "I need the weather."
    assert session.messages[-1] == {
        "role": "assistant",
        "content": "多云。",
        "reasoning_content": "The tool said it.",
    }
    assert engine.calls[1].messages[2]["reasoning_content"] == "I need the weather."  # the template decides


async def test_a_call_inside_the_think_block_is_not_run() -> None:
    thought = "<think>\n" + tool_call_text("boom", {}) + "\n</think>\n\nNo tool needed."
    agent, _ = make_agent([thought])
    events = await collect(agent, "q")
    assert not [e for e in events if isinstance(e, ToolCall | ToolResult)]
    assert isinstance(events[-1], Final) and events[-1].text == "No tool needed."


async def test_qwen3_coder_calls_are_typed_and_forced_by_a_structural_tag() -> None:
    spec = AgentSpec.from_dict(
        {"model": {"path": "scripted"}, "agent": {"tool_choice": "required"}, "tools": ["slow"]}
    )
    xml = tool_call_text("slow", {"seconds": 0.01}, format="qwen3_coder")
    engine = ScriptedEngine([xml.removeprefix(FORCED_PREFILL), "done"], tool_call_format="qwen3_coder")
    agent = Agent(spec, engine, tools=[slow])
    events = [event async for event in agent.session().stream("nap")]
    assert [(e.name, e.arguments) for e in events if isinstance(e, ToolCall)] == [("slow", {"seconds": 0.01})]
    assert [e.content for e in events if isinstance(e, ToolResult)] == ["slept"]
    forced = engine.calls[0]
    assert forced.prefill == FORCED_PREFILL and forced.constraint is not None
    assert forced.constraint.json is None and forced.constraint.structural_tag is not None
    assert forced.constraint.structural_tag["format"]["begin"] == "<function=slow>\n"


async def test_thinking_switch_budget_and_per_turn_template_variables() -> None:
    agent, engine = make_agent(["a", "b"], enable_thinking=True, thinking_budget=256)
    await collect(agent, "q")
    await collect(agent, "q", chat_template_kwargs={"enable_thinking": False}, overrides={"max_tokens": 8})
    assert [call.chat_template_kwargs for call in engine.calls] == [
        {"enable_thinking": True},
        {"enable_thinking": False},
    ]
    assert [call.overrides for call in engine.calls] == [
        {"thinking_token_budget": 256}, {"thinking_token_budget": 256, "max_tokens": 8},
    ]  # fmt: skip
    plain, engine = make_agent(["a"])
    await collect(plain, "q")
    assert (engine.calls[0].chat_template_kwargs, engine.calls[0].overrides) == ({}, {})


async def test_a_consumer_that_stops_listening_ends_the_model_call_at_once() -> None:
    """Closing a turn's stream (a front end whose client went away or cancelled) closes the model
    call right then, not when the garbage collector finds it: the engine's request has ended when
    ``aclose()`` returns, and the partial answer is recorded before the turn's ``cancelled``."""
    from qwenrun.sessions.sqlite import SQLiteStore

    store = SQLiteStore(":memory:")
    spec = AgentSpec.from_dict({"model": {"path": "scripted"}})
    engine = ScriptedEngine(["word " * 200])
    session = Agent(spec, engine, tools=[], store=store).session("listener")
    stream = session.stream("talk")
    async for event in stream:
        if isinstance(event, TextDelta):
            break
    assert engine.active == 1
    await stream.aclose()
    assert engine.active == 0
    store.flush()
    stored = store.get("listener")
    assert stored is not None
    shown = [(record.kind, record.data.get("role") or record.data["type"], record.meta.get("interrupted"))
             for record in stored.records]  # fmt: skip
    assert shown == [("message", "user", None), ("message", "assistant", True), ("event", "cancelled", None)]
    store.close()

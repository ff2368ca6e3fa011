"""The agent loop on the scripted engine: tool rounds, parallel calls, errors, limits, repair."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from weather import get_current_weather, weather_of

from qwenrun.agent import Agent
from qwenrun.agent.model_call import ANSWER_NOTE
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.events import (
    Event,
    Final,
    Notice,
    Reasoning,
    Repair,
    TextDelta,
    ToolCall,
    ToolResult,
    Usage,
    to_dict,
)
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.toolcalls.hermes import FORCED_PREFILL, forced_call
from qwenrun.tools import Tool


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
    """Both calls have started before either ends: each one waits until the other has started
    (run one after the other, the first would wait out its time limit and fail)."""
    log: list[tuple[str, str]] = []
    both_started = asyncio.Event()

    async def meet(name: str) -> str:
        """Start, wait for the other call to start, end.

        Args:
            name: Which call this is.
        """
        log.append(("start", name))
        if len([event for event in log if event[0] == "start"]) == 2:
            both_started.set()
        await both_started.wait()
        log.append(("end", name))
        return f"met {name}"

    script = [tool_call_text("meet", {"name": "a"}) + tool_call_text("meet", {"name": "b"}), "done"]
    spec = AgentSpec.from_dict({"model": {"path": "scripted"}, "agent": {"timeout_s": 10}})
    events = await collect(Agent(spec, ScriptedEngine(script), tools=[meet]), "go")
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [(r.content, r.is_error) for r in results] == [("met a", False), ("met b", False)]
    assert len({r.id for r in results}) == 2
    assert [kind for kind, _ in log] == ["start", "start", "end", "end"], log


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
            tool_call_text("get_current_weather", {"town": "x"}),  # `town` is dropped (not in the schema)
            "Error: invalid arguments for get_current_weather: city: Field required",
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


async def test_tool_choice_rules_choose_each_turns_first_call() -> None:
    """agent.tool_choice_rules: a weather question starts with a forced call (then auto, for the
    answer), a thank-you gets no tools, anything else agent.tool_choice; a caller's tool_choice wins."""

    def script(request: ModelRequest) -> str:
        if request.constraint is not None:
            return '{"name": "get_current_weather", "arguments": {"city": "广州"}}'
        return "不客气" if request.tools is None else "answer"

    spec = AgentSpec.from_dict({
        "model": {"path": "scripted"}, "tools": ["get_current_weather"],
        "agent": {"tool_choice": "auto", "tool_choice_rules": [
            {"when": "天气|weather", "tool_choice": "get_current_weather"},
            {"when": "^\\W*(谢谢|thanks)\\W*$", "tool_choice": "none"},
        ]},
    })  # fmt: skip
    engine = ScriptedEngine(script)
    session = Agent(spec, engine, tools=[get_current_weather, slow]).session()
    finals = []
    for asked in ("广州天气情况如何？", "谢谢！", "写一首诗"):
        finals.append((await session.ask(asked)).text)
    assert finals == ["answer", "不客气", "answer"]
    assert [(call.tool_choice, call.tools is not None, call.constraint is not None) for call in engine.calls] == [
        ("get_current_weather", True, True),  # the forced call ...
        ("auto", True, False),  # ... then the answer from its result
        ("none", False, False),
        ("auto", True, False),
    ]
    tool = [m for m in session.messages if m["role"] == "tool"]
    assert [m["content"] for m in tool] == [weather_of("广州")]
    await session.ask("Weather in Paris?", tool_choice="none")  # the request's choice wins over a rule
    assert engine.calls[-1].tool_choice == "none"


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
    assert result.content == weather_of("广州")
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
    again = tool_call_text("get_current_weather", {"city": "深圳"}) + tool_call_text(
        "get_current_weather", {"city": "广州"}
    )
    agent, engine = make_agent([BARE, again, "两地都多云。"])
    events = await collect(agent, "广州和深圳天气?")
    cities = [e.arguments["city"] for e in events if isinstance(e, ToolCall)]
    assert cities == ["广州", "深圳"]
    assert len(engine.calls[2].messages[-2]["tool_calls"]) == 1  # the repeat is left out


async def test_a_new_call_after_a_repeat_is_read_only_without_the_early_stop() -> None:
    """The model call stops at the first complete repeat: a call written after it is never read,
    and the model is asked for its answer; with ``stop_repeated_calls: false`` it runs."""
    again = tool_call_text("get_current_weather", {"city": "广州"}) + tool_call_text(
        "get_current_weather", {"city": "深圳"}
    )
    for stop, cities in ((True, ["广州"]), (False, ["广州", "深圳"])):
        agent, engine = make_agent([BARE, again, "两地都多云。"], stop_repeated_calls=stop)
        events = await collect(agent, "广州和深圳天气?")
        assert [e.arguments["city"] for e in events if isinstance(e, ToolCall)] == cities, stop
        assert [call.tools is not None for call in engine.calls] == [True, True, not stop]


# -- arguments the schema does not declare; repeats stopped as they stream ------------------------------

ECHOED = {"city": "深圳", "required": ["city"]}  # what Qwen2.5-Coder-0.5B wrote: the schema's `required`


async def test_undeclared_arguments_are_dropped_with_a_notice(tmp_path: Any) -> None:
    from qwenrun.sessions.sqlite import SQLiteStore

    spec = AgentSpec.from_dict({"model": {"path": "scripted"}})
    engine = ScriptedEngine([tool_call_text("get_current_weather", ECHOED), "深圳多云到晴。"])
    store = SQLiteStore(tmp_path / "sessions.db")
    session = Agent(spec, engine, tools=[get_current_weather], store=store).session()
    events = [event async for event in session.stream("那深圳呢？明天适合出门吗?")]
    notice, call, result = (e for e in events if isinstance(e, Notice | ToolCall | ToolResult))
    assert isinstance(notice, Notice) and isinstance(call, ToolCall) and isinstance(result, ToolResult)
    assert (notice.code, notice.id, notice.name, notice.data) == (
        "extra_arguments", call.id, "get_current_weather", {"dropped": {"required": ["city"]}}
    )  # fmt: skip
    assert notice.message.startswith('get_current_weather: dropped required=["city"]: not in the tool')
    assert call.arguments == {"city": "深圳"}  # the call as it ran, and as the history keeps it
    assert (result.content, result.is_error) == (weather_of("深圳"), False)
    assert engine.calls[1].messages[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "深圳"}'
    store.flush()
    stored = store.get(session.id)
    assert stored is not None
    recorded = [r.data for r in stored.records if r.kind == "event" and r.data.get("type") == "notice"]
    assert recorded == [to_dict(notice)]


async def test_extra_arguments_reject_leaves_them_to_the_tool() -> None:
    agent, _ = make_agent([tool_call_text("get_current_weather", ECHOED), "Sorry."], extra_arguments="reject")
    events = await collect(agent, "那深圳呢?")
    assert not [e for e in events if isinstance(e, Notice)]
    (result,) = [e for e in events if isinstance(e, ToolResult)]
    assert result.is_error and result.content.endswith("required: Extra inputs are not permitted")


async def test_a_tool_that_accepts_any_key_gets_the_extra_arguments() -> None:
    def tag(city: str, **extra: int) -> str:
        """Echo the city and the other keys."""
        return json.dumps({"city": city, **extra}, ensure_ascii=False)

    async def lookup(arguments: dict[str, Any]) -> str:
        return json.dumps(arguments, ensure_ascii=False)

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "additionalProperties": True}
    tools = [Tool.from_function(tag), Tool.from_schema("lookup", "Look it up.", schema, lookup)]
    calls = tool_call_text("tag", {"city": "深圳", "days": 2}) + tool_call_text(
        "lookup", {"city": "深圳", "x": 1}
    )
    spec = AgentSpec.from_dict({"model": {"path": "scripted"}})
    events = await collect(Agent(spec, ScriptedEngine([calls, "ok"]), tools=tools), "go")
    assert not [e for e in events if isinstance(e, Notice)]
    contents = [json.loads(e.content) for e in events if isinstance(e, ToolResult)]
    assert contents == [{"city": "深圳", "days": 2}, {"city": "深圳", "x": 1}]


def chunks(characters: int, size: int = 3) -> int:
    """How many chunks of ``size`` the scripted engine sends for that many characters (its "tokens")."""
    return -(-characters // size)


BARE_LINE = (
    '{"name": "get_current_weather", "arguments": {"city": "广州"}}\n'  # as the real 0.5B model writes
)


REPEAT_FORMS = {
    "bare": ("hermes", BARE_LINE),
    "hermes": ("hermes", tool_call_text("get_current_weather", {"city": "广州"})),
    "qwen3_coder": (
        "qwen3_coder",
        tool_call_text("get_current_weather", {"city": "广州"}, format="qwen3_coder"),
    ),
}


@pytest.mark.parametrize("form", REPEAT_FORMS, ids=REPEAT_FORMS.keys())
async def test_a_repeated_call_stops_the_model_call_as_soon_as_it_is_complete(form: str) -> None:
    fmt, call = REPEAT_FORMS[form]
    looping = call * 8  # what the model writes after the tool's result until max_tokens
    spec = AgentSpec.from_dict({"model": {"path": "scripted"}})
    engine = ScriptedEngine([call, looping, "广州多云到晴。"], tool_call_format=fmt)
    events = await collect(Agent(spec, engine, tools=[get_current_weather]), "广州天气情况如何?")
    first, second, third = (e for e in events if isinstance(e, Usage))
    assert first.completion_tokens == chunks(len(call))  # the engine's tokens: its chunks
    # the second call is read up to the repeat's end ("}" of its JSON; XML: its closing tag), no further
    end = call.index("}}") + 2 if fmt == "hermes" else len(call)
    assert second.completion_tokens == chunks(end) < chunks(len(looping)) // 7
    assert engine.active == 0  # its stream was closed, not left open
    assert [call.tools is not None for call in engine.calls] == [True, True, False]
    final = events[-1]
    assert isinstance(final, Final) and (final.text, final.tool_calls) == ("广州多云到晴。", 1)
    assert (
        final.usage.completion_tokens
        == first.completion_tokens + second.completion_tokens + third.completion_tokens
    )


async def test_without_the_early_stop_the_model_call_runs_to_its_end() -> None:
    call = tool_call_text("get_current_weather", {"city": "广州"})
    agent, _ = make_agent([call, call * 8, "广州多云到晴。"], stop_repeated_calls=False)
    events = await collect(agent, "广州天气情况如何?")
    second = [e for e in events if isinstance(e, Usage)][1]
    assert second.completion_tokens == chunks(len(call * 8))
    assert isinstance(events[-1], Final) and events[-1].text == "广州多云到晴。"


async def test_a_repeat_inside_the_reasoning_does_not_stop_the_model_call() -> None:
    call = tool_call_text("get_current_weather", {"city": "广州"})
    thought = f"<think>\nI already ran {BARE_LINE}so I answer.\n</think>\n\n广州多云到晴。"
    agent, engine = make_agent([call, thought])
    events = await collect(agent, "广州天气情况如何?")
    final = events[-1]
    assert isinstance(final, Final) and final.text == "广州多云到晴。" and len(engine.calls) == 2


async def test_identical_calls_of_one_answer_run_once_and_each_id_gets_the_result() -> None:
    runs: list[str] = []

    def get_current_weather(city: str) -> str:
        """Get the current weather of a city."""
        runs.append(city)
        return weather_of(city)

    twice = tool_call_text("get_current_weather", {"city": "广州"}) * 2
    spec = AgentSpec.from_dict({"model": {"path": "scripted"}})
    engine = ScriptedEngine([twice, "广州多云到晴。"])
    events = await collect(Agent(spec, engine, tools=[get_current_weather]), "广州天气情况如何?")
    calls = [e for e in events if isinstance(e, ToolCall)]
    results = [e for e in events if isinstance(e, ToolResult)]
    assert runs == ["广州"] and len(calls) == 2 and calls[0].id != calls[1].id
    assert [(r.id, r.content) for r in results] == [(c.id, weather_of("广州")) for c in calls]
    history = engine.calls[1].messages
    assert [m["tool_call_id"] for m in history if m["role"] == "tool"] == [c.id for c in calls]
    final = events[-1]
    assert isinstance(final, Final) and final.text == "广州多云到晴。"


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

"""The whole agent loop on the real vLLM engine (tiny random-weight Qwen2 model).

The model's weights are random, so structured outputs decide what it writes: a JSON-schema grammar
(what ``tool_choice: required`` uses) or, for exact arguments, a regex that pins the whole call.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from qwenrun.agent import Agent
from qwenrun.agent.plugins import load_tools
from qwenrun.engines.scripted import PinnedEngine
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.events import Event, Final, ToolCall, ToolResult, Usage
from qwenrun.spec.agent_file import AgentSpec

pytestmark = pytest.mark.engine

SEED_SENTENCE = "目前广州多云到晴，气温28~31℃，吹轻微的偏北风。"


def call_json(name: str, arguments: dict[str, Any]) -> str:
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


async def slow_tool(seconds: float) -> str:
    """Sleep for a while.

    Args:
        seconds: How long.
    """
    await asyncio.sleep(seconds)
    return "woke up"


def weather_spec(tiny_spec: AgentSpec, **agent: Any) -> AgentSpec:
    data = tiny_spec.model_dump(mode="json")
    data["tools"] = [{"name": "get_current_weather", "settings": {"backend": "mock"}}]
    data["agent"] = {**data["agent"], "tool_choice": "required", **agent}
    data["sampling"] = {**data["sampling"], "max_tokens": 160}  # a forced call's junk city is <= 100 chars
    return AgentSpec.from_dict(data, source="tests/weather-tiny.yaml")


async def run(agent: Agent, prompt: str) -> list[Event]:
    return [event async for event in agent.session().stream(prompt)]


async def test_weather_question_calls_the_tool_and_answers(engine: VLLMEngine, tiny_spec: AgentSpec) -> None:
    spec = weather_spec(tiny_spec)
    pinned = PinnedEngine(engine, call_json("get_current_weather", {"city": "广州"}))
    agent = Agent(spec, pinned, load_tools(spec))
    events = await run(agent, "广州天气情况如何?")
    calls = [e for e in events if isinstance(e, ToolCall)]
    results = [e for e in events if isinstance(e, ToolResult)]
    final = events[-1]
    assert [(c.name, c.arguments) for c in calls] == [("get_current_weather", {"city": "广州"})]
    assert [(r.content, r.is_error) for r in results] == [(SEED_SENTENCE, False)]
    assert isinstance(final, Final) and final.iterations == 2 and final.tool_calls == 1
    assert final.usage.model_calls == 2 and final.usage.completion_tokens > 0
    # the result went back to the model as a tool message, rendered by the real chat template
    second = pinned.requests[1]
    assert second[-1] == {
        "role": "tool",
        "tool_call_id": calls[0].id,
        "name": "get_current_weather",
        "content": SEED_SENTENCE,
    }
    prompt = engine.render(second, [t.openai_schema() for t in agent.tools.values()])
    assert f"<tool_response>\n{SEED_SENTENCE}\n</tool_response>" in prompt


async def test_required_tool_choice_grammar_yields_a_valid_call(
    engine: VLLMEngine, tiny_spec: AgentSpec
) -> None:
    spec = weather_spec(tiny_spec, max_iterations=2)
    agent = Agent(spec, engine, load_tools(spec))
    events = await run(agent, "广州天气情况如何?")
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert len(calls) == 1 and calls[0].name == "get_current_weather"
    city = calls[0].arguments["city"]
    assert isinstance(city, str) and 1 <= len(city) <= 100  # noise from random weights, but schema-valid
    results = [e for e in events if isinstance(e, ToolResult)]
    assert results[0].content == f"目前{city}多云到晴，气温28~31℃，吹轻微的偏北风。"


async def test_parallel_calls_in_one_answer(engine: VLLMEngine, tiny_spec: AgentSpec) -> None:
    spec = weather_spec(tiny_spec)
    two = (
        call_json("get_current_weather", {"city": "广州"})
        + "\n</tool_call>\n<tool_call>\n"
        + call_json("get_current_weather", {"city": "深圳"})
        + "\n</tool_call>"
    )
    agent = Agent(spec, PinnedEngine(engine, two), load_tools(spec))
    events = await run(agent, "广州和深圳天气如何?")
    results = [e for e in events if isinstance(e, ToolResult)]
    assert sorted(r.content for r in results) == sorted(
        f"目前{c}多云到晴，气温28~31℃，吹轻微的偏北风。" for c in ("广州", "深圳")
    )
    assert len({r.id for r in results}) == 2


async def test_a_hanging_tool_is_cut_at_its_timeout(engine: VLLMEngine, tiny_spec: AgentSpec) -> None:
    spec = weather_spec(tiny_spec, timeout_s=1)
    agent = Agent(spec, PinnedEngine(engine, call_json("slow_tool", {"seconds": 600})), [slow_tool])
    events = await asyncio.wait_for(run(agent, "wait"), timeout=120)
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [(r.content, r.is_error) for r in results] == [("Error: slow_tool timed out after 1 s", True)]
    assert isinstance(events[-1], Final) and events[-1].stop_reason in ("answer", "length")


async def test_a_repeated_call_runs_once_and_max_iterations_bounds_the_loop(
    engine: VLLMEngine, tiny_spec: AgentSpec
) -> None:
    pinned = PinnedEngine(engine, call_json("get_current_weather", {"city": "广州"}), every_call=True)
    spec = weather_spec(tiny_spec, max_iterations=2)
    events = await run(Agent(spec, pinned, load_tools(spec)), "loop")
    final = events[-1]
    assert isinstance(final, Final)  # call, repeat (not run), then the limit
    assert (final.stop_reason, final.iterations, final.tool_calls) == ("max_iterations", 2, 1)
    assert len(pinned.requests) == 2
    spec = weather_spec(tiny_spec, max_iterations=3)
    events = await run(Agent(spec, pinned, load_tools(spec)), "loop")
    final = events[-1]
    assert isinstance(final, Final)  # the third call, with the tools off, is the answer
    assert (final.stop_reason, final.iterations, final.tool_calls) == ("answer", 3, 1)
    assert len([e for e in events if isinstance(e, ToolResult)]) == 1


async def test_a_repeat_stops_the_vllm_request_and_identical_calls_run_once(
    engine: VLLMEngine, tiny_spec: AgentSpec
) -> None:
    """Every model call with the tools on writes the same call four times: the first answer's
    four run once (four ids, one result), the second answer stops after its first block (vLLM's
    request is aborted: it generated a fraction of the first's tokens), then the answer comes."""
    body = call_json("get_current_weather", {"city": "广州"})
    four = "\n</tool_call>\n<tool_call>\n".join([body] * 4)
    pinned = PinnedEngine(engine, four, every_call=True, call_max_tokens=600)
    spec = weather_spec(tiny_spec, max_iterations=3)
    events = await run(Agent(spec, pinned, load_tools(spec)), "广州天气情况如何?")
    calls = [e for e in events if isinstance(e, ToolCall)]
    results = [e for e in events if isinstance(e, ToolResult)]
    assert len({c.id for c in calls}) == 4 and [r.id for r in results] == [c.id for c in calls]
    assert {(r.content, r.is_error) for r in results} == {(SEED_SENTENCE, False)}
    first, second, _ = (e for e in events if isinstance(e, Usage))
    assert 0 < second.completion_tokens < first.completion_tokens / 2, (first, second)
    final = events[-1]
    assert isinstance(final, Final) and final.stop_reason in ("answer", "length") and final.tool_calls == 4
    assert engine.num_unfinished_requests() == 0


async def test_concurrent_sessions_on_one_engine(engine: VLLMEngine, tiny_spec: AgentSpec) -> None:
    spec = weather_spec(tiny_spec)
    agent = Agent(
        spec, PinnedEngine(engine, call_json("get_current_weather", {"city": "广州"})), load_tools(spec)
    )
    finals = await asyncio.gather(*(agent.session().ask(f"问题 {i}") for i in range(12)))
    assert [(f.iterations, f.tool_calls) for f in finals] == [(2, 1)] * 12

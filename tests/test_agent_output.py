"""Structured answers (``agent.output_schema``) on the scripted engine: the spec key, the loop's
constrained answer call, validation and its repair, and how the console prints the answer."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from pydantic import BaseModel, field_validator
from weather import get_current_weather

from qwenrun.agent import Agent
from qwenrun.engines.scripted import ScriptedEngine, tool_call_text
from qwenrun.errors import ConfigError, OutputError
from qwenrun.events import Event, Final, Repair, TextDelta, ToolResult
from qwenrun.frontends.console import EventPrinter
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.spec.output import OutputSchema, answer_schema

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "sunny": {"type": "boolean"}},
    "required": ["city", "sunny"],
    "additionalProperties": False,
}


class Forecast(BaseModel):
    city: str
    celsius: int

    @field_validator("celsius")
    @classmethod
    def _plausible(cls, value: int) -> int:
        if not -90 <= value <= 60:
            raise ValueError("not a temperature on Earth")
        return value


def spec_of(output_schema: Any, **agent: Any) -> AgentSpec:
    data = {"model": {"path": "scripted"}, "agent": {"output_schema": output_schema, **agent}}
    return AgentSpec.from_dict(data, source="agents/structured.yaml")


async def run_turn(agent: Agent, prompt: str = "Weather in Paris?") -> list[Event]:
    return [event async for event in agent.session(record=False).stream(prompt)]


# -- the spec key ------------------------------------------------------------------------------


def test_a_json_schema_is_checked_when_the_file_loads() -> None:
    resolved = answer_schema(spec_of(SCHEMA))
    assert resolved is not None and resolved.json_schema == SCHEMA and resolved.model is None
    with pytest.raises(ConfigError) as bad:
        spec_of({"type": "objekt"})
    assert str(bad.value).startswith("agents/structured.yaml: agent.output_schema: not a valid JSON Schema")
    assert answer_schema(spec_of(None)) is None


def test_a_pydantic_model_is_imported_when_the_file_loads() -> None:
    resolved = answer_schema(spec_of(f"{__name__}:Forecast"))
    assert resolved is not None and resolved.model is Forecast and resolved.name == "Forecast"
    assert resolved.json_schema == Forecast.model_json_schema()
    problems = {
        "no_such_module_qwenrun:Thing": "cannot import module 'no_such_module_qwenrun'",
        f"{__name__}:Missing": f"module {__name__!r} has no 'Missing'",
        "json:dumps": "'json:dumps' is a function, not a pydantic BaseModel class",
        "Forecast": "expected a JSON Schema (a mapping) or 'module:Class'",
    }
    for reference, problem in problems.items():
        with pytest.raises(ConfigError) as bad:
            spec_of(reference)
        assert str(bad.value).startswith("agents/structured.yaml: agent.output_schema: ")
        assert problem in str(bad.value)


def test_parse_validates_with_the_schema_or_the_model() -> None:
    plain = OutputSchema.from_json_schema(SCHEMA)
    assert plain.parse('{"city": "Paris", "sunny": true}') == {"city": "Paris", "sunny": True}
    with pytest.raises(ValueError, match="does not match the schema at sunny: 'yes' is not of type 'boolean'"):
        plain.parse('{"city": "Paris", "sunny": "yes"}')
    with pytest.raises(ValueError, match="not JSON"):
        plain.parse('{"city": "Par')
    model = answer_schema(spec_of(f"{__name__}:Forecast"))
    assert model is not None and model.parse('{"city": "Paris", "celsius": 21}') == {"city": "Paris", "celsius": 21}
    with pytest.raises(ValueError, match="not a valid Forecast: celsius: Value error, not a temperature on Earth"):
        model.parse('{"city": "Paris", "celsius": 500}')


# -- the loop ----------------------------------------------------------------------------------


async def test_tools_run_first_then_the_answer_is_generated_under_the_schema() -> None:
    answer = '{"city":"Paris","sunny":true}'
    replies = iter([tool_call_text("get_current_weather", {"city": "Paris"}), "Paris is sunny today.", answer])
    engine = ScriptedEngine(lambda request: next(replies))
    agent = Agent(spec_of(SCHEMA), engine, tools=[get_current_weather])
    events = await run_turn(agent)
    final = events[-1]
    assert isinstance(final, Final)
    assert final.output == {"city": "Paris", "sunny": True} and final.text == answer
    assert final.stop_reason == "answer" and final.iterations == 3 and final.tool_calls == 1
    assert [e.text for e in events if isinstance(e, TextDelta)] == [answer]  # only the validated JSON
    assert any(isinstance(e, ToolResult) for e in events)
    first, draft, structured = engine.calls
    assert first.constraint is None and first.tools is not None and draft.constraint is None
    assert structured.constraint is not None and structured.constraint.json == SCHEMA
    assert structured.tools is None and structured.tool_choice == "none"
    assert structured.messages[-2] == {"role": "assistant", "content": "Paris is sunny today."}  # the draft
    assert structured.messages[-1]["role"] == "system" and json.dumps(SCHEMA, separators=(",", ":")) in (
        structured.messages[-1]["content"]
    )


async def test_an_agent_without_tools_answers_under_the_schema_at_once() -> None:
    engine = ScriptedEngine(['{"city": "Oslo", "sunny": false}'])
    agent = Agent(spec_of(SCHEMA), engine, tools=[])
    session = agent.session(record=False)
    final = await session.ask("Weather in Oslo?")
    assert final.output == {"city": "Oslo", "sunny": False} and final.iterations == 1
    (call,) = engine.calls
    assert call.constraint is not None and call.constraint.json == SCHEMA
    assert session.messages[-1] == {"role": "assistant", "content": '{"city": "Oslo", "sunny": false}'}


async def test_an_invalid_answer_is_repaired_once_then_an_error() -> None:
    engine = ScriptedEngine(['{"city": "Oslo", "celsius": 900}', '{"city": "Oslo", "celsius": -3}'])
    agent = Agent(spec_of(f"{__name__}:Forecast"), engine, tools=[])
    events = await run_turn(agent)
    repairs = [e for e in events if isinstance(e, Repair)]
    assert len(repairs) == 1 and "not a temperature on Earth" in repairs[0].reason
    final = events[-1]
    assert isinstance(final, Final) and final.output == {"city": "Oslo", "celsius": -3} and final.iterations == 2
    assert "That answer is not valid" in engine.calls[1].messages[-1]["content"]
    assert engine.calls[1].messages[-2] == {"role": "assistant", "content": '{"city": "Oslo", "celsius": 900}'}

    stubborn = Agent(spec_of(f"{__name__}:Forecast"), ScriptedEngine(['{"city": 1}', '{"city": 2}']), tools=[])
    with pytest.raises(OutputError, match="not valid JSON of the output schema 'Forecast'"):
        await run_turn(stubborn)


async def test_a_request_schema_replaces_the_agents() -> None:
    engine = ScriptedEngine(['{"n": 3}'])
    agent = Agent(spec_of(None), engine, tools=[])
    wanted = OutputSchema.from_json_schema({"type": "object", "properties": {"n": {"type": "integer"}}})
    events = [e async for e in agent.session(record=False).stream("Count", output_schema=wanted)]
    final = events[-1]
    assert isinstance(final, Final) and final.output == {"n": 3}
    assert engine.calls[0].constraint is not None and engine.calls[0].constraint.json == wanted.json_schema


async def test_the_console_prints_the_answer_as_indented_json() -> None:
    agent = Agent(spec_of(SCHEMA), ScriptedEngine(['{"city":"Rome","sunny":true}']), tools=[])
    out = io.StringIO()
    printer = EventPrinter(out, structured=True)
    for event in await run_turn(agent):
        printer(event)
    assert out.getvalue() == json.dumps({"city": "Rome", "sunny": True}, indent=2) + "\n"
    lines = io.StringIO()
    as_json = EventPrinter(lines, as_json=True, structured=True)
    for event in await run_turn(Agent(spec_of(SCHEMA), ScriptedEngine(['{"city":"Rome","sunny":true}']))):
        as_json(event)
    last = json.loads(lines.getvalue().splitlines()[-1])
    assert last["type"] == "final" and last["output"] == {"city": "Rome", "sunny": True}


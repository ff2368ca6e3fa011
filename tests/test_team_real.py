"""The example team (agents/team.yaml) on the real model, Qwen2.5-Coder-0.5B: the coordinator
delegates to the weather agent, which calls its tool, and answers from what it said."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenrun.agent import Agent
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.events import Final, ToolCall, ToolResult
from qwenrun.spec.agent_file import AgentSpec

pytestmark = pytest.mark.real_model

TEAM = Path(__file__).resolve().parent.parent / "agents" / "team.yaml"


async def test_the_coordinator_delegates_to_the_weather_agent(
    real_model_dir: Path, real_engine: VLLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QWEN_SMALL_MODEL", str(real_model_dir))  # the weather agent's file reads it too
    spec = AgentSpec.from_file(TEAM)
    agent = Agent(spec, real_engine)
    assert agent.team is not None and all(
        member.engine is real_engine for member in agent.team.members.values()
    )
    session = agent.session(record=False)
    events = [event async for event in session.stream("What's the weather like in Paris?")]
    calls = [(event.agent, event.name) for event in events if isinstance(event, ToolCall)]
    assert calls[:2] == [("coordinator", "ask_weather"), ("weather", "get_current_weather")], events
    weather = next(e for e in events if isinstance(e, ToolResult) and e.name == "get_current_weather")
    assert weather.agent == "weather" and not weather.is_error and "Paris" in weather.content, weather
    asked = next(e for e in events if isinstance(e, ToolResult) and e.name == "ask_weather")
    assert asked.agent == "coordinator" and not asked.is_error and asked.content.strip(), asked
    final = events[-1]
    assert isinstance(final, Final) and final.agent == "coordinator" and final.stop_reason == "answer", final
    assert final.text.strip(), final

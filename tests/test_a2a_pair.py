"""The example pair end to end: ``agents/a2a-assistant.yaml`` asks ``agents/a2a-weather.yaml``
over A2A. The weather agent is a real A2A server on 127.0.0.1 with its real weather plugin; the
assistant calls it through the real ``ask_agent`` plugin (plugins/qwenrun-a2a, the official A2A
client). Both run the scripted engine, so the words are exact."""

from __future__ import annotations

from pathlib import Path

import pytest
from loopback import serve_in_loop

from qwenrun.agent import Agent
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.events import ToolCall, ToolResult
from qwenrun.frontends.a2a import create_app
from qwenrun.sessions import open_store
from qwenrun.spec.agent_file import AgentSpec

AGENTS = Path(__file__).resolve().parent.parent / "agents"
QUESTION = "深圳天气如何?"
WEATHER = "目前深圳多云到晴，气温28~31℃，吹轻微的偏北风。"  # the weather plugin's mock backend


def weather_agent(request: ModelRequest) -> str:
    """The remote agent: look the city up, then answer with what the tool said."""
    last = request.messages[-1]
    if last["role"] == "user":
        return tool_call_text("get_current_weather", {"city": "深圳"})
    return f"天气代理：{last['content']}"


def assistant(request: ModelRequest) -> str:
    """The local agent: ask the weather agent, then pass its answer on."""
    last = request.messages[-1]
    if last["role"] == "user":
        return tool_call_text("ask_agent", {"message": last["content"]})
    return f"助手：{last['content']}"


async def test_the_assistant_asks_the_weather_agent_over_a2a(monkeypatch: pytest.MonkeyPatch) -> None:
    remote_spec = AgentSpec.from_file(AGENTS / "a2a-weather.yaml", ["sessions.path=':memory:'"])
    remote_engine = ScriptedEngine(weather_agent)
    remote = Agent(remote_spec, remote_engine, store=open_store(remote_spec))  # tools: its plugins
    async with serve_in_loop(create_app(remote)) as url:
        monkeypatch.setenv("WEATHER_AGENT_URL", f"{url}/")
        spec = AgentSpec.from_file(AGENTS / "a2a-assistant.yaml", ["sessions.enabled=false"])
        local_engine = ScriptedEngine(assistant)
        local = Agent(spec, local_engine)
        assert list(local.tools) == ["ask_agent"] and list(remote.tools) == ["get_current_weather"]
        events = [event async for event in local.session().stream(QUESTION)]
    calls = [event for event in events if isinstance(event, ToolCall)]
    results = [event for event in events if isinstance(event, ToolResult)]
    assert [(call.name, call.arguments) for call in calls] == [("ask_agent", {"message": QUESTION})]
    assert [(result.content, result.is_error) for result in results] == [(f"天气代理：{WEATHER}", False)]
    assert events[-1].type == "final" and events[-1].text == f"助手：天气代理：{WEATHER}"
    # the remote agent saw the question as its user's, and recorded the session as an A2A one
    assert remote_engine.calls[0].messages[-1] == {"role": "user", "content": QUESTION}
    assert remote.store is not None
    (info,) = remote.store.list()
    assert (info.agent, info.frontend, info.turns) == ("weather", "a2a", 1)


async def test_a_remote_approval_is_refused_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote tool that needs a person's approval: the remote task asks for input, which nobody
    can give through a tool call, so ask_agent cancels it and tells the model why."""
    remote_spec = AgentSpec.from_dict(
        {
            **AgentSpec.from_file(AGENTS / "a2a-weather.yaml").model_dump(mode="json", exclude_unset=True),
            "tools": [{"name": "get_current_weather", "approval": "ask"}],
            "sessions": {"enabled": False},
        },
        source="tests/a2a-weather-ask.yaml",
    )
    remote = Agent(remote_spec, ScriptedEngine(weather_agent))
    app = create_app(remote)
    async with serve_in_loop(app) as url:
        monkeypatch.setenv("WEATHER_AGENT_URL", f"{url}/")
        spec = AgentSpec.from_file(AGENTS / "a2a-assistant.yaml", ["sessions.enabled=false"])
        local = Agent(spec, ScriptedEngine(assistant))
        events = [event async for event in local.session().stream(QUESTION)]
        assert app.state.executor.turns == {}  # the remote turn was canceled, not left waiting
    (result,) = [event for event in events if isinstance(event, ToolResult)]
    assert result.is_error
    assert result.content == (
        "Error: AgentError: the agent 'weather' asks for input that nobody can give from here, so its task "
        'was canceled; it asked: Run get_current_weather({"city": "深圳"}) (from qwenrun-weather 0.1.0)? '
        "Answer approve or reject."
    )

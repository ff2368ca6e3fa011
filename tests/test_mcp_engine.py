"""MCP tools through the whole agent loop on the real vLLM engine (tiny random-weight model).

The weights are random, so the calls are pinned (:class:`~qwenrun.engines.scripted.PinnedEngine`); every
tool is real: the entry-point weather plugin, the test server of ``tests/mcp_server.py`` over stdio
and over streamable HTTP on 127.0.0.1, and ``mcp-server-time`` from PyPI run by uvx in an
environment of its own (its ``mcp`` version need not be ours). The tool results go back to the
model through the real chat template.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp_fixtures import free_port, http_server, stdio, time_server

from qwenrun.agent import Agent
from qwenrun.approval import ApprovalRequest
from qwenrun.engines.scripted import PinnedEngine
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.events import Event, Final, ToolResult
from qwenrun.mcp import processes
from qwenrun.spec.agent_file import AgentSpec

pytestmark = pytest.mark.engine


def calls(*pairs: tuple[str, dict[str, Any]]) -> str:
    """The pinned continuation of ``<tool_call>\\n``: one block per call."""
    return "\n</tool_call>\n<tool_call>\n".join(
        json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) for name, arguments in pairs
    )


def agent_spec(tiny_spec: AgentSpec, *tools: Any) -> AgentSpec:
    data = tiny_spec.model_dump(mode="json")
    data["tools"] = list(tools)
    data["agent"] = {**data["agent"], "tool_choice": "required", "timeout_s": 20}
    return AgentSpec.from_dict(data, source="tests/mcp-tiny.yaml")


def results(events: list[Event]) -> dict[str, ToolResult]:
    return {event.name: event for event in events if isinstance(event, ToolResult)}


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    with http_server(free_port()) as url:
        yield url


async def test_entry_point_stdio_and_http_tools_in_one_turn(
    engine: VLLMEngine, tiny_spec: AgentSpec, http_url: str
) -> None:
    spec = agent_spec(
        tiny_spec,
        {"name": "get_current_weather", "settings": {"backend": "mock"}},
        stdio(allow=["add"]),
        {"mcp": {"name": "web", "url": http_url}, "allow": ["add"], "prefix": "web_"},
    )
    pinned = PinnedEngine(
        engine,
        calls(("get_current_weather", {"city": "广州"}), ("add", {"a": 2, "b": 3}), ("web_add", {"a": 20, "b": 22})),
        call_max_tokens=300,
    )
    async with Agent(spec, pinned) as agent:
        assert list(agent.tools) == ["get_current_weather", "add", "web_add"]
        events = [event async for event in agent.session(record=False).stream("广州天气? 2+3? 20+22?")]
    found = results(events)
    assert {name: (r.content, r.is_error) for name, r in found.items()} == {
        "get_current_weather": ("目前广州多云到晴，气温28~31℃，吹轻微的偏北风。", False),
        "add": ("5", False),
        "web_add": ("42", False),
    }
    final = events[-1]
    assert isinstance(final, Final) and (final.iterations, final.tool_calls) == (2, 3)
    # the MCP schemas were in the prompt, and the results went back through the chat template
    prompt = engine.render(pinned.requests[1], agent.tool_schemas())
    assert '"name": "web_add"' in prompt and "<tool_response>\n42\n</tool_response>" in prompt


async def test_a_published_server_from_pypi_in_its_own_environment(engine: VLLMEngine, tiny_spec: AgentSpec) -> None:
    spec = agent_spec(tiny_spec, time_server(allow=["get_current_time", "convert_time"]))
    pinned = PinnedEngine(engine, calls(("get_current_time", {"timezone": "Asia/Shanghai"})))
    agent = Agent(spec, pinned)
    async with agent:
        assert sorted(agent.tools) == ["convert_time", "get_current_time"]
        schema = agent.tools["get_current_time"].parameters
        assert schema["required"] == ["timezone"] and schema["properties"]["timezone"]["type"] == "string"
        [server] = agent.mcp.connections
        running = processes.marked(server.marker)  # uvx/uv and the server's python
        assert running
        events = [event async for event in agent.session(record=False).stream("What time is it in Shanghai?")]
    found = results(events)["get_current_time"]
    assert not found.is_error, found.content
    answer = json.loads(found.content)
    assert answer["timezone"] == "Asia/Shanghai" and answer["datetime"].endswith("+08:00")
    assert isinstance(events[-1], Final)
    assert not any(processes.alive(pid) for pid, _ in running)  # shutdown left none of them


async def test_a_rejected_call_and_a_dying_server_in_the_loop_then_the_server_is_back(
    engine: VLLMEngine, tiny_spec: AgentSpec, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    entry = stdio(allow=["note", "die", "add"], approval={"note": "ask"})
    entry["mcp"]["env"] = {"NOTES_FILE": str(notes)}
    spec = agent_spec(tiny_spec, entry)
    asked: list[str] = []

    async def person(request: ApprovalRequest) -> bool:
        asked.append(request.shown())
        return False

    pinned = PinnedEngine(engine, calls(("note", {"text": "the plan"}), ("die", {})), call_max_tokens=200)
    agent = Agent(spec, pinned)
    async with agent:
        events = [event async for event in agent.session(record=False, approver=person).stream("note it")]
        found = results(events)
        assert asked == ['note({"text": "the plan"})']
        assert found["note"].content == "Error: the user rejected this call of note; it was not run."
        assert found["die"].content == (
            "Error: MCP server 'test' closed the connection during the call; it is restarted"
        )
        assert not notes.exists()  # the rejected call did not run
        assert isinstance(events[-1], Final)
        tool_messages = [m["content"] for m in pinned.requests[1] if m["role"] == "tool"]
        assert tool_messages == [found["note"].content, found["die"].content]
        # the same servers, a new turn (another agent on them, as a reloaded chat app makes it)
        again = Agent(spec, PinnedEngine(engine, calls(("add", {"a": 1, "b": 1}))), list(agent.tools.values()),
                      mcp=agent.mcp)  # fmt: skip
        events = [event async for event in again.session(record=False).stream("1+1")]
        assert results(events)["add"].content == "2"
        assert agent.mcp.connections[0].failures == 1

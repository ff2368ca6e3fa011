"""Approval of tool calls: the modes in the agent loop (scripted engine), the escaped display, the
CLI's y/n prompt (``qwenrun run`` through Click's runner) and the file's ``approval`` keys."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwenrun.agent import Agent
from qwenrun.agent.plugins import load_tools
from qwenrun.approval import ApprovalRequest, escape, fixed_approver, shown_call
from qwenrun.cli import common as cli
from qwenrun.cli import main as cli_main
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.events import Event, Final, ToolCall, ToolResult
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.tools import Tool

WRITTEN: list[str] = []


def write_note(text: str) -> str:
    """Write a note."""
    WRITTEN.append(text)
    return f"noted: {text}"


def read_notes() -> str:
    """Read the notes."""
    return "; ".join(WRITTEN) or "(no notes)"


def two_calls(request: ModelRequest) -> str:
    """Both tools in one answer, then a plain answer once the results are in."""
    if request.messages[-1]["role"] == "tool":
        return "done"
    return tool_call_text("write_note", {"text": "hello"}) + tool_call_text("read_notes", {})


def agent_with(approval: str, *, read_approval: str = "auto") -> Agent:
    spec = AgentSpec.from_dict({"model": {"path": "scripted"}})
    tools = [
        Tool.from_function(write_note, approval=approval),  # type: ignore[arg-type]
        Tool.from_function(read_notes, approval=read_approval),  # type: ignore[arg-type]
    ]
    return Agent(spec, ScriptedEngine(two_calls), tools=tools)


@pytest.fixture(autouse=True)
def no_notes() -> None:
    WRITTEN.clear()


async def turn(agent: Agent, approver: object = None) -> list[Event]:
    session = agent.session(record=False, approver=approver)  # type: ignore[arg-type]
    return [event async for event in session.stream("note hello, then read the notes")]


def results(events: list[Event]) -> dict[str, tuple[str, bool]]:
    return {e.name: (e.content, e.is_error) for e in events if isinstance(e, ToolResult)}


async def test_ask_runs_what_the_person_approves_and_tells_the_model_what_was_rejected() -> None:
    asked: list[ApprovalRequest] = []

    async def person(request: ApprovalRequest) -> bool:
        asked.append(request)
        return False

    agent = agent_with("ask")
    events = await turn(agent, person)
    assert [request.call.name for request in asked] == ["write_note"]  # read_notes is auto
    assert asked[0].call.arguments == {"text": "hello"}
    assert asked[0].shown() == 'write_note({"text": "hello"})'
    assert WRITTEN == []
    assert results(events) == {
        "write_note": ("Error: the user rejected this call of write_note; it was not run.", True),
        "read_notes": ("(no notes)", False),
    }
    # the refusal went back to the model as the call's tool message, in the calls' order
    tool_messages = [m for m in agent.engine.calls[1].messages if m["role"] == "tool"]  # type: ignore[attr-defined]
    assert [m["name"] for m in tool_messages] == ["write_note", "read_notes"]
    assert "rejected" in tool_messages[0]["content"]
    assert isinstance(events[-1], Final) and events[-1].text == "done"

    WRITTEN.clear()
    events = await turn(agent_with("ask"), fixed_approver(True))
    assert WRITTEN == ["hello"]
    assert results(events)["write_note"] == ("noted: hello", False)


async def test_the_call_event_comes_before_the_question_and_questions_come_one_at_a_time() -> None:
    agent = agent_with("ask", read_approval="ask")
    seen: list[str] = []
    session = agent.session(record=False)
    active = 0

    async def person(request: ApprovalRequest) -> bool:
        nonlocal active
        active += 1
        assert active == 1, "two approvals asked at once"
        seen.append(f"ask {request.call.name}")
        await asyncio.sleep(0.01)
        active -= 1
        return True

    session.approver = person
    async for event in session.stream("go"):
        if isinstance(event, ToolCall | ToolResult):
            seen.append(f"{event.type} {event.name}")
    assert seen == [
        "tool_call write_note", "tool_call read_notes", "ask write_note", "ask read_notes",
        "tool_result write_note", "tool_result read_notes",
    ]  # fmt: skip


async def test_deny_never_runs_and_no_approver_refuses_ask() -> None:
    events = await turn(agent_with("deny"), fixed_approver(True))
    assert results(events)["write_note"] == (
        "Error: write_note is not allowed here (approval: deny); the call was not run.",
        True,
    )
    events = await turn(agent_with("ask"))  # a session without an approver
    content, is_error = results(events)["write_note"]
    assert is_error and "needs a person's approval and nobody can give it here" in content
    assert WRITTEN == []


def test_the_shown_call_escapes_what_a_terminal_or_chat_would_interpret() -> None:
    shown = shown_call("write_note", {"text": "a\x1b[2J\u202eb\nc", "z": "中文"})
    assert shown == 'write_note({"text": "a\\u001b[2J\\u202eb\\nc", "z": "中文"})'
    assert escape("ok\x9b31m\u2028") == "ok\\u009b31m\\u2028"


def test_the_file_declares_approval_per_tool() -> None:
    spec = AgentSpec.from_dict(
        {"model": {"path": "m"}, "tools": [{"name": "get_current_weather", "approval": "ask"}]}
    )
    [tool] = load_tools(spec)
    assert tool.approval == "ask"


AGENT_YAML = """\
model: {path: scripted}
tools:
  - name: get_current_weather
    approval: ask
"""


@pytest.mark.parametrize(("answer", "runs"), [("y\n", True), ("n\n", False), ("", False)])
def test_cli_asks_y_or_n_before_the_call(
    answer: str, runs: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ask.yaml"
    path.write_text(AGENT_YAML, encoding="utf-8")

    def script(request: ModelRequest) -> str:
        if request.messages[-1]["role"] == "tool":
            return "answer: " + request.messages[-1]["content"]
        return tool_call_text("get_current_weather", {"city": "广州\x1b[31m"})

    monkeypatch.setattr(cli, "make_agent", lambda spec: Agent(spec, ScriptedEngine(script)))
    result = CliRunner().invoke(cli_main, ["run", str(path), "-p", "广州天气?"], input=answer)
    assert result.exit_code == 0, result.output
    question = 'run get_current_weather({"city": "广州\\u001b[31m"}) from qwenrun-weather 0.1.0? [y/N]'
    assert question in result.output
    if runs:
        assert "approved" in result.output and "answer: 目前广州" in result.output
    else:
        assert "rejected" in result.output
        assert "answer: Error: the user rejected this call of get_current_weather" in result.output

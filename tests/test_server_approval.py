"""The OpenAI server's agent mode with an MCP server and an ``approval: ask`` tool (scripted engine,
a real uvicorn server on 127.0.0.1, the official client): the MCP server starts and stops with the
app, and ``ask`` needs the ``X-Qwenrun-Approval`` header, since nobody is there to approve; then the
same through ``permissions:`` rules, and the Responses route's pending ``mcp_approval_request``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from mcp_fixtures import stdio
from openai import OpenAI
from test_server import get_current_weather, running

from qwenrun.agent import Agent
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.frontends.openai import create_app
from qwenrun.frontends.openai.schemas import APIError
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.tools import Tool

SERVED = "Qwen2.5-7B-Instruct"


def script(request: ModelRequest) -> str:
    """Call the weather tool (ask) and the MCP echo tool, then answer with what they returned."""
    if request.messages[-1]["role"] == "user":
        return tool_call_text("get_current_weather", {"city": "深圳"}) + tool_call_text("echo", {"text": "你好"})
    return " | ".join(str(m["content"]) for m in request.messages if m["role"] == "tool")


@pytest.fixture(scope="module")
def client() -> Iterator[OpenAI]:
    spec = AgentSpec.from_dict(
        {
            "model": {"path": "/models/qwen", "served_model_name": SERVED},
            "agent": {"name": "helper"},
            "tools": [{"name": "get_current_weather", "approval": "ask"}, stdio(allow=["echo"])],
            "frontend": {"kind": "openai"},
        },
        source="tests/server-mcp.yaml",
    )
    weather = Tool.from_function(get_current_weather, approval="ask")
    agent = Agent(spec, ScriptedEngine(script), tools=[weather])
    with running(create_app(agent)) as url, OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0) as client:
        yield client
    assert [connection.state for connection in agent.mcp.connections] == ["stopped"]


def ask(client: OpenAI, **headers: str) -> Any:
    messages: Any = [{"role": "user", "content": "深圳天气? 说你好"}]
    return client.chat.completions.create(model="helper", messages=messages, extra_headers=headers)


def test_ask_without_the_approval_header_is_refused(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client)
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "approval_required"
    assert error["message"] == (
        "tools of agent 'helper' need a person's approval (get_current_weather) and nobody can give it "
        "here; send the header X-Qwenrun-Approval: approve (they run) or reject (they are refused)"
    )
    with pytest.raises(openai.BadRequestError, match="X-Qwenrun-Approval: expected approve or reject"):
        ask(client, **{"X-Qwenrun-Approval": "maybe"})
    with pytest.raises(openai.BadRequestError, match="X-Qwenrun-Approval needs agent mode"):
        client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Qwenrun-Approval": "approve"}
        )


@pytest.mark.parametrize("mode", ["approve", "reject"])
def test_the_header_approves_or_rejects_and_the_mcp_tool_runs(client: OpenAI, mode: str) -> None:
    out = ask(client, **{"X-Qwenrun-Approval": mode})
    weather = get_current_weather("深圳") if mode == "approve" else (
        "Error: the user rejected this call of get_current_weather; it was not run."
    )  # fmt: skip
    assert out.choices[0].message.content == f"{weather} | 你好"
    steps = (out.choices[0].message.model_extra or {})["qwenrun_steps"]
    results = {step["name"]: step for step in steps if step["type"] == "tool_result"}
    assert results["echo"]["content"] == "你好" and results["echo"]["is_error"] is False
    assert results["get_current_weather"]["is_error"] is (mode == "reject")
    assert json.dumps(steps, ensure_ascii=False).count('"tool_call"') == 2


@pytest.fixture(scope="module")
def ruled() -> Iterator[OpenAI]:
    """The same tools, all `approval: auto`, under `permissions:` rules: the weather asks, the MCP
    server's echo is denied."""
    spec = AgentSpec.from_dict(
        {
            "model": {"path": "/models/qwen", "served_model_name": SERVED},
            "agent": {"name": "helper"},
            "tools": ["get_current_weather", stdio(allow=["echo"])],
            "frontend": {"kind": "openai"},
            "permissions": {"ask": ['get_current_weather(city="*")'], "deny": ['echo(text="*你*")']},
        },
        source="tests/server-permissions.yaml",
    )
    agent = Agent(spec, ScriptedEngine(script), tools=[Tool.from_function(get_current_weather)])
    with running(create_app(agent)) as url, OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0) as client:
        yield client


@pytest.mark.parametrize("mode", [None, "approve", "reject"])
def test_permission_rules_ask_and_deny_through_the_server(ruled: OpenAI, mode: str | None) -> None:
    if mode is None:  # an `ask` rule needs someone to answer, as an `approval: ask` tool does
        with pytest.raises(openai.BadRequestError) as refused:
            ask(ruled)
        error = refused.value.body
        assert isinstance(error, dict) and error["code"] == "approval_required"
        assert "(permissions.ask[0])" in error["message"]
        return
    out = ask(ruled, **{"X-Qwenrun-Approval": mode})
    weather = get_current_weather("深圳") if mode == "approve" else (
        "Error: the user rejected this call of get_current_weather; it was not run."
    )  # fmt: skip
    denied = ('Error: echo is not allowed here (denied by the rule permissions.deny[0]: echo(text="*你*")); '
              "the call was not run.")  # fmt: skip
    assert out.choices[0].message.content == f"{weather} | {denied}"


@pytest.mark.parametrize("stream", [False, True])
def test_an_ask_rule_on_the_responses_route_is_a_pending_approval_the_client_resolves(
    ruled: OpenAI, stream: bool
) -> None:
    first = ruled.responses.create(model="helper", input="深圳天气? 说你好")
    assert [item.type for item in first.output] == ["mcp_call", "mcp_call", "mcp_approval_request"]
    asked = first.output[-1]
    assert (asked.name, json.loads(asked.arguments), asked.server_label) == ("get_current_weather", {"city": "深圳"}, "helper")
    answer: Any = [{"type": "mcp_approval_response", "approval_request_id": asked.id, "approve": True}]
    if stream:
        with ruled.responses.stream(model="helper", input=answer, previous_response_id=first.id) as events:
            kinds = [event.type for event in events]
            rest = events.get_final_response()
        assert kinds[-1] == "response.completed" and "response.mcp_call.completed" in kinds
    else:
        rest = ruled.responses.create(model="helper", input=answer, previous_response_id=first.id)
    calls = {item.name: item for item in rest.output if item.type == "mcp_call"}
    assert calls["get_current_weather"].output == get_current_weather("深圳")
    assert calls["echo"].status == "failed" and "denied by the rule" in str(calls["echo"].error)
    denied = ('Error: echo is not allowed here (denied by the rule permissions.deny[0]: echo(text="*你*")); '
              "the call was not run.")  # fmt: skip
    assert rest.output_text == f"{get_current_weather('深圳')} | {denied}"
    with pytest.raises(openai.NotFoundError, match="no call waits for the approval"):  # answered already
        ruled.responses.create(model="helper", input=answer, previous_response_id=first.id)


async def test_a_pending_approval_nobody_answers_in_time_is_a_rejection() -> None:
    from qwenrun.approval import ApprovalRequest
    from qwenrun.events import ToolCall
    from qwenrun.frontends.openai.pending import Parked, ParkedTurn

    parked = Parked()
    turn = ParkedTurn("", 0.01, parked)
    answered = await asyncio.wait_for(turn.approve(ApprovalRequest(ToolCall("c1", "echo", {}))), 10)
    assert answered is False and parked.turns == {}
    with pytest.raises(APIError, match="no call waits for the approval"):
        parked.take("mcpr_x", "")

"""``frontend.kind: mcp`` on the scripted engine, with the official ``mcp`` client: in memory (the
SDK's connected client and server) for the protocol, and a real uvicorn server on 127.0.0.1 with
``streamable_http_client`` for what only HTTP has (the API key, the body limit, DNS rebinding,
elicitation over SSE). ``tests/test_mcp_server_stdio.py`` runs ``qwenrun up`` on stdio,
``tests/test_mcp_server_engine.py`` the real engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from loopback import serve_in_loop
from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError
from mcp.shared.memory import create_connected_server_and_client_session

from qwenrun.agent import Agent
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.errors import ConfigError
from qwenrun.frontends.mcp.http import create_app
from qwenrun.frontends.mcp.server import SESSION_META, AgentServer
from qwenrun.frontends.settings import McpFrontend
from qwenrun.sessions.sqlite import SQLiteStore
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.tools import Tool

QUESTION = "深圳天气如何?"
SENTENCE = "目前深圳多云到晴，气温28~31℃。"


def get_current_weather(city: str) -> str:
    """Get the current weather of a city.

    Args:
        city: The city, e.g. 深圳.
    """
    return f"目前{city}多云到晴，气温28~31℃。"


def delete_city(city: str) -> str:
    """Delete a city."""
    return f"{city} is gone"


def weather_then_answer(request: ModelRequest) -> str:
    """Call the weather tool on a new question, then answer with its result (after a thought)."""
    last = request.messages[-1]
    if last["role"] == "user":
        return tool_call_text("get_current_weather", {"city": "深圳"})
    return f"<think>The tool said it.</think>{last['content']}"


def echo(request: ModelRequest) -> str:
    """Answer with the number of user messages so far and the last one."""
    users = [m["content"] for m in request.messages if m["role"] == "user"]
    return f"{len(users)}: {users[-1]}"


def make_spec(**frontend: Any) -> AgentSpec:
    return AgentSpec.from_dict(
        {
            "model": {"path": "scripted"},
            "agent": {"name": "weather", "description": "Answers weather questions.", "timeout_s": 5},
            "frontend": {"kind": "mcp", **frontend},
        },
        source="tests/mcp-agent.yaml",
    )


def make_agent(
    tmp_path: Path, script: Any, *tools: Tool, delay_s: float = 0.0, store: bool = True, **frontend: Any
) -> Agent:
    spec = make_spec(**frontend)
    engine = ScriptedEngine(script, delay_s=delay_s)
    weather = tools or (Tool.from_function(get_current_weather),)
    return Agent(spec, engine, tools=list(weather), store=SQLiteStore(tmp_path / "sessions.db") if store else None)


def frontend_of(agent: Agent) -> McpFrontend:
    assert isinstance(agent.spec.frontend, McpFrontend)
    return agent.spec.frontend


@asynccontextmanager
async def connected(agent: Agent, **callbacks: Any) -> AsyncIterator[ClientSession]:
    """The official client, connected in memory to the agent's MCP server (started)."""
    core = AgentServer(agent, frontend_of(agent))
    await core.start()
    try:
        async with create_connected_server_and_client_session(core.server, **callbacks) as client:
            yield client
    finally:
        await agent.shutdown()


def text(result: types.CallToolResult) -> str:
    assert len(result.content) == 1 and isinstance(result.content[0], types.TextContent)
    return result.content[0].text


async def cancel(client: ClientSession, request_id: int) -> None:
    notification = types.CancelledNotification(
        params=types.CancelledNotificationParams(requestId=request_id, reason="the user stopped it")
    )
    await client.send_notification(types.ClientNotification(notification))


async def call_then_cancel(client: ClientSession, name: str, arguments: dict[str, Any], when: asyncio.Event) -> None:
    """Call a tool, and cancel the call once ``when`` is set. The SDK's ``call_tool`` neither sends
    ``notifications/cancelled`` nor tells its request id (python-sdk #230, #2507): the id is the
    session's next one, read just before the call."""
    request_id = client._request_id
    call = asyncio.ensure_future(client.call_tool(name, arguments))
    await asyncio.wait_for(when.wait(), 30)
    await cancel(client, request_id)
    with pytest.raises(McpError, match="Request cancelled"):
        await asyncio.wait_for(call, 30)


async def until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition did not hold in time")


# -- the tool, its answer, its session ------------------------------------------------------------


async def test_one_tool_answers_and_records_its_session(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, weather_then_answer)
    async with connected(agent) as client:
        info = client.get_server_capabilities()
        assert info is not None and info.tools is not None and info.logging is not None
        listed = (await client.list_tools()).tools
        assert [tool.name for tool in listed] == ["weather"]
        assert listed[0].description is not None and listed[0].description.startswith("Answers weather questions.")
        assert listed[0].inputSchema["required"] == ["message"]
        assert set(listed[0].inputSchema["properties"]) == {"message", "session_id"}
        result = await client.call_tool("weather", {"message": QUESTION})
    assert (text(result), result.isError) == (SENTENCE, False)
    assert result.structuredContent is None  # the agent file has no output schema
    assert result.meta is not None and result.meta["qwenrun/stop_reason"] == "answer"
    stored = agent.store.get(result.meta[SESSION_META]) if agent.store else None
    assert stored is not None and (stored.info.frontend, stored.info.agent, stored.info.title) == ("mcp", "weather", QUESTION)
    roles = [record.data.get("role") or record.data.get("type") for record in stored.records]
    assert roles == ["user", "assistant", "tool", "assistant", "final"]


async def test_a_session_id_continues_the_conversation(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, echo)
    async with connected(agent) as client:
        first = await client.call_tool("weather", {"message": "one"})
        assert first.meta is not None
        session_id = first.meta[SESSION_META]
        second = await client.call_tool("weather", {"message": "two", "session_id": session_id})
        fresh = await client.call_tool("weather", {"message": "three"})
        named = await client.call_tool("weather", {"message": "four", "session_id": "my-session"})
    assert [text(first), text(second), text(fresh), text(named)] == ["1: one", "2: two", "1: three", "1: four"]
    assert second.meta is not None and second.meta[SESSION_META] == session_id
    assert fresh.meta is not None and fresh.meta[SESSION_META] != session_id
    assert agent.store is not None and agent.store.load("my-session") == [
        {"role": "user", "content": "four"}, {"role": "assistant", "content": "1: four"}
    ]  # fmt: skip


# -- progress and log messages ---------------------------------------------------------------------


async def test_progress_and_log_messages_show_the_turn(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, weather_then_answer)
    logs: list[types.LoggingMessageNotificationParams] = []
    progress: list[tuple[float, str | None]] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params)

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    async with connected(agent, logging_callback=on_log) as client:
        result = await client.call_tool("weather", {"message": QUESTION}, progress_callback=on_progress)
        assert text(result) == SENTENCE
        kinds = [(entry.level, entry.data["type"]) for entry in logs]
        assert kinds[:2] == [("info", "tool_call"), ("info", "tool_result")]
        assert {kind for kind in kinds[2:]} == {("debug", "reasoning"), ("debug", "text")}
        assert logs[0].data["arguments"] == {"city": "深圳"} and logs[1].data["content"] == SENTENCE
        assert {entry.logger for entry in logs} == {"qwenrun.weather"}
        assert "".join(entry.data["text"] for entry in logs if entry.data["type"] == "text") == SENTENCE
        assert "".join(e.data["text"] for e in logs if e.data["type"] == "reasoning") == "The tool said it."
        assert progress == [
            (1, 'calling get_current_weather({"city": "深圳"})'),
            (2, f"get_current_weather returned: {SENTENCE}"),
            (3, "thinking"),
            (4, "writing the answer"),
        ]
        logs.clear()
        await client.set_logging_level("info")  # tool steps only
        await client.call_tool("weather", {"message": QUESTION})
        assert [entry.data["type"] for entry in logs] == ["tool_call", "tool_result"]
        logs.clear()
        await client.set_logging_level("warning")
        await client.call_tool("weather", {"message": QUESTION})
        assert logs == []


# -- cancellation and the time limit --------------------------------------------------------------


async def test_cancelling_the_request_cancels_the_turn(tmp_path: Path) -> None:
    long_answer = "word " * 400  # 2000 characters in 3-character chunks, 10 ms apart: 6 s
    agent = make_agent(tmp_path, lambda request: long_answer, delay_s=0.01)
    engine = agent.engine
    assert isinstance(engine, ScriptedEngine)
    writing = asyncio.Event()

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        if params.data["type"] == "text":
            writing.set()

    async with connected(agent, logging_callback=on_log) as client:
        await call_then_cancel(client, "weather", {"message": "talk", "session_id": "talky"}, writing)
        await until(lambda: engine.active == 0)  # the model call was stopped, not left running
        assert agent.store is not None
        agent.store.flush()
        stored = agent.store.get("talky")
        assert stored is not None
        assert stored.records[-1].data["type"] == "cancelled"
        partial = stored.records[-2].data
        assert partial["role"] == "assistant" and 0 < len(partial["content"]) < len(long_answer)
        # the session is free again and goes on
        agent.engine = ScriptedEngine(echo)
        again = await client.call_tool("weather", {"message": "again", "session_id": "talky"})
    assert text(again) == "2: again"


async def test_a_turn_past_its_time_limit_is_stopped(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, lambda request: "slow " * 1000, delay_s=0.01, turn_timeout_s=0.3)
    engine = agent.engine
    assert isinstance(engine, ScriptedEngine)
    async with connected(agent) as client:
        result = await client.call_tool("weather", {"message": "talk", "session_id": "late"})
    assert result.isError
    assert text(result) == "Error: the agent did not answer within 0.3 s (frontend.turn_timeout_s); the turn was stopped"
    assert result.meta is not None and result.meta[SESSION_META] == "late"
    assert engine.active == 0
    assert agent.store is not None
    stored = agent.store.get("late")
    assert stored is not None and stored.records[-1].data["type"] == "cancelled"


# -- bad requests and limits ----------------------------------------------------------------------

BAD = "Error: invalid arguments for weather: "


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({}, "message: expected the question as a non-empty string, got nothing"),
        ({"message": "  "}, "message: expected the question as a non-empty string, got str '  '"),
        ({"message": 42}, "message: expected the question as a non-empty string, got int '42'"),
        ({"message": "x" * 1001}, "message: 1001 bytes, more than frontend.max_request_bytes (1000)"),
        ({"message": "天" * 334}, "message: 1002 bytes, more than frontend.max_request_bytes (1000)"),
        ({"message": "hi", "sesion": "x"}, "unknown argument(s) 'sesion'; expected message and optionally session_id"),
        ({"message": "hi", "session_id": "a b"}, "session_id: expected 1 to 128 characters of A-Z a-z 0-9 _ . : -, got 'a b'"),
        ({"message": "hi", "session_id": 7}, "session_id: expected 1 to 128 characters of A-Z a-z 0-9 _ . : -, got '7'"),
    ],
)
async def test_bad_arguments_get_an_error_that_names_them(
    tmp_path: Path, arguments: dict[str, Any], error: str
) -> None:
    agent = make_agent(tmp_path, echo, max_request_bytes=1000)
    engine = agent.engine
    assert isinstance(engine, ScriptedEngine)
    async with connected(agent) as client:
        result = await client.call_tool("weather", arguments)
        assert (result.isError, text(result)) == (True, BAD + error)
        assert text(await client.call_tool("weather", {"message": "x" * 999})) == f"1: {'x' * 999}"
    assert len(engine.calls) == 1  # only the good call reached the model


async def test_unknown_tools_and_sessions_off(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, echo, store=False)
    async with connected(agent) as client:
        unknown = await client.call_tool("get_current_weather", {"city": "深圳"})
        off = await client.call_tool("weather", {"message": "hi", "session_id": "s1"})
        plain = await client.call_tool("weather", {"message": "hi"})
    assert text(unknown) == "Error: unknown tool 'get_current_weather'; this server offers: weather"
    assert text(off) == BAD + "session_id: agent 'weather' records no sessions (sessions.enabled is false in its file)"
    assert (plain.isError, text(plain)) == (False, "1: hi")


async def test_calls_beyond_the_limit_and_a_busy_session_are_refused(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, lambda request: "x" * 300, delay_s=0.01, max_concurrent_calls=2)
    engine = agent.engine
    assert isinstance(engine, ScriptedEngine)
    async with connected(agent) as client:
        first = asyncio.ensure_future(client.call_tool("weather", {"message": "a", "session_id": "s1"}))
        await until(lambda: engine.active == 1)
        busy = await client.call_tool("weather", {"message": "b", "session_id": "s1"})
        assert text(busy) == "Error: session 's1' has a turn in progress; retry when it ends"
        second = asyncio.ensure_future(client.call_tool("weather", {"message": "c"}))
        await until(lambda: engine.active == 2)
        third = await client.call_tool("weather", {"message": "d"})
        assert text(third) == (
            "Error: the server is busy: 2 calls are in progress (frontend.max_concurrent_calls: 2); retry later"
        )
        assert [text(await first), text(await second)] == ["x" * 300] * 2
        assert text(await client.call_tool("weather", {"message": "e", "session_id": "s1"})) == "x" * 300


# -- approval: elicitation, or a refusal ----------------------------------------------------------


def approval_script(request: ModelRequest) -> str:
    last = request.messages[-1]
    if last["role"] == "user":
        return tool_call_text("delete_city", {"city": "深圳"})
    return f"tool said: {last['content']}"


def asking_agent(tmp_path: Path, **frontend: Any) -> Agent:
    tools = (Tool.from_function(delete_city, approval="ask"), Tool.from_function(get_current_weather))
    return make_agent(tmp_path, approval_script, *tools, **frontend)


def elicitor(answers: list[types.ElicitResult], asked: list[str]) -> Any:
    async def elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return answers.pop(0)

    return elicit


async def test_an_ask_tool_asks_the_client_by_elicitation(tmp_path: Path) -> None:
    asked: list[str] = []
    answers = [
        types.ElicitResult(action="accept", content={"approve": True}),
        types.ElicitResult(action="decline"),
        types.ElicitResult(action="accept", content={"approve": False}),
        types.ElicitResult(action="cancel"),
    ]
    agent = asking_agent(tmp_path)
    async with connected(agent, elicitation_callback=elicitor(answers, asked)) as client:
        results = [text(await client.call_tool("weather", {"message": "delete it"})) for _ in range(4)]
    rejected = "tool said: Error: the user rejected this call of delete_city; it was not run."
    assert results == ["tool said: 深圳 is gone", rejected, rejected, rejected]
    assert asked == ["The agent 'weather' wants to run delete_city({\"city\": \"深圳\"}). Allow it?"] * 4


async def test_an_ask_tool_is_refused_where_the_client_cannot_be_asked(tmp_path: Path) -> None:
    agent = asking_agent(tmp_path)
    async with connected(agent) as client:  # no elicitation callback: no elicitation capability
        result = await client.call_tool("weather", {"message": "delete it"})
    assert text(result) == (
        "tool said: Error: delete_city needs a person's approval and nobody can give it here; the call was not run."
    )


async def test_an_unanswered_approval_is_refused_after_its_time_limit(tmp_path: Path) -> None:
    async def late(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        await asyncio.sleep(1.0)  # 5x the limit (the SDK's client handles one message at a time)
        return types.ElicitResult(action="accept", content={"approve": True})

    agent = asking_agent(tmp_path, approval_timeout_s=0.2)
    async with connected(agent, elicitation_callback=late) as client:
        result = await client.call_tool("weather", {"message": "delete it"})
    assert text(result) == "tool said: Error: the user rejected this call of delete_city; it was not run."


# -- expose_tools ---------------------------------------------------------------------------------


async def test_expose_tools_offers_the_agents_own_tools(tmp_path: Path) -> None:
    asked: list[str] = []
    denied = Tool.from_function(delete_city, name="drop_city", approval="deny")
    tools = (Tool.from_function(delete_city, approval="ask"), Tool.from_function(get_current_weather), denied)
    agent = make_agent(tmp_path, approval_script, *tools, expose_tools=True)
    answers = [types.ElicitResult(action="accept", content={}), types.ElicitResult(action="decline")]
    async with connected(agent, elicitation_callback=elicitor(answers, asked)) as asking:
        listed = {tool.name: tool for tool in (await asking.list_tools()).tools}
        assert list(listed) == ["weather", "delete_city", "get_current_weather", "drop_city"]
        assert listed["get_current_weather"].inputSchema["required"] == ["city"]
        assert listed["get_current_weather"].description == "Get the current weather of a city."
        weather = await asking.call_tool("get_current_weather", {"city": "广州"})
        assert (weather.isError, text(weather)) == (False, "目前广州多云到晴，气温28~31℃。")
        bad = await asking.call_tool("get_current_weather", {"town": "广州"})
        assert bad.isError and text(bad).startswith("Error: invalid arguments for get_current_weather")
        assert text(await asking.call_tool("delete_city", {"city": "广州"})) == "广州 is gone"
        declined = await asking.call_tool("delete_city", {"city": "广州"})
        assert text(declined) == "Error: the user rejected this call of delete_city; it was not run."
        drop = await asking.call_tool("drop_city", {"city": "广州"})
        assert text(drop) == "Error: drop_city is not allowed here (approval: deny); the call was not run."
    assert len(asked) == 2

    agent = make_agent(tmp_path, approval_script, *tools, expose_tools=True)
    async with connected(agent) as plain:
        refused = await plain.call_tool("delete_city", {"city": "广州"})
    assert (refused.isError, text(refused)) == (True, (
        "Error: delete_city needs a person's approval (approval: ask), and this client cannot be asked: "
        "it does not support MCP elicitation; the call was not run"
    ))  # fmt: skip


def test_the_agent_tool_may_not_clash_with_an_exposed_tool(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, echo, expose_tools=True, tool_name="get_current_weather")
    with pytest.raises(ConfigError, match=r"frontend\.tool_name: 'get_current_weather' is also the name of one"):
        AgentServer(agent, frontend_of(agent))
    named = make_agent(tmp_path, echo, tool_name="ask_weather")
    assert AgentServer(named, frontend_of(named)).tool_name == "ask_weather"


def test_an_api_key_needs_the_http_transport() -> None:
    with pytest.raises(ConfigError, match=r"frontend: Value error, api_key_env is for transport http"):
        make_spec(api_key_env="MCP_KEY")
    with pytest.raises(ConfigError, match=r"frontend.transport: Input should be 'stdio' or 'http'"):
        make_spec(transport="sse")


# -- streamable HTTP ------------------------------------------------------------------------------


@asynccontextmanager
async def http_server(agent: Agent) -> AsyncIterator[str]:
    async with serve_in_loop(create_app(agent, frontend_of(agent))) as url:
        yield url


@asynccontextmanager
async def http_client(url: str, key: str | None = None, **callbacks: Any) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    async with (
        httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30, read=300)) as http,
        streamable_http_client(f"{url}/mcp", http_client=http) as (reader, writer, _),
        ClientSession(reader, writer, **callbacks) as client,
    ):
        await client.initialize()
        yield client


async def test_http_answers_with_the_api_key_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEATHER_MCP_KEY", "s3cret")
    agent = make_agent(tmp_path, weather_then_answer, transport="http", api_key_env="WEATHER_MCP_KEY", port=0)
    progress: list[str | None] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message)

    async with http_server(agent) as url:
        async with httpx.AsyncClient() as raw:
            assert (await raw.get(f"{url}/health")).json() == {"status": "ok"}  # no key needed
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                refused = await raw.post(f"{url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers=headers)
                assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
                assert refused.json()["error"]["message"] in (
                    "Missing API key: send the header 'Authorization: Bearer <key>'", "Incorrect API key"
                )  # fmt: skip
        async with http_client(url, "s3cret") as client:
            assert [tool.name for tool in (await client.list_tools()).tools] == ["weather"]
            result = await client.call_tool("weather", {"message": QUESTION}, progress_callback=on_progress)
    assert text(result) == SENTENCE
    assert progress[:2] == ['calling get_current_weather({"city": "深圳"})', f"get_current_weather returned: {SENTENCE}"]


async def test_http_refuses_large_bodies_and_foreign_hosts(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, echo, transport="http", max_request_bytes=2000, port=0)
    async with http_server(agent) as url, httpx.AsyncClient() as raw:
        big = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "weather", "arguments": {"message": "x" * 3000}}}
        headers = {"Accept": "application/json, text/event-stream"}
        too_large = await raw.post(f"{url}/mcp", json=big, headers=headers)
        assert too_large.status_code == 413
        foreign = await raw.post(f"{url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                                 headers={**headers, "Host": "evil.example:80"})  # fmt: skip
        assert foreign.status_code == 421 and "Invalid Host header" in foreign.text
        page = await raw.post(f"{url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                              headers={**headers, "Origin": "http://evil.example"})  # fmt: skip
        assert page.status_code == 403 and "Invalid Origin header" in page.text
        async with http_client(url) as client:  # 127.0.0.1 is a local host
            assert text(await client.call_tool("weather", {"message": "hi"})) == "1: hi"


async def test_http_approval_by_elicitation(tmp_path: Path) -> None:
    asked: list[str] = []
    agent = asking_agent(tmp_path, transport="http", port=0)
    answers = [types.ElicitResult(action="accept", content={"approve": True})]
    async with http_server(agent) as url, http_client(url, elicitation_callback=elicitor(answers, asked)) as client:
        result = await client.call_tool("weather", {"message": "delete it"})
    assert text(result) == "tool said: 深圳 is gone"
    assert len(asked) == 1

"""``qwenrun up FILE --set frontend.kind=mcp`` as an MCP client starts it: a child process of the
test (``tests/mcp_agent.py``: the real CLI on a scripted model), with the official ``stdio_client``
and raw pipes; and ``qwenrun up`` of an HTTP server, which says where it listens."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import yaml
from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from test_mcp_server import call_then_cancel, text

from qwenrun.agent import Agent
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.frontends.mcp.server import SESSION_META
from qwenrun.sessions.sqlite import SQLiteStore
from qwenrun.spec.agent_file import AgentSpec

HELPER = str(Path(__file__).resolve().parent / "mcp_agent.py")


@pytest.fixture
def agent_file(tmp_path: Path) -> Path:
    """An agent file of the cli front end (the client switches it to mcp with --set)."""
    path = tmp_path / "shouter.yaml"
    data = {"model": {"path": "scripted"}, "agent": {"name": "shouter"}, "frontend": {"kind": "cli"},
            "sessions": {"path": str(tmp_path / "sessions.db")}}  # fmt: skip
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(HELPER).parent), **extra}


@asynccontextmanager
async def stdio_session(file: Path, errlog: IO[str], **callbacks: Any) -> AsyncIterator[ClientSession]:
    parameters = StdioServerParameters(
        command=sys.executable, args=[HELPER, "up", str(file), "--set", "frontend.kind=mcp"], env=environment()
    )
    async with stdio_client(parameters, errlog=errlog) as (reader, writer), ClientSession(reader, writer, **callbacks) as client:
        await client.initialize()
        yield client


async def test_the_official_stdio_client_lists_calls_streams_and_cancels(agent_file: Path, tmp_path: Path) -> None:
    logs: list[dict[str, Any]] = []
    writing = asyncio.Event()

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params.data)
        if params.data.get("type") == "text" and params.data.get("text", "").startswith("word"):
            writing.set()

    errors = tmp_path / "stderr.txt"
    with errors.open("w") as errlog:
        async with stdio_session(agent_file, errlog, logging_callback=on_log) as client:
            assert [tool.name for tool in (await client.list_tools()).tools] == ["shouter"]
            echo = await client.call_tool("shouter", {"message": "hello"})
            assert text(echo) == "You said: hello"
            shouted = await client.call_tool("shouter", {"message": "shout hi"})
            assert text(shouted) == "The tool said HI!"  # the tool's stdout did not break the protocol
            assert [entry["type"] for entry in logs if entry["type"] not in ("text", "reasoning")] == ["tool_call", "tool_result"]
            assert "".join(entry["text"] for entry in logs[-6:] if entry["type"] == "text").endswith("HI!")
            await call_then_cancel(client, "shouter", {"message": "slow", "session_id": "cancelled-one"}, writing)
            after = await client.call_tool("shouter", {"message": "still there?", "session_id": "cancelled-one"})
            assert text(after) == "You said: still there?"
    stderr = errors.read_text()
    command = f"qwenrun up {agent_file} --set frontend.kind=mcp"
    assert f"MCP server of agent 'shouter' on stdio; a client starts it with:\n  {command}\n" in stderr
    assert "NOISE from print" in stderr and "NOISE on fd 1" in stderr
    store = SQLiteStore(tmp_path / "sessions.db")
    stored = store.get(str(echo.meta[SESSION_META] if echo.meta else ""))
    assert stored is not None and stored.info.frontend == "mcp" and stored.info.title == "hello"
    cancelled = store.get("cancelled-one")
    assert cancelled is not None
    events = [record.data["type"] for record in cancelled.records if record.kind == "event"]
    assert events == ["cancelled", "final"]
    store.close()


def send(process: subprocess.Popen[bytes], message: dict[str, Any] | bytes) -> None:
    assert process.stdin is not None
    process.stdin.write(message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n")
    process.stdin.flush()


def receive(process: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, "the server closed its stdout"
    value: dict[str, Any] = json.loads(line)  # every byte on stdout is protocol
    return value


def start(file: Path, *extra: str, **env: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, HELPER, "up", str(file), "--set", "frontend.kind=mcp", *extra]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=environment(**env))  # fmt: skip


def test_a_line_over_the_limit_gets_an_error_and_closing_stdin_ends_the_server(agent_file: Path) -> None:
    with start(agent_file, "--set", "frontend.max_request_bytes=5000") as process:
        initialize = {"protocolVersion": types.LATEST_PROTOCOL_VERSION, "capabilities": {},
                      "clientInfo": {"name": "raw", "version": "0"}}  # fmt: skip
        send(process, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": initialize})
        assert receive(process)["result"]["serverInfo"]["name"] == "shouter"
        send(process, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        huge = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                "params": {"name": "shouter", "arguments": {"message": "x" * 20_000}}}  # fmt: skip
        send(process, huge)
        refused = receive(process)
        assert refused == {"jsonrpc": "2.0", "id": 7, "error": {
            "code": types.INVALID_REQUEST, "message": "the request is larger than frontend.max_request_bytes (5000 bytes)"}}  # fmt: skip
        call = {"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "shouter", "arguments": {"message": "hi"}}}
        send(process, call)
        while "id" not in (answer := receive(process)):  # log notifications come first
            assert answer["method"] == "notifications/message"
        assert answer["id"] == 8 and answer["result"]["content"][0]["text"] == "You said: hi"
        assert process.stdin is not None
        process.stdin.close()  # the client is done
        assert process.wait(60) == 0
        assert process.stderr is not None
        assert "Ready in" in process.stderr.read().decode()


def test_an_engine_that_does_not_start_ends_the_server_with_an_error(agent_file: Path) -> None:
    with start(agent_file, QWENRUN_TEST_ENGINE_FAILS="1") as process:
        assert process.wait(60) == 1  # while the client says nothing (its stdin stays open)
        assert process.stderr is not None
        assert "Error: the scripted engine refuses to start" in process.stderr.read().decode()


async def test_up_with_http_says_where_it_listens(agent_file: Path, tmp_path: Path) -> None:
    command = [sys.executable, HELPER, "up", str(agent_file), "--set", "frontend.kind=mcp",
               "--set", "frontend.transport=http", "--set", "frontend.port=0",
               "--set", "frontend.api_key_env=SHOUT_KEY"]  # fmt: skip
    errors = (tmp_path / "stderr.txt").open("w+")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, env=environment(SHOUT_KEY="k3y"))
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"at (http://127\.0\.0\.1:\d+/mcp), tool 'shouter'; send the header "
                                      r"'Authorization: Bearer \$SHOUT_KEY'", Path(errors.name).read_text())):  # fmt: skip
            assert process.poll() is None and time.monotonic() < deadline, Path(errors.name).read_text()
            await asyncio.sleep(0.1)
        url = found.group(1)
        while "Application startup complete" not in Path(errors.name).read_text():
            assert process.poll() is None and time.monotonic() < deadline, Path(errors.name).read_text()
            await asyncio.sleep(0.1)
        headers = {"Authorization": "Bearer k3y"}
        async with (
            httpx.AsyncClient(headers=headers) as http,
            streamable_http_client(url, http_client=http) as (reader, writer, _),
            ClientSession(reader, writer) as client,
        ):
            await client.initialize()
            assert text(await client.call_tool("shouter", {"message": "over http"})) == "You said: over http"
    finally:
        process.terminate()
        process.wait(30)
        errors.close()


def turn_ends(store: SQLiteStore) -> list[str]:
    """How the turns of every stored session ended (``final``, ``cancelled``, ``error``)."""
    stored = [store.get(info.id) for info in store.list()]
    return [record.data["type"] for one in stored if one for record in one.records if record.kind == "event"]


async def test_an_agent_that_gives_up_a_call_cancels_the_turn_of_the_agent_it_called(
    agent_file: Path, tmp_path: Path
) -> None:
    """A qwenrun agent (scripted, here) uses the shouter through an `mcp:` entry; when its call
    passes its time limit, qwenrun's client sends notifications/cancelled, and the shouter stops
    the turn (its 10 s answer would otherwise end as `final`) and answers the next call."""
    entry = {"name": "shouter", "command": sys.executable, "args": [HELPER, "up", str(agent_file), "--set", "frontend.kind=mcp"]}
    spec = AgentSpec.from_dict(
        {"model": {"path": "scripted"}, "agent": {"name": "caller"}, "sessions": {"enabled": False},
         "tools": [{"mcp": entry, "timeout_s": 1}]},
        source="tests/caller.yaml",
    )  # fmt: skip

    def script(request: ModelRequest) -> str:
        last = request.messages[-1]
        if last["role"] == "user":
            return tool_call_text("shouter", {"message": str(last["content"])})
        return f"shouter: {last['content']}"

    store = SQLiteStore(tmp_path / "sessions.db")
    async with Agent(spec, ScriptedEngine(script), tools=[]) as caller:
        given_up = await caller.session(record=False).ask("slow")
        assert given_up.text == "shouter: Error: shouter timed out after 1 s"
        for _ in range(600):  # the shouter's turn ends soon after: cancelled, not answered in 10 s
            if ended := turn_ends(store):
                break
            await asyncio.sleep(0.1)
        assert ended == ["cancelled"]
        answered = await caller.session(record=False).ask("shout hi")
    assert answered.text == "shouter: The tool said HI!"
    store.close()

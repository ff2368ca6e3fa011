"""MCP servers as tools, without an engine: the test server of ``tests/mcp_server.py`` (FastMCP) as
a real child process over stdio and as a real streamable HTTP server on 127.0.0.1, driven through
:class:`~qwenrun.mcp.toolset.McpToolset` and ``run_call`` as the agent loop drives them.

Faults: a server that fails to start, dies mid-call, hangs a call, freezes, returns a huge result or
an error, or lists malformed schemas. Each test checks that the error is readable, that the server
comes back where it should, and that no process of it is left (pid files; a child it started in a
session of its own must go too). pytest's ``-W error`` turns unclosed streams into failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp_fixtures import free_port, http_server, stdio

from qwenrun.agent import Agent
from qwenrun.engines.scripted import ScriptedEngine, tool_call_text
from qwenrun.errors import ConfigError, ToolError
from qwenrun.events import ParsedCall, ToolResult
from qwenrun.mcp import connection, processes
from qwenrun.mcp.processes import alive
from qwenrun.mcp.toolset import McpToolset, result_text
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.tools import Tool, run_call


@pytest.fixture(autouse=True)
def nothing_unclosed() -> Iterator[None]:
    """After each test: collecting garbage warns of no unclosed stream, file or socket."""
    yield
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def spec_of(*entries: Any) -> AgentSpec:
    return AgentSpec.from_dict({"model": {"path": "m"}, "tools": list(entries)}, source="tests/mcp.yaml")


@asynccontextmanager
async def toolset(*entries: Any, tools: dict[str, Tool] | None = None) -> AsyncIterator[tuple[McpToolset, dict[str, Tool]]]:
    found: dict[str, Tool] = {} if tools is None else tools
    servers = McpToolset(spec_of(*entries))
    await servers.start(found)
    try:
        yield servers, found
    finally:
        await servers.close()


async def call(tools: dict[str, Tool], name: str, limit: int = 16_000, **arguments: Any) -> ToolResult:
    return await run_call(tools, ParsedCall("call-1", name, arguments, ""), timeout_s=10, limit=limit)


def pids(path: Path) -> list[int]:
    return [int(pid) for pid in path.read_text().split()]


async def until(condition: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.05)


# -- stdio -------------------------------------------------------------------------------------


async def test_stdio_tools_come_from_the_server_filtered_prefixed_and_callable(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    entry = stdio(
        "--pid-file", str(pid_file),
        allow=["add", "echo", "fail", "huge"], prefix="t_",
        approval={"echo": "ask"}, timeout_s=3,
    )  # fmt: skip
    async with toolset(entry) as (servers, tools):
        assert sorted(tools) == ["t_add", "t_echo", "t_fail", "t_huge"]
        add = tools["t_add"]
        assert add.description.startswith("Add two integers.")
        assert add.parameters["required"] == ["a", "b"]
        assert add.parameters["properties"]["a"]["type"] == "integer"
        assert add.openai_schema()["function"]["name"] == "t_add"
        assert (add.origin, add.timeout_s) == ("MCP server 'test' (tools[0])", 3)
        assert (add.approval, tools["t_echo"].approval) == ("auto", "ask")
        added = await call(tools, "t_add", a=2, b=3)
        assert (added.id, added.name, added.content, added.is_error) == ("call-1", "t_add", "5", False)
        bad = await call(tools, "t_add", a="two")
        assert bad.is_error and bad.content == (
            "Error: invalid arguments for t_add: arguments: 'b' is a required property; "
            "a: 'two' is not of type 'integer'"
        )
        failed = await call(tools, "t_fail", reason="the disk is full")
        assert failed.is_error and failed.content.startswith("Error: ")
        assert "it failed because the disk is full" in failed.content
        huge = await call(tools, "t_huge", limit=1000, size=2_000_000)
        assert not huge.is_error and len(huge.content) < 1100
        assert huge.content.endswith("[truncated: 1999000 more characters of 2000000 not shown]")
        assert servers.problems["test"] == []
        [server] = pids(pid_file)
        assert alive(server)
    assert not alive(server)


async def test_a_stdio_server_gets_only_the_environment_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENRUN_TEST_PASSED", "yes")
    monkeypatch.setenv("QWENRUN_TEST_SECRET", "s3cret")
    entry = stdio(allow=["describe_env"])
    entry["mcp"] |= {"env": {"PLAIN": "1"}, "pass_env": ["QWENRUN_TEST_PASSED"]}
    async with toolset(entry) as (_, tools):
        names = (await call(tools, "describe_env")).content.split(",")
    assert {"PLAIN", "QWENRUN_TEST_PASSED", "PATH", "HOME"} <= set(names)
    assert "QWENRUN_TEST_SECRET" not in names


async def test_a_server_that_fails_to_start_is_reported_and_the_agent_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = {"mcp": {"name": "missing", "command": str(tmp_path / "no-such-server")}}
    quits = stdio("--exit-at-start", name="quits")
    unset = stdio(name="unset")
    unset["mcp"]["pass_env"] = ["QWENRUN_TEST_NOT_SET"]
    mute = {"mcp": {"name": "mute", "command": "sleep", "args": ["600"]}, "startup_timeout_s": 1}
    async with toolset(missing, quits, unset, mute, stdio(name="fine", allow=["add"])) as (servers, tools):
        assert list(tools) == ["add"]  # the working server's tools are there
        assert servers.connections[4].state == "ready"
        first = {}
        for record in caplog.records:
            first.setdefault(record.getMessage().split("'")[1], record.getMessage())
        assert "failed to start: FileNotFoundError: [Errno 2] No such file or directory" in first["missing"]
        assert first["missing"].endswith("; restarting in 0.5 s")  # retried with backoff
        assert first["quits"].endswith(
            "failed to start: the server closed the connection; its stderr ends with:\n"
            "  config error: the test server was told to exit at start; restarting in 0.5 s"
        )
        assert first["unset"].endswith(  # a missing variable is not retried
            "failed to start: tests/mcp.yaml: tools[2].mcp.pass_env: environment variable "
            "QWENRUN_TEST_NOT_SET is not set or empty; MCP server 'unset' needs it (pass_env)"
        )
        assert first["mute"].endswith("failed to start: no answer to initialize and tools/list within 1 s; "
                                      "restarting in 0.5 s")  # fmt: skip
        assert servers.connections[2].state == "down"
        with pytest.raises(ToolError, match=r"(?s)^MCP server 'quits' is not running: .*exit at start"):
            await servers.connections[1].call_tool("add", {})
    assert [c.state for c in servers.connections] == ["stopped"] * 5
    assert not processes.marked(servers.connections[3].marker)  # the mute one was killed


async def test_a_server_that_dies_mid_call_is_restarted_and_leaves_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pid_file = tmp_path / "pid"
    async with toolset(stdio("--pid-file", str(pid_file), "--spawn-child")) as (servers, tools):
        first = pids(pid_file)
        died = await call(tools, "die")
        assert died.is_error
        assert died.content == "Error: MCP server 'test' closed the connection during the call; it is restarted"
        server = servers.connections[0]
        await until(lambda: server.failures == 1 and server.state == "ready")
        [crash] = [r.getMessage() for r in caplog.records if " stopped: " in r.getMessage()]
        assert crash.startswith("MCP server 'test' (tests/mcp.yaml: tools[0]) stopped: the server ")
        assert crash.endswith("its stderr ends with:\n  dying on purpose; restarting in 0.5 s")
        assert "MCP server 'test' left process" in caplog.text  # the child in a session of its own
        assert not any(alive(pid) for pid in first)  # the server and the child it left are gone
        assert (await call(tools, "add", a=1, b=1)).content == "2"
        second = pids(pid_file)
        assert second[0] != first[0]
    assert not any(alive(pid) for pid in second)


async def test_a_hung_call_hits_the_time_limit_and_the_server_goes_on() -> None:
    async with toolset(stdio(timeout_s=1)) as (servers, tools):
        hung = await asyncio.wait_for(call(tools, "hang"), 30)  # the tool sleeps an hour
        assert hung.is_error and hung.content == "Error: hang timed out after 1 s"
        assert (await call(tools, "add", a=2, b=2)).content == "4"
        await asyncio.sleep(0.3)  # the ping after the timed-out call is answered: no restart
        assert (servers.connections[0].failures, servers.connections[0].state) == (0, "ready")


async def test_a_frozen_server_is_restarted_and_close_kills_a_frozen_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(connection, "PING_TIMEOUT_S", 0.5)
    pid_file = tmp_path / "pid"
    async with toolset(stdio("--pid-file", str(pid_file), timeout_s=1)) as (servers, tools):
        first = pids(pid_file)
        frozen = await call(tools, "freeze")
        assert frozen.content == "Error: freeze timed out after 1 s"
        server = servers.connections[0]
        await until(lambda: server.failures == 1 and server.state == "ready")
        assert "stopped: it did not answer a ping within 0.5 s after a call failed" in caplog.text
        assert not any(alive(pid) for pid in first)
        assert (await call(tools, "add", a=3, b=4)).content == "7"
        second = pids(pid_file)
        assert (await call(tools, "freeze")).is_error  # frozen again when the agent stops
        await asyncio.wait_for(servers.close(), 60)  # stdin closed, 2 s, SIGTERM (it would sleep an hour)
        assert not any(alive(pid) for pid in second)


async def test_malformed_schemas_and_names_are_left_out_and_reported() -> None:
    async with toolset(stdio("--malformed", "--stdout-noise", allow=None)) as (servers, tools):
        assert "echo" in tools and not {"broken_schema", "string_schema"} & set(tools)
        assert not any(name.startswith("bad") for name in tools)
        problems = "\n".join(servers.problems["test"])
        assert "tool 'broken_schema': its input schema is not a valid JSON Schema" in problems
        assert "tool 'string_schema': its input schema has type 'string', not 'object'" in problems
        assert "tool 'bad name\\x1b[31m' is left out: not a usable tool name" in problems
        assert (await call(tools, "echo", text="still fine")).content == "still fine"


async def test_names_in_allow_deny_or_approval_that_the_server_lacks_are_reported() -> None:
    async with toolset(stdio(deny=["die", "nope"], approval={"add": "deny", "gone": "ask"})) as (servers, tools):
        assert "die" not in tools and "freeze" in tools
        [first, second] = servers.problems["test"]
        assert first.startswith("`deny` names 'nope', which the server does not have (it has: add, ")
        assert second.startswith("`approval` names 'gone', which the server does not have")
        assert tools["add"].approval == "deny"


async def test_a_name_clash_is_a_config_error_naming_both_sources() -> None:
    def add(a: int, b: int) -> int:
        """Add."""
        return a + b

    mine = {"add": Tool.from_function(add, origin="my-plugin 1.0")}
    with pytest.raises(ConfigError) as clash:
        async with toolset(stdio(allow=["echo", "add"]), tools=mine):
            pass
    assert str(clash.value) == (
        "tests/mcp.yaml: tools[0]: tool 'add' of MCP server 'test' clashes with 'add' of my-plugin 1.0; "
        "set `prefix:` on the server or leave the tool out with `deny:`"
    )
    with pytest.raises(ConfigError) as clash:  # the full lists are known at start only
        async with toolset(stdio(name="one", allow=["echo"]), stdio(name="two", deny=["hang"])):
            pass
    assert str(clash.value) == (
        "tests/mcp.yaml: tools[1]: tool 'echo' of MCP server 'two' clashes with 'echo' of MCP server 'one' "
        "(tools[0]); set `prefix:` on the server or leave the tool out with `deny:`"
    )
    async with toolset(stdio(name="one", allow=["echo"]), stdio(name="two", allow=["echo"], prefix="two_")) as (
        _, tools
    ):
        assert sorted(tools) == ["echo", "two_echo"]


def test_the_file_names_the_server_and_its_secrets_by_variable() -> None:
    spec = spec_of(
        "get_current_weather",
        {"mcp": {"name": "files", "url": "http://127.0.0.1:9/mcp", "headers_env": {"Authorization": "TOKEN"}},
         "allow": ["read_file"], "approval": "ask", "timeout_s": 5},
    )  # fmt: skip
    assert [index for index, _ in spec.plugin_tools] == [0]
    [(index, entry)] = spec.mcp_servers
    assert (index, entry.name, entry.describe(), entry.approval_of("read_file")) == (
        1, "files", "http: http://127.0.0.1:9/mcp", "ask",
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"tools\[0\].mcp.headers_env: Value error, must be the name of an "
                       "environment variable"):  # fmt: skip
        spec_of({"mcp": {"name": "f", "url": "http://h/mcp", "headers_env": {"Authorization": "Bearer abc"}}})
    with pytest.raises(ConfigError, match=r"tools\[0\].mcp: expected `command` \(a stdio server\) or `url`"):
        spec_of({"mcp": {"name": "f"}})
    with pytest.raises(ConfigError, match=r"tools\[1\].mcp.name: 'a' is also the name of tools\[0\]"):
        spec_of(stdio(name="a"), stdio(name="a"))
    with pytest.raises(ConfigError, match=r"tools\[1\].allow: tool 'get_current_weather' of tools\[1\] \(MCP "
                       r"server 'w'\) clashes with 'get_current_weather' of tools\[0\] \(an entry-point tool\)"):
        spec_of("get_current_weather", stdio(name="w", allow=["get_current_weather"]))


# -- streamable HTTP ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    with http_server(free_port()) as url:
        yield url


async def test_streamable_http_tools_and_secret_headers(http_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWENRUN_TEST_TOKEN", "Bearer t0ken")
    entry = {
        "mcp": {"name": "web", "url": http_url, "headers_env": {"Authorization": "QWENRUN_TEST_TOKEN"}},
        "allow": ["add", "whoami", "fail"],
    }
    async with toolset(entry) as (_, tools):
        assert sorted(tools) == ["add", "fail", "whoami"]
        assert (await call(tools, "add", a=20, b=22)).content == "42"
        assert (await call(tools, "whoami")).content == "Bearer t0ken"
        failed = await call(tools, "fail", reason="no")
        assert failed.is_error and "it failed because no" in failed.content


async def test_an_http_server_that_goes_away_is_reconnected_with_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connection, "PING_TIMEOUT_S", 1)
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    servers = McpToolset(spec_of({"mcp": {"name": "web", "url": url}, "allow": ["add", "die"], "timeout_s": 1}))
    tools: dict[str, Tool] = {}
    try:
        with http_server(port):
            await servers.start(tools)
            server = servers.connections[0]
            died = await call(tools, "die")  # the server exits mid-call: the call never gets an answer
        assert died.is_error and died.content == "Error: die timed out after 1 s"
        await until(lambda: server.state == "down")
        down = await call(tools, "add", a=1, b=2)
        assert down.is_error and down.content.startswith("Error: MCP server 'web' is not running: ")
        assert "ConnectError" in down.content or "closed the connection" in down.content
        with http_server(port):  # it comes back on the same address
            await until(lambda: server.state == "ready", timeout=40)
            assert (await call(tools, "add", a=1, b=2)).content == "3"
    finally:
        await servers.close()
    assert server.failures >= 1


# -- notifications/tools/list_changed ------------------------------------------------------------


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_tools_list_changed_refreshes_the_agents_tools(transport: str) -> None:
    """The server adds a tool, removes one and describes one anew, then sends
    notifications/tools/list_changed: the agent's tools, and the tools the model is shown, follow
    (no restart); a tool that did not change stays the same object."""
    with contextlib.ExitStack() as stack:
        if transport == "stdio":
            entry = stdio("--changing")
        else:
            entry = {"mcp": {"name": "test", "url": stack.enter_context(http_server(free_port(), "--changing"))}}
        script = [tool_call_text("reshape", {}), "reshaped", tool_call_text("multiply", {"a": 6, "b": 7}), "42"]
        agent = Agent(spec_of(entry), ScriptedEngine(script))
        async with agent:
            assert {"add", "echo", "note", "reshape"} <= set(agent.tools) and "multiply" not in agent.tools
            add, note = agent.tools["add"], agent.tools["note"]
            assert (await agent.ask("reshape yourself")).text == "reshaped"
            await until(lambda: "multiply" in agent.tools)
            assert "echo" not in agent.tools and agent.tools["note"] is note
            assert agent.tools["add"] is not add
            assert agent.tools["add"].description == "Add two integers (described anew by reshape)."
            assert (await agent.ask("6 * 7?")).text == "42"
            engine = agent.engine
            assert isinstance(engine, ScriptedEngine)
            shown = [tool["function"]["name"] for tool in engine.calls[2].tools or []]
            assert "multiply" in shown and "echo" not in shown
            assert engine.calls[3].messages[-1]["content"] == "42"  # multiply ran on the server
            assert agent.mcp.connections[0].failures == 0


def test_results_become_text_for_the_model() -> None:
    from mcp import types

    mixed = types.CallToolResult(
        content=[
            types.TextContent(type="text", text="first"),
            types.ImageContent(type="image", data="aGVsbG8h", mimeType="image/png"),
            types.EmbeddedResource(
                type="resource",
                resource=types.TextResourceContents(uri="file:///notes.txt", text="inside", mimeType="text/plain"),
            ),
            types.EmbeddedResource(
                type="resource",
                resource=types.BlobResourceContents(uri="file:///a.bin", blob="AAAA", mimeType=None),
            ),
            types.ResourceLink(type="resource_link", uri="file:///b.txt", name="b.txt"),
        ]
    )
    assert result_text(mixed) == (
        "first\n(image image/png, about 6 bytes: not shown)\ninside\n"
        "(resource file:///a.bin, binary data: not shown)\n(resource file:///b.txt: b.txt)"
    )
    structured = types.CallToolResult(content=[], structuredContent={"时间": "12:00"})
    assert result_text(structured) == '{"时间": "12:00"}'
    assert result_text(types.CallToolResult(content=[])) is None


async def test_the_agent_starts_and_stops_its_servers_and_checks_tool_choice_then() -> None:
    data = {"model": {"path": "m"}, "agent": {"tool_choice": "echo"}, "tools": [stdio(allow=["echo"])]}
    script = [tool_call_text("echo", {"text": "回声"}), "done"]
    agent = Agent(AgentSpec.from_dict(data), ScriptedEngine(script))  # valid: echo is known at start
    async with agent:
        final = await agent.ask("say it")
        assert (final.text, final.tool_calls) == ("done", 1)
        assert agent.engine.calls[1].messages[-1]["content"] == "回声"  # type: ignore[attr-defined]
    assert agent.mcp.connections[0].state == "stopped"
    wrong = Agent(AgentSpec.from_dict({**data, "agent": {"tool_choice": "nope"}}), ScriptedEngine([]))
    with pytest.raises(ConfigError, match=r"agent.tool_choice: 'nope' is not a tool of this agent \(tools: echo\)$"):
        await wrong.start()
    assert wrong.mcp.connections[0].state == "stopped"  # a failed start stops the servers

"""Fault injection: tools that misbehave in every way we could think of, and engines that die.

* Faulty tools on the agent loop (scripted engine): each fault ends as one bounded tool result the
  model reads (an ``Error: ...`` or a value with a note), with its exact text asserted; the turn
  ends, and the same session answers the next turn. Sync tools that never return hold no shared
  worker (a healthy tool still runs after many of them hung) and never keep the process alive.
* Engine faults: an engine refusing a request, dying mid-answer, or already dead; a vLLM engine
  (a small fake of vLLM's AsyncLLM) whose engine core dies. The agent raises EngineError, the CLI
  prints the error and exits 1, the server answers 503 (or, once a stream has started, ends it
  with an error event) and ``/health`` turns 503. Every wait has a time limit.

The numbers of faults are figures of docs/reliability.md (see test_reliability_doc).
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from fastapi import FastAPI
from loopback import serve_in_loop
from test_reliability_doc import figure, record

from qwenrun.agent import Agent
from qwenrun.cli import common as cli
from qwenrun.cli import main as cli_main
from qwenrun.engines.base import Delta, Request
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.engines.vllm import engine as engine_module
from qwenrun.engines.vllm.engine import VLLMEngine
from qwenrun.errors import EngineError
from qwenrun.events import Event, Final, ToolResult
from qwenrun.frontends.openai import create_app
from qwenrun.spec.agent_file import AgentSpec

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 120  # agent.max_tool_output_chars of these tests
TIMEOUT = 0.2  # agent.timeout_s of these tests
TEN_MB = figure("tool_big_result_bytes")  # 10 MB

RELEASE = threading.Event()  # lets the hung sync tools end when this module is done
STUBBORN = threading.Event()  # set: the cancellation-swallowing tool keeps going


@pytest.fixture(autouse=True, scope="module")
def _release_hung_tools() -> Iterator[None]:
    STUBBORN.set()
    yield
    STUBBORN.clear()
    RELEASE.set()


# -- the faulty tools -----------------------------------------------------------------------------


class BadMessage(Exception):
    def __str__(self) -> str:
        raise RuntimeError("the message itself is broken")


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("__str__ broke")


def raises() -> str:
    """Fails."""
    raise RuntimeError("kaput")


def raises_unprintable() -> str:
    """Fails with an exception that cannot be printed."""
    raise BadMessage()


def raises_huge() -> str:
    """Fails with a 10 MB message."""
    raise ValueError("x" * TEN_MB)


async def hangs_async() -> str:
    """Never returns (but can be cancelled)."""
    await asyncio.Event().wait()
    return "never"


async def hangs_stubborn() -> str:
    """Never returns and swallows cancellation (a bare ``except:`` around an await)."""
    while STUBBORN.is_set():
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            continue
    return "released"


def hangs_sync() -> str:
    """Blocks its thread until the test module ends."""
    RELEASE.wait()
    return "released"


def returns_10mb() -> str:
    """A 10 MB answer."""
    return "x" * TEN_MB


def returns_bytes() -> bytes:
    """Binary data."""
    return b"\x00\xff" * (TEN_MB // 2)


def returns_dict() -> dict[str, Any]:
    """A mapping."""
    return {"city": "广州", "temperature": 25.5, "tags": ["sunny"], "when": None}


def returns_none() -> None:
    """Nothing."""


def returns_unprintable() -> object:
    """An object whose __str__ raises."""
    return Unprintable()


def returns_cycle() -> object:
    """A list that contains itself."""
    cycle: list[Any] = []
    cycle.append(cycle)
    return cycle


def returns_huge_int() -> int:
    """An integer with 5,000 digits."""
    return 10**4999


def prints() -> str:
    """Writes to stdout and stderr, then answers."""
    print("noise on stdout")
    print("noise on stderr", file=sys.stderr)
    return "printed"


def exits() -> str:
    """Calls sys.exit in its worker thread."""
    sys.exit(3)


def exits_thread() -> str:
    """Ends its thread the low-level way."""
    _thread.exit()
    return "never"


def interrupts() -> str:
    """Raises KeyboardInterrupt in its worker thread."""
    raise KeyboardInterrupt


async def exits_async() -> str:
    """Calls sys.exit inside the event loop."""
    sys.exit("bye")


def raises_stop_iteration() -> str:
    """Calls next() on an exhausted iterator (a Future cannot carry StopIteration)."""
    return str(next(iter([])))


async def cancels_itself() -> str:
    """Raises CancelledError without being cancelled."""
    raise asyncio.CancelledError("from inside the tool")


def _truncated(text: str) -> str:
    return f"{text[:LIMIT]}\n[truncated: {len(text) - LIMIT} more characters of {len(text)} not shown]"


@dataclass(frozen=True)
class Fault:
    tool: Callable[..., Any]
    expected: str
    is_error: bool = True


FAULTS = [
    Fault(raises, "Error: RuntimeError: kaput"),
    Fault(raises_unprintable, "Error: BadMessage: (the message cannot be printed: RuntimeError)"),
    Fault(raises_huge, _truncated("Error: ValueError: " + "x" * TEN_MB)),
    Fault(hangs_async, f"Error: hangs_async timed out after {TIMEOUT:g} s"),
    Fault(hangs_stubborn, f"Error: hangs_stubborn timed out after {TIMEOUT:g} s"),
    Fault(hangs_sync, f"Error: hangs_sync timed out after {TIMEOUT:g} s"),
    Fault(returns_10mb, _truncated("x" * TEN_MB), False),
    Fault(returns_bytes, f"(the tool returned {TEN_MB} bytes of binary data, not shown)", False),
    Fault(returns_dict, '{"city": "广州", "temperature": 25.5, "tags": ["sunny"], "when": null}', False),
    Fault(returns_none, "(the tool returned nothing)", False),
    Fault(returns_unprintable, "Error: RuntimeError: __str__ broke"),
    Fault(returns_cycle, "(the tool returned an unprintable list: Circular reference detected)", False),
    Fault(
        returns_huge_int,
        _truncated(
            "(the tool returned an unprintable int: Exceeds the limit (4300 digits) for integer string "
            "conversion; use sys.set_int_max_str_digits() to increase the limit)"
        ),
        False,
    ),
    Fault(prints, "printed", False),
    Fault(exits, "Error: exits raised SystemExit(3); a tool must return a value or raise an Exception"),
    Fault(
        exits_thread,
        "Error: exits_thread raised SystemExit(); a tool must return a value or raise an Exception",
    ),
    Fault(
        interrupts,
        "Error: interrupts raised KeyboardInterrupt(); a tool must return a value or raise an Exception",
    ),
    Fault(
        exits_async,
        "Error: exits_async raised SystemExit('bye'); a tool must return a value or raise an Exception",
    ),
    Fault(cancels_itself, "Error: cancels_itself was cancelled"),
    Fault(raises_stop_iteration, "Error: StopIteration: "),
]


def fault_agent(*tools: Callable[..., Any]) -> tuple[Agent, ScriptedEngine]:
    """An agent whose model calls every tool once on the first turn, then answers plainly."""

    def script(request: ModelRequest) -> str:
        last = request.messages[-1]
        if last["role"] == "user" and last["content"] == "use the tools":
            return "\n".join(tool_call_text(tool.__name__, {}) for tool in tools)
        return "second answer" if last["content"] == "and now?" else "first answer"

    spec = AgentSpec.from_dict(
        {"model": {"path": "scripted"},
         "agent": {"timeout_s": TIMEOUT, "max_tool_output_chars": LIMIT, "max_iterations": 3}}
    )  # fmt: skip
    engine = ScriptedEngine(script)
    return Agent(spec, engine, tools=list(tools)), engine


def test_the_fault_count_is_the_doc_figure(tmp_path_factory: pytest.TempPathFactory) -> None:
    record(tmp_path_factory, tool_faults=len(FAULTS))
    assert len(FAULTS) == figure("tool_faults")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fault", FAULTS, ids=[fault.tool.__name__ for fault in FAULTS])
async def test_a_faulty_tool_never_breaks_the_session(
    fault: Fault, capfd: pytest.CaptureFixture[str]
) -> None:
    agent, engine = fault_agent(fault.tool)
    session = agent.session()

    async def turn() -> list[Event]:
        return [event async for event in session.stream("use the tools")]

    # a hung tool never returns: a turn that waited for it beyond its time limit would never end
    events = await asyncio.wait_for(turn(), 100 * TIMEOUT)
    results = [event for event in events if isinstance(event, ToolResult)]
    assert [(result.content, result.is_error) for result in results] == [(fault.expected, fault.is_error)]
    assert engine.calls[1].messages[-1] == {
        "role": "tool", "tool_call_id": results[0].id, "name": fault.tool.__name__, "content": fault.expected,
    }  # fmt: skip
    assert isinstance(events[-1], Final) and events[-1].text == "first answer"
    second = await asyncio.wait_for(session.ask("and now?"), 5)
    assert second.text == "second answer"
    assert [m["role"] for m in session.messages] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
    ]
    if fault.tool is prints:
        out, err = capfd.readouterr()
        assert "noise on stdout" in out and "noise on stderr" in err


@pytest.mark.timeout(30)
async def test_hung_sync_tools_hold_no_shared_worker(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Many sync tools hung at once (more than any default thread pool has workers): each is
    abandoned after its time limit on a daemon thread of its own; a healthy sync tool still runs."""
    count = figure("tool_hung_threads")

    def quick() -> str:
        """Answers at once."""
        return "quick"

    def hangs_sync_n(n: int) -> str:
        """Blocks its thread until the test module ends (``n`` tells the calls apart: identical calls run once)."""
        RELEASE.wait()
        return "released"

    def script(request: ModelRequest) -> str:
        last = request.messages[-1]
        if last["role"] == "user" and last["content"] == "hang":
            return "\n".join(tool_call_text("hangs_sync_n", {"n": n}) for n in range(count))
        if last["role"] == "user" and last["content"] == "quick":
            return tool_call_text("quick", {})
        return "done"

    spec = AgentSpec.from_dict({"model": {"path": "scripted"}, "agent": {"timeout_s": TIMEOUT}})
    agent = Agent(spec, ScriptedEngine(script), tools=[hangs_sync_n, quick])
    session = agent.session()
    events = [event async for event in session.stream("hang")]
    hung = [event for event in events if isinstance(event, ToolResult)]
    assert [result.content for result in hung] == [f"Error: hangs_sync_n timed out after {TIMEOUT:g} s"] * count  # fmt: skip
    threads = [thread for thread in threading.enumerate() if thread.name == "qwenrun-tool-hangs_sync_n"]
    assert len(threads) >= count and all(thread.daemon for thread in threads)
    events = [event async for event in session.stream("quick")]
    assert [(e.content, e.is_error) for e in events if isinstance(e, ToolResult)] == [("quick", False)]
    record(tmp_path_factory, tool_hung_threads=len(hung))


def test_a_hung_sync_tool_does_not_keep_the_process_alive() -> None:
    """``qwenrun run`` ends after answering even though a sync tool of the turn never returns."""
    script = textwrap.dedent(
        """
        import asyncio, threading
        from qwenrun.agent import Agent
        from qwenrun.spec.agent_file import AgentSpec
        from qwenrun.frontends.console import run_once
        from qwenrun.engines.scripted import ScriptedEngine, tool_call_text

        def hang() -> str:
            '''Never returns.'''
            threading.Event().wait()
            return "never"

        spec = AgentSpec.from_dict({"model": {"path": "x"}, "agent": {"timeout_s": 0.2}})
        agent = Agent(spec, ScriptedEngine([tool_call_text("hang", {}), "answered"]), tools=[hang])
        asyncio.run(run_once(agent, "go"))
        """
    )
    done = subprocess.run(  # the tool never returns: a process that waited for it would never end
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("answered\n")


# -- engine faults -------------------------------------------------------------------------------

SERVED, AGENT_NAME = "faulty-model", "faulty-agent"
ANSWER = "a long answer that the engine never finishes"
USER = [{"role": "user", "content": "hi"}]


class DyingEngine(ScriptedEngine):
    """A scripted engine that refuses requests (``refuse``), or dies for good after ``after``
    deltas of an answer (then ``dead`` is set, as an engine whose process is gone)."""

    def __init__(self, *, after: int | None = None, refuse: bool = False) -> None:
        super().__init__(lambda request: ANSWER)
        self.after, self.refuse = after, refuse

    async def generate(self, request: Request) -> AsyncIterator[Delta]:  # type: ignore[override]
        if self.refuse:
            raise EngineError("the engine refuses this request")
        sent = 0
        async for delta in super().generate(request):
            if sent == self.after:
                self.dead = True
                raise EngineError("the engine died mid-answer")
            sent += 1
            yield delta


class EngineDeadError(Exception):
    """Stands in for vllm.v1.engine.exceptions.EngineDeadError (VLLMEngine matches it by name)."""


class _Output:
    def __init__(self, index: int) -> None:
        self.text, self.token_ids, self.finish_reason = "tok ", [index], None


class _RequestOutput:
    def __init__(self, index: int) -> None:
        self.outputs, self.finished = [_Output(index)], False


class DyingAsyncLLM:
    """A small fake of vLLM's AsyncLLM whose engine core dies after ``after`` tokens of a request."""

    def __init__(self, after: int) -> None:
        self.after, self.errored, self.aborted, self.stopped = after, False, [], False

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[_RequestOutput]:
        if self.errored:
            raise EngineDeadError("EngineCore is dead")
        for index in range(self.after):
            yield _RequestOutput(index)
            await asyncio.sleep(0)
        self.errored = True
        raise EngineDeadError("EngineCore encountered an issue")

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def get_num_unfinished_requests(self) -> int:
        return 0

    def shutdown(self) -> None:
        self.stopped = True


class _Tokenizer:
    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return "".join(str(message["content"]) for message in messages)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1] * len(text)


def fake_vllm_engine(spec: AgentSpec, monkeypatch: pytest.MonkeyPatch, after: int = 3) -> VLLMEngine:
    """A VLLMEngine "started" on DyingAsyncLLM, without importing vLLM."""
    engine = VLLMEngine(spec)
    engine.attach(DyingAsyncLLM(after), _Tokenizer(), 4096)
    monkeypatch.setattr(engine, "_sampling_params", lambda *args, **kwargs: None)
    monkeypatch.setattr(engine_module, "tokens_prompt", lambda ids: {"prompt_token_ids": ids})
    return engine


def server_spec() -> AgentSpec:
    return AgentSpec.from_dict(
        {"model": {"path": "/models/faulty", "served_model_name": SERVED}, "agent": {"name": AGENT_NAME},
         "frontend": {"kind": "openai"}},
        source="tests/faulty.yaml",
    )  # fmt: skip


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` on a free port of 127.0.0.1 (a task of this event loop), and a client of it."""
    async with (
        serve_in_loop(app, timeout_graceful_shutdown=2, start_timeout_s=5, stop_timeout_s=15) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        yield client


def sse_events(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]


async def assert_503(client: httpx.AsyncClient, model: str, stream: bool, message: str) -> None:
    body = {"model": model, "messages": USER, "stream": stream}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "engine_unavailable")
    assert message in error["message"]


ENGINE_FAULTS: list[str] = []  # the names of the engine-fault tests below that ran


def engine_fault(test: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a test as one engine fault (counted for the doc) with a time limit."""
    ENGINE_FAULTS.append(test.__name__)
    return pytest.mark.timeout(60)(test)


@engine_fault
async def test_agent_engine_refuses() -> None:
    agent = Agent(server_spec(), DyingEngine(refuse=True), tools=[])
    session = agent.session()
    with pytest.raises(EngineError, match="refuses this request"):
        await asyncio.wait_for(session.ask("hi"), 5)
    assert session.messages == [{"role": "user", "content": "hi"}]


@engine_fault
async def test_agent_engine_dies_mid_answer() -> None:
    agent = Agent(server_spec(), DyingEngine(after=2), tools=[])
    session = agent.session()
    with pytest.raises(EngineError, match="died mid-answer"):
        await asyncio.wait_for(session.ask("hi"), 5)
    assert session.messages[-1] == {"role": "assistant", "content": ANSWER[:6]}  # what was streamed
    with pytest.raises(EngineError, match="scripted engine is dead"):  # and stays dead
        await asyncio.wait_for(session.ask("again"), 5)


@engine_fault
def test_cli_run_reports_a_dying_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "make_agent", lambda spec: Agent(spec, DyingEngine(after=2), tools=[]))
    result = CliRunner().invoke(cli_main, ["run", str(ROOT / "agents" / "weather.yaml"), "-p", "hi"])
    assert result.exit_code == 1, result.output
    assert result.output.endswith("Error: the engine died mid-answer\n")
    assert "a long" in result.output and "Traceback" not in result.output


@engine_fault
def test_cli_repl_reports_a_dying_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "make_agent", lambda spec: Agent(spec, DyingEngine(after=2), tools=[]))
    result = CliRunner().invoke(cli_main, ["up", str(ROOT / "agents" / "weather.yaml")], input="hi\nagain\n")
    assert result.exit_code == 1, result.output
    assert result.output.endswith("Error: the engine died mid-answer\n")


@engine_fault
def test_cli_run_reports_a_dead_vllm_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    engines: list[VLLMEngine] = []

    def make_agent(spec: AgentSpec) -> Agent:
        engines.append(fake_vllm_engine(spec, monkeypatch))
        return Agent(spec, engines[-1], tools=[])

    monkeypatch.setattr(cli, "make_agent", make_agent)
    result = CliRunner().invoke(cli_main, ["run", str(ROOT / "agents" / "weather.yaml"), "-p", "hi"])
    assert result.exit_code == 1, result.output
    assert result.output.endswith(
        "Error: the vLLM engine has died (EngineDeadError: EngineCore encountered an issue); restart qwenrun\n"
    )
    assert engines[0].errored and not engines[0].started  # reported dead, then shut down


@engine_fault
async def test_server_engine_dies_mid_request() -> None:
    """A non-streamed request whose engine dies gets a 503; then /health is 503, and so is any
    later request, streamed or not."""
    engine = DyingEngine(after=2)
    async with serving(create_app(Agent(server_spec(), engine, tools=[]))) as client:
        assert (await client.get("/health")).status_code == 200
        await assert_503(client, SERVED, False, "died mid-answer")
        health = await client.get("/health")
        assert (health.status_code, health.json()) == (503, {"status": "unavailable"})
        for model in (SERVED, AGENT_NAME):
            for stream in (False, True):
                await assert_503(client, model, stream, "scripted engine is dead")
        assert engine.active == 0


@engine_fault
async def test_server_engine_dies_mid_stream() -> None:
    """A stream whose engine dies after the 200 headers ends with an error event, no [DONE]."""
    for model in (SERVED, AGENT_NAME):
        engine = DyingEngine(after=2)
        async with serving(create_app(Agent(server_spec(), engine, tools=[]))) as client:
            body = {"model": model, "messages": USER, "stream": True}
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200
            *chunks, last = sse_events(response)
            text = "".join(json.loads(chunk)["choices"][0]["delta"].get("content") or "" for chunk in chunks)
            assert text == ANSWER[:6]
            error = json.loads(last)["error"]
            assert (error["type"], error["code"], error["message"]) == (
                "server_error", "engine_unavailable", "the engine died mid-answer",
            )  # fmt: skip
            assert (await client.get("/health")).status_code == 503
            mode = "passthrough" if model == SERVED else "agent"
            metrics = (await client.get("/metrics")).text
            assert f'endpoint="/v1/chat/completions",mode="{mode}",status="503"}} 1.0' in metrics


@engine_fault
async def test_server_engine_refuses_but_lives() -> None:
    """An engine that refuses a request (not dead): 503 for that request, /health stays 200."""
    engine = DyingEngine(refuse=True)
    async with serving(create_app(Agent(server_spec(), engine, tools=[]))) as client:
        for model in (SERVED, AGENT_NAME):
            for stream in (False, True):
                await assert_503(client, model, stream, "refuses this request")
        assert (await client.get("/health")).status_code == 200


@engine_fault
async def test_server_on_a_dying_vllm_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """VLLMEngine.errored turns True when vLLM's engine core dies; the server sees it."""
    spec = server_spec()
    engine = fake_vllm_engine(spec, monkeypatch)
    app = create_app(Agent(spec, engine, tools=[]), shutdown_engine=False)
    async with serving(app) as client:
        assert not engine.errored and (await client.get("/health")).status_code == 200
        await assert_503(client, SERVED, False, "the vLLM engine has died (EngineDeadError")
        assert engine.errored
        assert (await client.get("/health")).status_code == 503
        await assert_503(client, AGENT_NAME, True, "the vLLM engine has died; restart qwenrun")


@engine_fault
async def test_health_sees_a_vllm_engine_that_died_between_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine core dies while idle (AsyncLLM.errored turns True): /health says so at once."""
    spec = server_spec()
    engine = fake_vllm_engine(spec, monkeypatch)
    async with serving(create_app(Agent(spec, engine, tools=[]), shutdown_engine=False)) as client:
        assert (await client.get("/health")).status_code == 200
        engine._engine.errored = True
        assert engine.errored and (await client.get("/health")).status_code == 503
        await assert_503(client, SERVED, True, "the vLLM engine has died; restart qwenrun")


@engine_fault
async def test_server_engine_stalls_and_the_client_gives_up() -> None:
    """An engine that stops producing: the client's timeout ends the request, the generation
    is cancelled, and the server goes on answering."""
    engine = ScriptedEngine(lambda request: "word " * 100, delay_s=3600)
    async with serving(create_app(Agent(server_spec(), engine, tools=[]))) as client:
        for stream in (False, True):
            body = {"model": SERVED, "messages": USER, "stream": stream}
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/chat/completions", json=body, timeout=0.5)
            for _ in range(200):
                if engine.active == 0:
                    break
                await asyncio.sleep(0.02)
            assert engine.active == 0, "the generation went on after the client left"
        assert (await client.get("/health")).status_code == 200


SERVER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from qwenrun.cli import common as cli
    from qwenrun.cli import main
    from qwenrun.agent import Agent
    from qwenrun.errors import EngineError
    from qwenrun.engines.scripted import ScriptedEngine

    class Engine(ScriptedEngine):
        async def start(self):
            await super().start()
            if sys.argv[1] == "idle":  # the engine core dies while no request runs
                asyncio.get_running_loop().call_later(0.5, setattr, self, "dead", True)

    def script(request):
        engines[0].dead = True
        raise EngineError("the engine core process died")

    engines = [Engine(script)]
    cli.make_agent = lambda spec: Agent(spec, engines[0], tools=[])
    main(sys.argv[2:])
    """
)


@engine_fault
@pytest.mark.parametrize("when", ["request", "idle"])
def test_the_server_exits_when_its_engine_dies(tmp_path: Path, when: str) -> None:
    """A dead engine never comes back: `qwenrun up` (openai) stops serving 503s and exits with 1,
    so that a supervisor (systemd, Kubernetes) restarts it; during a request or while idle."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / "server.yaml"
    path.write_text(f"model: {{path: /models/x, served_model_name: {SERVED}}}\nagent: {{name: {AGENT_NAME}}}\n"
                    f"sessions: {{enabled: false}}\nfrontend: {{kind: openai, port: {port}}}\n")  # fmt: skip
    command = [sys.executable, "-c", SERVER_SCRIPT, when, "up", str(path)]
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=tmp_path) as process:
        try:
            if when == "request":
                deadline = time.monotonic() + 30
                while True:
                    assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
                    with contextlib.suppress(httpx.TransportError):
                        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                            break
                    time.sleep(0.1)
                body = {"model": SERVED, "messages": USER}
                response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=10)
                assert response.status_code == 503
            assert process.wait(timeout=30) == 1
            assert process.stderr is not None
            errors = process.stderr.read()
        finally:
            process.kill()
    assert "Error: the engine died, so the server stopped (exit code 1)" in errors
    assert "Traceback" not in errors


class RefusingAsyncLLM(DyingAsyncLLM):
    """vLLM's input validation refuses the request (a ``ValueError``, as ``VLLMValidationError``)."""

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[_RequestOutput]:
        raise ValueError("This model's maximum context length is 4096 tokens")
        yield  # an async generator, as vLLM's


@engine_fault
async def test_a_request_vllm_refuses_is_a_400_and_the_engine_lives(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = server_spec()
    engine = fake_vllm_engine(spec, monkeypatch)
    engine._engine = RefusingAsyncLLM(0)
    async with serving(create_app(Agent(spec, engine, tools=[]), shutdown_engine=False)) as client:
        for model in (SERVED, AGENT_NAME):
            for stream in (False, True):
                body = {"model": model, "messages": USER, "stream": stream}
                response = await client.post("/v1/chat/completions", json=body)
                assert response.status_code == 400, response.text
                error = response.json()["error"]
                assert error["type"] == "invalid_request_error"
                assert error["message"] == "vLLM refused the request: This model's maximum context length is 4096 tokens"
        assert not engine.errored and (await client.get("/health")).status_code == 200


def test_the_engine_fault_count_is_the_doc_figure(tmp_path_factory: pytest.TempPathFactory) -> None:
    record(tmp_path_factory, engine_faults=len(ENGINE_FAULTS))
    assert len(ENGINE_FAULTS) == figure("engine_faults")

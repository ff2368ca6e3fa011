"""The REPL as a person uses it: a real process, a real SIGINT in the middle of an answer."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qwenrun.agent import Agent
from qwenrun.cli import common as cli
from qwenrun.cli import main as cli_main
from qwenrun.engines.base import Delta, Request
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.events import Final, Reasoning, TextDelta, ToolCall, ToolResult, Usage
from qwenrun.frontends.console import EventPrinter, printable
from qwenrun.spec.agent_file import AgentSpec

ROOT = Path(__file__).resolve().parent.parent
WEATHER = str(ROOT / "agents" / "weather.yaml")

SCRIPT = textwrap.dedent(
    """
    import asyncio
    from qwenrun.agent import Agent
    from qwenrun.spec.agent_file import AgentSpec
    from qwenrun.frontends.console import repl
    from qwenrun.engines.scripted import ScriptedEngine

    def script(request):
        question = request.messages[-1]["content"]
        if question == "long":
            return "word " * 400
        return f"answer to {question}, history {len(request.messages)}"

    spec = AgentSpec.from_dict({"model": {"path": "scripted"}, "sessions": {"enabled": False}})
    agent = Agent(spec, ScriptedEngine(script, chunk_size=5, delay_s=0.02), tools=[])
    asyncio.run(repl(agent))
    print("REPL-EXITED", flush=True)
    """
)


def read_until(stream: object, marker: str, timeout: float = 20) -> str:
    """Read a pipe until ``marker`` shows up (the pipe is non-blocking)."""
    seen = ""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, f"{marker!r} not seen; got {seen[-500:]!r}"
        try:
            chunk = os.read(stream.fileno(), 65536)  # type: ignore[attr-defined]
        except BlockingIOError:
            chunk = b""
        if not chunk:
            time.sleep(0.02)
            continue
        seen += chunk.decode("utf-8", "replace")
    return seen


def test_ctrl_c_stops_the_answer_and_keeps_the_session(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    ) as process:
        assert process.stdin and process.stdout and process.stderr
        try:
            os.set_blocking(process.stdout.fileno(), False)
            os.set_blocking(process.stderr.fileno(), False)
            process.stdin.write(b"long\n")
            process.stdin.flush()
            read_until(process.stdout, "word word word")
            process.send_signal(signal.SIGINT)
            read_until(process.stderr, "(stopped)")
            process.stdin.write(b"next\n/exit\n")
            process.stdin.flush()
            out = read_until(process.stdout, "REPL-EXITED")
            # system + "long" + the partial answer kept + "next" = 4 messages seen by the model
            assert "answer to next, history 4" in out
            assert process.wait(timeout=20) == 0
        finally:
            process.kill()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:  # click keeps its styles for a terminal
        return True


def test_reasoning_is_dimmed_and_cannot_drive_the_terminal() -> None:
    events = [Reasoning("\nthink \x1b[31mred\x1b[0m\r\x07"), Reasoning("on\n"), Usage(), TextDelta("answer"),
              Final("answer")]  # fmt: skip
    plain = io.StringIO()
    printer = EventPrinter(plain)
    for event in events:
        printer(event)
    assert plain.getvalue() == "think \\x1b[31mred\\x1b[0m\\x0d\\x07on\n\nanswer\n"
    terminal = _Terminal()
    printer = EventPrinter(terminal)
    for event in events:
        printer(event)
    shown = terminal.getvalue()
    assert "\x1b[31m" not in shown and "\r" not in shown and "\x07" not in shown  # the model's own codes
    assert shown.startswith("\x1b[2mthink \\x1b[31mred") and shown.endswith("on\n\x1b[0m\nanswer\n")
    assert printable("tab\tline\nbell\x07 c1\x9b") == "tab\tline\nbell\\x07 c1\\x9b"


def test_a_teams_events_say_which_agent_speaks() -> None:
    out = io.StringIO()
    printer = EventPrinter(out)
    for event in [
        ToolCall("1", "ask_weather", {"task": "Paris?"}, agent="boss"),
        ToolCall("2", "get_current_weather", {"city": "Paris"}, agent="weather"),
        ToolResult("2", "get_current_weather", "sunny", agent="weather"),
        ToolResult("1", "ask_weather", "It is sunny.", agent="boss"),
        TextDelta("Sunny in Paris.", agent="boss"),
        Final("Sunny in Paris.", agent="boss"),
    ]:
        printer(event)
    assert out.getvalue() == (
        '  [boss] → ask_weather(task="Paris?")\n  [weather] → get_current_weather(city="Paris")\n'
        "  [weather] ← sunny\n  [boss] ← It is sunny.\n[boss] Sunny in Paris.\n"
    )


# -- what reaches the terminal (CliRunner, scripted engine) -------------------------------------

ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x9b31m"  # set the window title, clear the screen, 8-bit CSI


def hostile_tool(city: str) -> str:
    """A tool whose result carries terminal escapes.

    Args:
        city: The city.
    """
    return f"{ESCAPES}sunny in {city}"


def scripted_cli(monkeypatch: pytest.MonkeyPatch, script: Any, **agent: Any) -> list[ScriptedEngine]:
    engines: list[ScriptedEngine] = []

    def make_agent(spec: AgentSpec) -> Agent:
        spec = spec.model_copy(update={"agent": spec.agent.model_copy(update=agent)}) if agent else spec
        engines.append(script if isinstance(script, ScriptedEngine) else ScriptedEngine(script))
        return Agent(spec, engines[-1], tools=[hostile_tool])

    monkeypatch.setattr(cli, "make_agent", make_agent)
    return engines


def hostile_script(request: ModelRequest) -> str:
    if request.messages[-1]["role"] == "user":
        return tool_call_text("hostile_tool", {"city": "广州\x1b[8m"})
    return f"answer {ESCAPES}done"


@pytest.mark.parametrize("command", ["run", "up", "run --json"])
def test_model_and_tool_text_cannot_drive_the_terminal(monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    scripted_cli(monkeypatch, hostile_script)
    args = ["up", WEATHER] if command == "up" else ["run", WEATHER, "-p", "hi", *command.split()[1:]]
    result = CliRunner().invoke(cli_main, args, input="hi\n/exit\n", color=True)  # styles kept, as on a tty
    assert result.exit_code == 0, result.output
    for raw in ("\x1b]", "\x1b[2J", "\x1b[8m", "\x9b", "\x07"):
        assert raw not in result.output
    if command == "run --json":
        events = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
        assert events[-1]["text"] == f"answer {ESCAPES}done"  # JSON escapes, the data stays exact
        assert events[2]["content"] == f"{ESCAPES}sunny in 广州\x1b[8m"
    else:
        assert "answer \\x1b]0;pwned\\x07\\x1b[2J\\x9b31mdone" in result.output
        assert "← \\x1b]0;pwned\\x07\\x1b[2J\\x9b31msunny in 广州\\x1b[8m" in result.output
        assert '→ hostile_tool(city="广州\\u001b[8m")' in result.output  # json.dumps escapes it


def echoing_script(request: ModelRequest) -> str:
    """A call with an argument the tool's schema does not declare, as a small model echoes `required`."""
    if request.messages[-1]["role"] == "user":
        return tool_call_text("hostile_tool", {"city": "深圳", "required": ["city"]})
    return "深圳 done"


@pytest.mark.parametrize("command", ["run", "up"])
@pytest.mark.parametrize("verbose", [False, True])
def test_dropped_arguments_are_shown_with_v(
    monkeypatch: pytest.MonkeyPatch, command: str, verbose: bool
) -> None:
    scripted_cli(monkeypatch, echoing_script)
    args = ["up", WEATHER] if command == "up" else ["run", WEATHER, "-p", "深圳?"]
    result = CliRunner().invoke(cli_main, ["-v", *args] if verbose else args, input="深圳?\n/exit\n")
    assert result.exit_code == 0, result.output
    notice = '  ! hostile_tool: dropped required=["city"]: not in the tool\'s schema'
    assert (notice in result.output) == verbose, result.output
    assert '→ hostile_tool(city="深圳")\n' in result.output and "sunny in 深圳" in result.output
    if verbose:  # the notice comes right before the call it changed
        assert result.output.index(notice) < result.output.index("→ hostile_tool")


def test_run_json_prints_the_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_cli(monkeypatch, echoing_script)
    result = CliRunner().invoke(cli_main, ["run", WEATHER, "-p", "深圳?", "--json"])
    events = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    (notice,) = [e for e in events if e["type"] == "notice"]
    (call,) = [e for e in events if e["type"] == "tool_call"]
    assert (notice["code"], notice["id"], notice["data"]) == (
        "extra_arguments",
        call["id"],
        {"dropped": {"required": ["city"]}},
    )
    assert call["arguments"] == {"city": "深圳"}


def test_printable_keeps_text_and_shows_controls() -> None:
    assert printable("广州\tok\nline\r\n") == "广州\tok\nline\n"
    assert printable("a\rb\x00c\x7fd\x85e") == "a\\x0db\\x00c\\x7fd\\x85e"


class CutEngine(ScriptedEngine):
    """Ends every answer with finish_reason "length", as vLLM at max_tokens."""

    async def generate(self, request: Request) -> AsyncIterator[Delta]:  # type: ignore[override]
        async for delta in super().generate(request):
            yield Delta(delta.text, "length" if delta.finish_reason else None)


@pytest.mark.parametrize(
    ("engine", "agent", "note"),
    [
        (
            CutEngine(["the answer was"]),
            {},
            "the answer was\n(cut off: the answer reached sampling.max_tokens)\n",
        ),
        (ScriptedEngine([""]), {}, "(the model's answer is empty)\n"),
        (
            ScriptedEngine([tool_call_text("hostile_tool", {"city": "x"})] * 2),
            {"max_iterations": 1},
            "(stopped after 1 model calls without a final answer)\n",
        ),
    ],
    ids=["length", "empty", "max_iterations"],
)
def test_the_cli_says_when_an_answer_is_not_all_there(
    monkeypatch: pytest.MonkeyPatch, engine: ScriptedEngine, agent: dict[str, Any], note: str
) -> None:
    scripted_cli(monkeypatch, engine, **agent)
    result = CliRunner().invoke(cli_main, ["run", WEATHER, "-p", "hi"])
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(note)


def test_repl_commands_are_not_questions(monkeypatch: pytest.MonkeyPatch) -> None:
    engines = scripted_cli(monkeypatch, lambda request: "answer")
    result = CliRunner().invoke(cli_main, ["up", WEATHER], input="/help\n/hepl\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "/reset   clear the conversation" in result.stderr
    assert "unknown command /hepl; /help lists the commands" in result.stderr
    assert engines[0].calls == []  # nothing reached the model


# -- a real terminal: a pty, the tiny vLLM model ------------------------------------------------


class Terminal:
    """``command`` in a pseudo-terminal of its own, as a shell in a terminal emulator runs it: the
    pty is its controlling terminal and it is the foreground process group, so a ``\\x03`` written
    to it makes the kernel send SIGINT to that whole group (vLLM's processes included)."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path) -> None:
        import fcntl
        import termios

        self.master, slave = os.openpty()

        def controlling_tty() -> None:  # runs in the child, after setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.process = subprocess.Popen(
            command, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
            start_new_session=True, preexec_fn=controlling_tty,
        )  # fmt: skip
        os.close(slave)
        self.seen = ""

    def read_until(self, marker: str, timeout: float, start: int = 0) -> str:
        """Read until ``marker`` appears after ``start`` (an offset in all the output so far)."""
        import select

        deadline = time.monotonic() + timeout
        while marker not in self.seen[start:]:
            left = deadline - time.monotonic()
            assert left > 0, f"{marker!r} not seen in {timeout} s; the end: {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], min(left, 1))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                assert chunk or self.process.poll() is None, f"exited; the end: {self.seen[-2000:]!r}"
                self.seen += chunk.decode("utf-8", "replace")
        return self.seen

    def drain(self) -> None:
        """Read what is left once the child has exited."""
        import select

        while select.select([self.master], [], [], 0.5)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.seen += chunk.decode("utf-8", "replace")

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        os.close(self.master)


@pytest.mark.engine
@pytest.mark.timeout(600)
@pytest.mark.skipif(sys.platform != "linux", reason="a Linux pty")
def test_ctrl_c_in_a_terminal_stops_the_answer_and_the_engine_lives(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """``qwenrun up`` in a terminal: Ctrl-C during an answer stops it, vLLM's processes (which get
    the terminal's SIGINT too) live on and answer the next question; and the REPL is quiet: no
    vLLM warnings before the prompt, no nanobind or shutdown lines at /exit."""
    command = [
        str(Path(sys.executable).with_name("qwenrun")), "up", str(ROOT / "agents" / "weather-tiny.yaml"),
        "--set", f"model.path={tiny_model_dir}", "--set", "agent.tool_choice=none",
        "--set", "sampling.max_tokens=600", "--set", "sampling.extra.ignore_eos=true",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TERM": "dumb"}
    for name in ("VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL"):
        env.pop(name, None)
    terminal = Terminal(command, env, tmp_path)
    try:
        terminal.read_until(">>> ", timeout=400)  # the engine is up
        start = len(terminal.seen)
        terminal.type("hello\r")
        terminal.read_until("hello\r\n", timeout=30, start=start)  # the terminal's echo
        answer = len(terminal.seen)
        terminal.read_until(" ", timeout=120, start=answer + 40)  # the answer streams
        terminal.type("\x03")  # Ctrl-C: the kernel sends SIGINT to the foreground process group
        terminal.read_until("(stopped)", timeout=60, start=answer)
        terminal.read_until(">>> ", timeout=60, start=answer)
        time.sleep(2)  # a dying engine core takes a moment to be noticed
        start = len(terminal.seen)
        terminal.type("again\r")
        terminal.read_until(">>> ", timeout=300, start=start)  # a whole answer, then the prompt
        second = terminal.seen[start:]
        terminal.type("/exit\r")
        assert terminal.process.wait(timeout=120) == 0
        terminal.drain()
    finally:
        terminal.close()
    out = terminal.seen
    assert "Error" not in second and "died" not in out and "Traceback" not in out, out[-3000:]
    assert len(second.split("again", 1)[1].strip()) > 100  # it answered
    for noise in ("WARNING", "nanobind", "force killing", "Loading safetensors"):
        assert noise not in out, f"{noise!r} in the terminal: {out[:3000]!r}"

"""The REPL as a person uses it: a real process, a real SIGINT in the middle of an answer."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from qwenrun.events import Final, Reasoning, TextDelta, Usage
from qwenrun.frontends.console import EventPrinter, printable

SCRIPT = textwrap.dedent(
    """
    import asyncio
    from qwenrun.agent import Agent
    from qwenrun.config import AgentSpec
    from qwenrun.frontends.console import repl
    from qwenrun.testing import ScriptedEngine

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

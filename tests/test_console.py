"""The REPL as a person uses it: a real process, a real SIGINT in the middle of an answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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

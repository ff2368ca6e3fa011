"""Running one child process for the ``shell`` and ``python`` toolsets: a scrubbed environment, its
own process group, a wall-time limit and an output cap.

:func:`run_process` starts the program with :func:`asyncio.create_subprocess_exec` (never a shell
of its own), stdin from ``/dev/null``, in a new session (so a process group of its own), and reads
stdout and stderr together up to ``max_output_bytes``. On the time limit, on the output cap and
when the call is cancelled (the agent's own time limit, a cancelled turn) the **whole process
group** is killed with SIGKILL, so children the command started die with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qwenrun.errors import ToolError

__all__ = ["Finished", "clean_env", "run_process"]


@dataclass(frozen=True, slots=True)
class Finished:
    """How a run ended: its exit status (negative: killed by that signal), its output, whether cut."""

    status: int
    stdout: str
    stderr: str
    cut: bool

    def report(self, cap: int) -> str:
        """What the model reads: the exit status, then each stream that wrote something."""
        parts = [f"exit status {self.status}" + _signal_name(self.status)]
        for name, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            if text:
                parts.append(f"--- {name} ---\n{text.rstrip(chr(10))}")
        if self.cut:
            parts.append(f"[output cut at {cap} bytes (max_output_bytes); the run was stopped]")
        return "\n".join(parts)


def clean_env(path: str, home: str, extra: Mapping[str, str]) -> dict[str, str]:
    """The whole environment of a child: PATH, HOME (its scratch folder), LANG, then ``extra``."""
    return {"PATH": path, "HOME": home, "LANG": "C.UTF-8", "TMPDIR": home, **extra}


async def run_process(
    argv: Sequence[str], *, cwd: str, env: Mapping[str, str], timeout_s: float | None, max_output_bytes: int
) -> Finished:
    """Run ``argv`` to its end (or its limit); a ToolError when it cannot start or times out."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=dict(env), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
    except OSError as exc:
        raise ToolError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
    output = _Output(max_output_bytes)
    try:
        async with asyncio.timeout(timeout_s):
            assert process.stdout is not None and process.stderr is not None
            await asyncio.gather(
                output.read(process.stdout, "stdout", process), output.read(process.stderr, "stderr", process)
            )
            status = await process.wait()
    except TimeoutError:
        raise ToolError(
            f"the run was stopped after {timeout_s:g} s (timeout_s); its process group was killed"
        ) from None
    finally:
        _kill_group(process)
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with contextlib.suppress(BaseException):
                await asyncio.shield(process.wait())
    return Finished(status, output.text("stdout"), output.text("stderr"), output.cut)


class _Output:
    """stdout and stderr of one run, together at most ``cap`` bytes."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.size = 0
        self.cut = False
        self.chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    async def read(
        self, stream: asyncio.StreamReader, name: str, process: asyncio.subprocess.Process
    ) -> None:
        while chunk := await stream.read(65536):
            room = self.cap - self.size
            self.chunks[name].append(chunk[:room])
            self.size += min(len(chunk), room)
            if len(chunk) > room:
                self.cut = True
                _kill_group(process)  # the other stream's reader then ends at EOF
                return

    def text(self, name: str) -> str:
        return b"".join(self.chunks[name]).decode("utf-8", errors="replace")


def _kill_group(process: asyncio.subprocess.Process) -> None:
    """SIGKILL to the process group of ``process`` (its own: ``start_new_session``)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _signal_name(status: int) -> str:
    if status >= 0:
        return ""
    try:
        return f" (killed by {signal.Signals(-status).name})"
    except ValueError:
        return f" (killed by signal {-status})"

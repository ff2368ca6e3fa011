"""The ``python`` toolset: one tool, ``run_python``, that runs the model's code in a subprocess.

Each run is ``sys.executable -I`` (isolated mode: no ``PYTHON*`` variables, no user site folder,
not the current folder on ``sys.path``) of a small launcher that sets its limits, then runs the
code as ``__main__`` (from ``main.py`` in the scratch folder):

* CPU time ``cpu_s`` (``RLIMIT_CPU``: the kernel stops the process with SIGXCPU), address space
  ``memory_mb`` (``RLIMIT_AS``: allocations beyond it fail, Python raises MemoryError), no core
  files, and the wall time ``timeout_s`` (the whole process group is killed);
* stdout and stderr together at most ``max_output_bytes``;
* the working folder and HOME: a new temporary folder per call (``scratch: call``, removed after it)
  or one per session (``scratch: session``, removed when the agent goes), and the scrubbed
  environment of the ``shell`` toolset.

What it does **not** isolate: the network, reading any file the user running qwenrun may read,
writing outside the scratch folder where that user may write, other processes of that user. Code
from someone you do not trust belongs in a container or a VM (run qwenrun there), not here.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import weakref
from collections import OrderedDict
from typing import Annotated

from pydantic import Field

from qwenrun.context import SESSION_ID
from qwenrun.errors import ToolError
from qwenrun.toolsets.process import Finished, clean_env, run_process
from qwenrun.toolsets.spec import PythonToolset

__all__ = ["PythonRunner"]

MAX_SESSIONS = 256
"""With ``scratch: session``: the scratch folders of this many most recent sessions are kept."""

LAUNCHER = """\
import resource, runpy, sys
cpu, memory = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.argv = ["main.py"]
sys.path.insert(0, ".")
runpy.run_path("main.py", run_name="__main__")
"""
"""What the subprocess runs before the code: its limits, then ``main.py`` as ``__main__``."""

_SIGXCPU = -24


class PythonRunner:
    """The ``run_python`` tool of one entry, bound to its limits and scratch folders."""

    def __init__(self, settings: PythonToolset) -> None:
        self.settings = settings
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        weakref.finalize(self, _remove_all, self._sessions)

    def described(self) -> str:
        s = self.settings
        wall = f", {s.timeout_s:g} s of wall time" if s.timeout_s is not None else ""
        kept = "a fresh folder each call" if s.scratch == "call" else "one folder per session"
        return (f"Limits: {s.cpu_s} s of CPU, {s.memory_mb} MiB of memory{wall}; it runs in {kept}. "
                "Print what you want to see.")  # fmt: skip

    async def run_python(self, code: Annotated[str, Field(min_length=1, max_length=200_000)]) -> str:
        """Run Python code in a fresh interpreter and read its exit status, stdout and stderr.

        Args:
            code: A whole program, e.g. "import math\\nprint(math.factorial(20))"; print the results you need.
        """
        if self.settings.scratch == "call":
            folder = tempfile.mkdtemp(prefix="qwenrun-python-")
            try:
                return await self._run(code, folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        return await self._run(code, self._session_folder())

    def _session_folder(self) -> str:
        key = SESSION_ID.get() or ""
        with self._lock:
            folder = self._sessions.get(key)
            if folder is None:
                folder = self._sessions[key] = tempfile.mkdtemp(prefix="qwenrun-python-")
            self._sessions.move_to_end(key)
            while len(self._sessions) > MAX_SESSIONS:
                shutil.rmtree(self._sessions.popitem(last=False)[1], ignore_errors=True)
        return folder

    async def _run(self, code: str, folder: str) -> str:
        s = self.settings
        with open(f"{folder}/main.py", "w", encoding="utf-8") as file:
            file.write(code)
        argv = [sys.executable, "-I", "-c", LAUNCHER, str(s.cpu_s), str(s.memory_mb * 1024 * 1024)]
        finished = await run_process(
            argv, cwd=folder, env=clean_env(s.path, folder, {"PYTHONIOENCODING": "utf-8", **s.env}),
            timeout_s=s.timeout_s, max_output_bytes=s.max_output_bytes,
        )  # fmt: skip
        _check_limits(finished, s)
        return finished.report(s.max_output_bytes)


def _check_limits(finished: Finished, settings: PythonToolset) -> None:
    """A ToolError when the run ended on its CPU or memory limit (the output so far in it)."""
    tail = finished.stderr.rstrip().rpartition("\n")[2]
    if finished.status == _SIGXCPU:
        raise ToolError(f"the code used its {settings.cpu_s} s of CPU time (cpu_s) and was stopped\n"
                        + _tail(finished))  # fmt: skip
    if finished.status != 0 and tail.startswith("MemoryError"):
        message = f"the code ran out of memory: {settings.memory_mb} MiB (memory_mb)\n"
        raise ToolError(message + _tail(finished))


def _tail(finished: Finished) -> str:
    return "\n".join(finished.report(10**9).splitlines()[-20:])


def _remove_all(folders: OrderedDict[str, str]) -> None:
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)

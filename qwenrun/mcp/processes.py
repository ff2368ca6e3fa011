"""The processes of a stdio MCP server, found by the marker variable in their environment.

qwenrun puts ``QWENRUN_MCP_SERVER=<unique value>`` into each stdio server's environment; every
process the server starts inherits it, also one in a session of its own that a kill of the server's
process group misses, or one that keeps the server's stdout open after the server died (so that
its end is never seen on the pipe). Linux only (``/proc``); elsewhere these find nothing.
"""

from __future__ import annotations

import os
import signal
import time

__all__ = ["MARKER", "alive", "kill_marked", "marked"]

MARKER = "QWENRUN_MCP_SERVER"


def marked(value: str) -> list[tuple[int, int]]:
    """(pid, parent pid) of every process whose environment has ``MARKER=value``."""
    if not os.path.isdir("/proc"):
        return []
    needle = f"{MARKER}={value}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as environ:
                if needle not in environ.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
        found.append((int(entry.name), parent))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which has exited, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def kill_marked(value: str, wait_s: float = 2.0) -> list[int]:
    """SIGKILL every process marked with ``value`` and wait (up to ``wait_s``) until they are
    gone; the pids that were killed."""
    killed = []
    for pid, _ in marked(value):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
        killed.append(pid)
    deadline = time.monotonic() + wait_s
    while any(alive(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.01)
    return killed

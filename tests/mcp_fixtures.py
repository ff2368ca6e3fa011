"""What the MCP tests share: the test server (``tests/mcp_server.py``) as a stdio entry of an agent
file or as a streamable HTTP server process on 127.0.0.1, and ``uvx`` for published servers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

SERVER = str(Path(__file__).resolve().parent / "mcp_server.py")
TIME_SERVER = "mcp-server-time==2026.10.19"  # published on PyPI; uvx runs it in its own environment


def stdio(*flags: str, name: str = "test", **entry: Any) -> dict[str, Any]:
    """An agent file's entry for the test server over stdio (``flags``: see tests/mcp_server.py)."""
    return {"mcp": {"name": name, "command": sys.executable, "args": [SERVER, *flags]}, **entry}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def http_server(port: int, *flags: str) -> Iterator[str]:
    """The test server on streamable HTTP at 127.0.0.1:``port`` until the block ends; its URL."""
    process = subprocess.Popen(
        [sys.executable, SERVER, "--http", str(port), *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "the HTTP test server exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the HTTP test server did not listen in 30 s"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(10)


def uvx() -> list[str]:
    """The command that runs a published tool in an environment of its own, as ``uvx`` does."""
    found = shutil.which("uvx")
    if found:
        return [found]
    found = shutil.which("uv")
    if found:
        return [found, "tool", "run"]
    for python in filter(None, (shutil.which("python3"), sys.executable)):
        if subprocess.run([python, "-m", "uv", "--version"], capture_output=True).returncode == 0:
            return [python, "-m", "uv", "tool", "run"]
    pytest.fail("uv is not installed (scripts/setup.sh installs it)")


# What uv needs to reach the package index from here (a stdio server inherits only HOME, PATH, ...).
NETWORK_ENV = ("SSL_CERT_FILE", "SSL_CERT_DIR", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy",
               "http_proxy", "no_proxy", "UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_CACHE_DIR", "UV_NATIVE_TLS")  # fmt: skip


def time_server(name: str = "time", **entry: Any) -> dict[str, Any]:
    """An agent file's entry for mcp-server-time from PyPI, run by uvx (UTC, for stable answers)."""
    command, *args = uvx()
    args += ["--from", TIME_SERVER, "mcp-server-time", "--local-timezone", "UTC"]
    network = [name for name in NETWORK_ENV if os.environ.get(name)]
    server = {"name": name, "command": command, "args": args, "pass_env": network}
    return {"mcp": server, "startup_timeout_s": 180, **entry}

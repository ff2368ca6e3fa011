"""Serve an ASGI app on a free 127.0.0.1 port as a task of the running event loop (for tests whose
engine belongs to that loop), with uvicorn's signal handling left to pytest."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn


class QuietServer(uvicorn.Server):
    def capture_signals(self) -> Any:  # leave pytest's signal handlers alone
        return contextlib.nullcontext()


@contextlib.asynccontextmanager
async def serve_in_loop(
    app: Any, *, start_timeout_s: float = 10, stop_timeout_s: float = 30, **config: Any
) -> AsyncIterator[str]:
    """Yield the base URL while ``app`` serves; stop it (graceful, bounded) on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    settings: dict[str, Any] = {"log_level": "warning", "timeout_graceful_shutdown": 5, **config}
    server = QuietServer(uvicorn.Config(app, **settings))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(int(start_timeout_s / 0.01)):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, stop_timeout_s)
        sock.close()

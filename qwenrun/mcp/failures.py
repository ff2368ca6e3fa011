"""How an MCP server fails: :class:`ServerGone` when it stops answering, and :func:`describe`, the
one-line reason of any failure of a connection (the first real error inside exception groups)."""

from __future__ import annotations

import asyncio

__all__ = ["ServerGone", "describe"]


class ServerGone(Exception):
    """The server stopped answering: its messages ended, or it did not answer a ping."""


def describe(exc: BaseException, startup_timeout_s: float | None = None) -> str:
    """A one-line reason: the first real error inside exception groups, MCP errors by message."""
    import anyio
    from mcp.shared.exceptions import McpError
    from mcp.types import CONNECTION_CLOSED

    while isinstance(exc, BaseExceptionGroup):
        inner = [item for item in exc.exceptions if not isinstance(item, asyncio.CancelledError)]
        if not inner:
            break
        exc = inner[0]
    if isinstance(exc, TimeoutError) and startup_timeout_s is not None:
        return f"no answer to initialize and tools/list within {startup_timeout_s:g} s"
    closed = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)
    if isinstance(exc, closed) or (isinstance(exc, McpError) and exc.error.code == CONNECTION_CLOSED):
        return "the server closed the connection"
    if isinstance(exc, McpError):
        return f"MCP error {exc.error.code}: {exc.error.message}"
    if isinstance(exc, ServerGone):
        return str(exc)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

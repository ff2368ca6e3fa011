"""The MCP server on stdio: a client starts ``qwenrun up FILE --set frontend.kind=mcp`` as its child
process and talks JSON-RPC, one message per line, over its stdin and stdout.

Only protocol bytes may reach that stdout, so :func:`claimed_stdio` moves the protocol to private
copies of fds 0 and 1 before anything else runs, then points fd 1 at stderr and fd 0 at
``/dev/null``: a ``print``, a log line or a child process (vLLM's engine core) writes to stderr and
reads nothing. :func:`serve` answers at once (the client's ``initialize`` does not wait for the
engine to load; calls do), reads stdin without a thread where it can (a pipe or a terminal), so
that the server can stop while the client is silent, and refuses a line of more than
``frontend.max_request_bytes`` with a JSON-RPC error. It ends when the client closes stdin, and
raises :class:`EngineError` when the engine dies for good (``qwenrun up`` exits with 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp import types
from mcp.shared.message import SessionMessage

from qwenrun.engines.base import wait_until_dead
from qwenrun.errors import EngineError
from qwenrun.frontends.mcp.server import AgentServer

__all__ = ["ENGINE_CHECK_S", "claimed_stdio", "engine_died", "serve"]

log = logging.getLogger(__name__)

ENGINE_CHECK_S = 1.0  # how often the watchdog looks at the engine
_ID = re.compile(rb'"id"\s*:\s*(-?\d{1,18}|"(?:[^"\\]|\\.){0,256}")')


@contextlib.contextmanager
def claimed_stdio() -> Iterator[tuple[io.FileIO, io.BufferedWriter]]:
    """The protocol's stdin and stdout (copies of fds 0 and 1); meanwhile fd 1 is stderr and fd 0
    is ``/dev/null``. Restored on exit."""
    sys.stdout.flush()
    saved_in, saved_out = os.dup(0), os.dup(1)
    stdin = open(os.dup(0), "rb", buffering=0)  # noqa: SIM115
    stdout = open(os.dup(1), "wb")  # noqa: SIM115
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    try:
        yield stdin, stdout
    finally:
        for stream in (stdin, stdout):
            with contextlib.suppress(OSError, ValueError):
                stream.close()
        sys.stdout.flush()
        os.dup2(saved_in, 0)
        os.dup2(saved_out, 1)
        os.close(saved_in)
        os.close(saved_out)


def engine_died() -> EngineError:
    log.error("the engine has died; stopping the MCP server")
    return EngineError("the engine died, so the MCP server stopped (exit code 1): restart qwenrun")


async def serve(core: AgentServer, stdin: io.FileIO, stdout: io.BufferedWriter) -> None:
    """Serve ``core`` on the protocol's streams until the client closes stdin or the engine dies."""
    server = core.server
    failure: BaseException | None = None
    try:
        async with anyio.create_task_group() as group:

            async def start() -> None:
                nonlocal failure
                try:
                    await core.start()
                except Exception as exc:  # calls say so too; the server stops
                    failure = exc
                    group.cancel_scope.cancel()
                    return
                await wait_until_dead(core.agent.engine, ENGINE_CHECK_S)
                failure = engine_died()
                group.cancel_scope.cancel()

            group.start_soon(start)
            async with _streams(stdin, stdout, core.frontend.max_request_bytes) as (reader, writer):
                await server.run(reader, writer, server.create_initialization_options())
            group.cancel_scope.cancel()  # the client closed stdin
    finally:
        with anyio.CancelScope(shield=True):
            await core.agent.shutdown()
    if failure is not None:
        raise failure


@dataclass(frozen=True, slots=True)
class _TooLarge:
    head: bytes  # the line's first bytes (its id, if the client writes it early)


@contextlib.asynccontextmanager
async def _streams(
    stdin: io.FileIO, stdout: io.BufferedWriter, limit: int
) -> AsyncIterator[
    tuple[MemoryObjectReceiveStream[SessionMessage | Exception], MemoryObjectSendStream[SessionMessage]]
]:
    """The SDK's stdio transport (``mcp.server.stdio.stdio_server``), with the line limit and
    cancellable reads."""
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)
    answers = write_stream.clone()  # for the errors of lines that are too long

    async def read() -> None:
        async with read_writer, answers:
            async for line in _lines(stdin, limit):
                if isinstance(line, _TooLarge):
                    await _refuse(line, limit, answers)
                    continue
                try:
                    message = types.JSONRPCMessage.model_validate_json(line)
                except Exception as exc:
                    await read_writer.send(exc)
                    continue
                await read_writer.send(SessionMessage(message))

    async def write() -> None:
        async with write_reader:
            async for message in write_reader:
                data = message.message.model_dump_json(by_alias=True, exclude_none=True).encode() + b"\n"
                await anyio.to_thread.run_sync(_write, stdout, data)

    async with anyio.create_task_group() as group:
        group.start_soon(read)
        group.start_soon(write)
        yield read_stream, write_stream


def _write(stdout: io.BufferedWriter, data: bytes) -> None:
    stdout.write(data)
    stdout.flush()


async def _refuse(line: _TooLarge, limit: int, answers: MemoryObjectSendStream[SessionMessage]) -> None:
    text = f"the request is larger than frontend.max_request_bytes ({limit} bytes)"
    found = _ID.search(line.head)
    if found is None:
        log.error("a message without an id at its start was dropped: %s", text)
        return
    raw = found.group(1).decode("utf-8", "replace")
    request_id: str | int = int(raw) if not raw.startswith('"') else raw[1:-1]
    error = types.JSONRPCError(
        jsonrpc="2.0", id=request_id, error=types.ErrorData(code=types.INVALID_REQUEST, message=text)
    )
    await answers.send(SessionMessage(types.JSONRPCMessage(error)))


async def _lines(stdin: io.FileIO, limit: int) -> AsyncIterator[bytes | _TooLarge]:
    """The lines of ``stdin`` (without their newline), a :class:`_TooLarge` for each longer than ``limit``."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit)
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
    except (OSError, ValueError):  # a regular file: read it in a thread (not cancellable)
        reader = await _file_reader(stdin, limit)
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as end:  # the client closed stdin
            if end.partial.strip():
                yield end.partial
            return
        except asyncio.LimitOverrunError as over:
            head = await reader.readexactly(over.consumed)
            while True:  # skip the rest of the line
                try:
                    await reader.readuntil(b"\n")
                    break
                except asyncio.LimitOverrunError as more:
                    await reader.readexactly(more.consumed)
                except asyncio.IncompleteReadError:
                    break
            yield _TooLarge(head[:4096])
            continue
        if line.strip():
            yield line


async def _file_reader(stdin: io.FileIO, limit: int) -> asyncio.StreamReader:
    """A reader fed from ``stdin`` by a thread of its own (for what ``connect_read_pipe`` refuses)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit)

    def pump() -> None:
        while chunk := stdin.read(65536):
            loop.call_soon_threadsafe(reader.feed_data, chunk)
        loop.call_soon_threadsafe(reader.feed_eof)

    threading.Thread(target=pump, name="qwenrun-mcp-stdin", daemon=True).start()
    return reader

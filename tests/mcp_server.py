"""An MCP server for the tests, written with the SDK's FastMCP: ``python tests/mcp_server.py``.

stdio by default; ``--http PORT`` serves streamable HTTP on 127.0.0.1:PORT (path /mcp). Its tools
cover the normal and the faulty cases: ``add``, ``echo``, ``note`` (appends to $NOTES_FILE: a side
effect to check that a refused call did not run), ``fail`` (an error result), ``huge`` (a long
result), ``hang`` (never answers; the server stays responsive), ``freeze`` (blocks the whole
server), ``die`` (the process exits mid-call), ``describe_env`` (which variables it got).

Flags: ``--pid-file FILE`` writes the server's pid (and that of a ``--spawn-child``: a ``sleep``
in a session of its own, which outlives a kill of the server's process group) for the leak tests;
``--malformed`` adds tools with a broken input schema and an unusable name; ``--changing`` adds
``reshape``, which adds ``multiply``, removes ``echo``, changes ``add``'s description and sends
``notifications/tools/list_changed``; ``--exit-at-start``
writes to stderr and exits before speaking MCP; ``--stdout-noise`` prints a non-MCP line first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

from mcp.server.fastmcp import Context, FastMCP
from mcp.server.fastmcp.tools import Tool


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


def echo(text: str) -> str:
    """Return the text as it came."""
    return text


def note(text: str) -> str:
    """Write a note to the notes file."""
    with open(os.environ["NOTES_FILE"], "a", encoding="utf-8") as out:
        out.write(text + "\n")
    return f"noted: {text}"


def fail(reason: str) -> str:
    """Always fails."""
    raise ValueError(f"it failed because {reason}")


def huge(size: int) -> str:
    """A result of `size` characters."""
    return "x" * size


async def hang() -> str:
    """Never answers (the server itself stays responsive)."""
    await asyncio.sleep(3600)
    return "never"


def freeze() -> str:
    """Blocks the whole server."""
    time.sleep(3600)
    return "never"


def die() -> str:
    """The server process exits during the call."""
    sys.stderr.write("dying on purpose\n")
    sys.stderr.flush()
    os._exit(3)


def describe_env() -> str:
    """The names of the environment variables the server got."""
    return ",".join(sorted(os.environ))


def whoami(ctx: Context) -> str:  # type: ignore[type-arg]
    """The Authorization header of the HTTP request (streamable HTTP only)."""
    request = ctx.request_context.request
    return str(request.headers.get("authorization")) if request is not None else "(stdio)"


def multiply(a: int, b: int) -> int:
    """Multiply two integers (added at run time by reshape)."""
    return a * b


async def reshape(ctx: Context) -> str:  # type: ignore[type-arg]
    """Add multiply, remove echo, describe add anew, and tell the client that the tools changed."""
    server = ctx.fastmcp
    server.add_tool(multiply)
    server.remove_tool("echo")
    server.remove_tool("add")
    server.add_tool(add, description="Add two integers (described anew by reshape).")
    await ctx.session.send_tool_list_changed()
    return "reshaped"


def build(malformed: bool, changing: bool = False) -> FastMCP:
    tools = [
        Tool.from_function(f) for f in (add, echo, note, fail, huge, hang, freeze, die, describe_env, whoami)
    ]
    if changing:
        tools.append(Tool.from_function(reshape))
    if malformed:
        broken = Tool.from_function(echo, name="broken_schema")
        broken.parameters = {"type": "object", "properties": {"text": {"type": "no-such-type"}}}
        not_object = Tool.from_function(echo, name="string_schema")
        not_object.parameters = {"type": "string"}
        bad_name = Tool.from_function(echo, name="bad name\x1b[31m")
        tools += [broken, not_object, bad_name]
    return FastMCP("qwenrun-test", tools=tools, log_level="WARNING")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, metavar="PORT")
    parser.add_argument("--pid-file")
    parser.add_argument("--spawn-child", action="store_true")
    parser.add_argument("--malformed", action="store_true")
    parser.add_argument("--changing", action="store_true")
    parser.add_argument("--exit-at-start", action="store_true")
    parser.add_argument("--stdout-noise", action="store_true")
    args = parser.parse_args()
    if args.exit_at_start:
        sys.stderr.write("config error: the test server was told to exit at start\n")
        sys.exit(2)
    pids = [os.getpid()]
    if args.spawn_child:
        child = subprocess.Popen(["sleep", "600"], start_new_session=True)
        pids.append(child.pid)
    if args.pid_file:
        with open(args.pid_file, "w", encoding="utf-8") as out:
            out.write(" ".join(map(str, pids)))
    if args.stdout_noise:
        print("this line is not JSON-RPC", flush=True)
    server = build(args.malformed, args.changing)
    if args.http is not None:
        server.settings.port = args.http
        server.run(transport="streamable-http")
    else:
        server.run(transport="stdio")


if __name__ == "__main__":
    main()

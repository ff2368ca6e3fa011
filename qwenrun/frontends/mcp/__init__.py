"""``frontend.kind: mcp``: the agent as an MCP server (docs/mcp.md, "qwenrun as an MCP server").

* :mod:`~qwenrun.frontends.mcp.server`: the SDK's low-level ``Server`` of one agent (its tool,
  progress and log notifications, cancellation, elicitation for approvals, limits);
* :mod:`~qwenrun.frontends.mcp.stdio` and :mod:`~qwenrun.frontends.mcp.http`: its two transports.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from qwenrun.errors import ConfigError, MissingExtraError
from qwenrun.frontends.base import Launch
from qwenrun.frontends.settings import McpFrontend

__all__ = ["run"]


def run(launch: Launch) -> None:
    """Serve the agent of ``launch`` on ``frontend.transport`` until the client or a signal ends it."""
    import asyncio

    try:
        from qwenrun.frontends.mcp import http, stdio
        from qwenrun.frontends.mcp.server import AgentServer
    except ImportError as exc:  # the SDK (or the starlette/uvicorn it pulls in) is missing
        raise MissingExtraError(exc.name or "mcp", "mcp") from exc

    frontend = launch.spec.frontend
    if not isinstance(frontend, McpFrontend):  # the registry sends only mcp here
        raise ConfigError(f"{launch.spec.source}: frontend.kind: expected mcp, got {frontend.kind}")
    if frontend.transport == "http":
        http.serve(launch.make_agent(launch.spec), frontend)
        return
    with stdio.claimed_stdio() as (stdin, stdout):  # before anything can print
        click.echo(f"MCP server of agent {launch.spec.agent.name!r} on stdio; a client starts it with:\n"
                   f"  {stdio_command(launch)}", err=True)  # fmt: skip
        core = AgentServer(launch.make_agent(launch.spec), frontend)
        try:
            asyncio.run(stdio.serve(core, stdin, stdout))
        except KeyboardInterrupt:  # Ctrl-C in a terminal: the agent was shut down on the way out
            click.echo("Stopped.", err=True)


def stdio_command(launch: Launch) -> str:
    """The command line that starts this server: ``qwenrun up FILE`` with the same ``--set``s."""
    file = str(Path(launch.file).resolve()) if launch.file else "AGENT.yaml"
    sets = [part for override in launch.overrides for part in ("--set", override)]
    return shlex.join(["qwenrun", "up", file, *sets])

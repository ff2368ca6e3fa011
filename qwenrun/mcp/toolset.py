"""The MCP servers of one agent as qwenrun tools: started and stopped with the agent.

:class:`McpToolset` starts every server of the agent file at once (``Agent.start``), turns each
server tool that ``allow`` / ``deny`` let through into a :class:`~qwenrun.tools.Tool` (its MCP
``inputSchema`` is the JSON schema the model sees; a call goes through the server's
:class:`~qwenrun.mcp.connection.McpConnection`) and adds it to the agent's tools. Once per process:
every session of the agent shares the servers. A tool name that another tool already has is a
:class:`ConfigError` at start naming both sources; a server tool with an unusable name or schema is
left out and reported. A server that fails to start does not stop the agent: it is retried with
backoff, and its tools join when it comes up. :func:`survey` starts each server once, for
``qwenrun tools --agent FILE`` and ``--doctor``.

Results: the text parts of a ``CallToolResult`` joined by newlines (or its ``structuredContent`` as
JSON when it has no content); images, audio and binary resources are described, not shown. A result
with ``isError`` becomes an ``Error: ...`` tool result, as a failed entry-point tool's does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenrun.errors import ConfigError, PluginError, ToolError
from qwenrun.mcp.connection import McpConnection
from qwenrun.mcp.spec import TOOL_NAME
from qwenrun.tools import Tool

if TYPE_CHECKING:
    from mcp import types

    from qwenrun.spec.agent_file import AgentSpec

__all__ = ["McpToolset", "result_text", "survey"]

log = logging.getLogger(__name__)


class McpToolset:
    """The MCP servers of an agent file and the tools they add to an agent's ``tools``."""

    def __init__(self, spec: AgentSpec, *, restart: bool = True) -> None:
        self.spec = spec
        base = Path(spec.source).parent if spec.source not in ("<dict>", "<string>") else None
        self.connections = [
            McpConnection(entry, f"{spec.source}: tools[{index}]", base, restart=restart)
            for index, entry in spec.mcp_servers
        ]
        self.problems: dict[str, list[str]] = {}  # by server name: its tools that were left out
        self.added: dict[str, list[Tool]] = {}  # by server name: its tools in the agent's tools
        self.clashes: list[str] = []
        self._level = logging.WARNING if restart else logging.DEBUG  # a survey reports by itself
        self._tools: dict[str, Tool] = {}
        self._started = False

    def __bool__(self) -> bool:
        return bool(self.connections)

    def attach(self, tools: dict[str, Tool]) -> McpToolset:
        """Add the tools of servers that come up from now on to ``tools`` (an agent that shares
        this toolset with the agent it replaces: a reloaded Chainlit agent)."""
        self._tools = tools
        return self

    async def start(self, tools: dict[str, Tool], *, strict: bool = True) -> None:
        """Start every server and add its tools to ``tools`` (the agent's, by name). With
        ``strict``, a tool name taken twice is a ConfigError (every server stopped first)."""
        self._tools = tools
        await asyncio.gather(*(connection.start() for connection in self.connections))
        for connection in self.connections:  # in the file's order: the first one keeps a name
            if connection.state == "ready":
                self._register(connection)
            connection.on_ready = self._register  # a server that comes up later adds its tools then
            connection.on_tools_changed = self._register  # notifications/tools/list_changed
        self._started = True
        if self.clashes and strict:
            clashes = list(self.clashes)
            await self.close()
            raise ConfigError("\n".join(clashes))

    async def close(self) -> None:
        """Stop every server (no process of theirs is left when this returns)."""
        await asyncio.gather(*(connection.close() for connection in self.connections))

    def _register(self, connection: McpConnection) -> None:
        """Make the server's tools in the agent's tools the ones it listed last (it (re)started,
        or said that its tools changed): new ones join, gone ones leave, changed ones are
        replaced, unchanged ones are kept as they are; report clashes and tools left out."""
        built, problems = build_tools(connection)
        self.problems[connection.name] = problems
        for problem in problems:
            log.log(self._level, "%s: MCP server %r: %s", connection.where, connection.name, problem)
        listed = {tool.name for tool in built}
        before = self.added.get(connection.name, [])
        for gone in before:
            if gone.name not in listed and self._tools.get(gone.name) is gone:
                del self._tools[gone.name]
        added = self.added[connection.name] = []
        for tool in built:
            owner = self._tools.get(tool.name)
            if owner is not None and owner.origin == tool.origin:  # the same server's: kept or updated
                if _same(owner, tool):
                    tool = owner
                self._tools[tool.name] = tool
                added.append(tool)
            elif owner is None:
                self._tools[tool.name] = tool
                added.append(tool)
            else:
                clash = _clash(self.spec, connection, tool.name, owner)
                if clash not in self.clashes:
                    self.clashes.append(clash)
                if self._started:  # a server that came up late: its tool is left out
                    log.error("%s (the tool is left out)", clash)


def _same(old: Tool, new: Tool) -> bool:
    """Whether the model sees no difference between two tools of one server."""
    return (old.description, old.parameters, old.timeout_s, old.approval) == (
        new.description, new.parameters, new.timeout_s, new.approval
    )  # fmt: skip


def _clash(spec: AgentSpec, connection: McpConnection, name: str, owner: Tool) -> str:
    other = owner.origin or "code"
    for index, tool in spec.plugin_tools:
        if tool.name == name:
            other = f"the entry-point tool of tools[{index}] ({owner.origin})"
    return (
        f"{connection.where}: tool {name!r} of MCP server {connection.name!r} clashes with {name!r} of "
        f"{other}; set `prefix:` on the server or leave the tool out with `deny:`"
    )


def _origin(connection: McpConnection) -> str:
    return f"MCP server {connection.name!r} ({connection.where.rpartition(': ')[2]})"


def build_tools(connection: McpConnection) -> tuple[list[Tool], list[str]]:
    """The server's listed tools as qwenrun tools, and what was wrong with the ones left out
    (an unusable name or schema, a name in ``allow``/``deny``/``approval`` that it lacks)."""
    spec = connection.spec
    tools: list[Tool] = []
    problems: list[str] = []
    for listed in connection.listed:
        if not spec.exposes(listed.name):
            continue
        name = spec.prefix + listed.name
        if not re.fullmatch(TOOL_NAME, name):
            shown = ascii(name[:80])
            problems.append(
                f"tool {shown} is left out: not a usable tool name (A-Z a-z 0-9 _ . -, at most 64)"
            )
            continue
        try:
            tool = Tool.from_schema(
                name,
                listed.description or listed.title or "",
                listed.inputSchema,
                _caller(connection, listed.name),
                timeout_s=spec.timeout_s,
                origin=_origin(connection),
                approval=spec.approval_of(listed.name),
            )
        except PluginError as exc:
            problems.append(f"{exc}; the tool is left out")
            continue
        tools.append(tool)
    have = {listed.name for listed in connection.listed}
    named = [("allow", spec.allow or []), ("deny", spec.deny)]
    if isinstance(spec.approval, dict):
        named.append(("approval", list(spec.approval)))
    for key, names in named:
        missing = [name for name in names if name not in have]
        if missing:
            problems.append(
                f"`{key}` names {', '.join(map(repr, missing))}, which the server does not have "
                f"(it has: {', '.join(sorted(have)) or 'no tools'})"
            )
    return tools, problems


def _caller(connection: McpConnection, name: str) -> Any:
    async def call(arguments: dict[str, Any]) -> str | None:
        result = await connection.call_tool(name, arguments)
        text = result_text(result)
        if result.isError:
            raise ToolError(text or f"{name} failed (the server gave no reason)")
        return text

    return call


def result_text(result: types.CallToolResult) -> str | None:
    """What the model reads of a tool result (None: the tool returned nothing)."""
    parts: list[str] = []
    for item in result.content:
        if item.type == "text":
            parts.append(item.text)
        elif item.type in ("image", "audio"):
            size = len(item.data) * 3 // 4
            parts.append(f"({item.type} {item.mimeType}, about {size} bytes: not shown)")
        elif item.type == "resource":
            resource = item.resource
            text = getattr(resource, "text", None)
            kind = resource.mimeType or "binary data"
            parts.append(text if isinstance(text, str) else f"(resource {resource.uri}, {kind}: not shown)")
        elif item.type == "resource_link":
            parts.append(f"(resource {item.uri}: {item.name})")
    if not parts and result.structuredContent is not None:
        return json.dumps(result.structuredContent, ensure_ascii=False, default=str)
    return "\n".join(parts) if parts else None


@dataclass(slots=True)
class ServerReport:
    """What starting one server once showed (``qwenrun tools --agent``, ``--doctor``)."""

    name: str
    where: str
    transport: str
    error: str | None = None
    tools: list[Tool] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def survey(spec: AgentSpec, tools: dict[str, Tool]) -> list[ServerReport]:
    """Start each MCP server of ``spec`` once (no restart), add its tools to ``tools`` (the
    entry-point tools already there), stop them all; one report per server, clashes included."""
    toolset = McpToolset(spec, restart=False)
    try:
        await toolset.start(tools, strict=False)
    finally:
        await toolset.close()
    return [
        ServerReport(
            connection.name,
            connection.where,
            connection.spec.describe(),
            connection.error,
            toolset.added.get(connection.name, []),
            toolset.problems.get(connection.name, [])
            + [clash for clash in toolset.clashes if clash.startswith(connection.where + ":")],
        )
        for connection in toolset.connections
    ]

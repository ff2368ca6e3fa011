"""The agent file's MCP entries: ``tools: [{mcp: {...}, allow: [...], approval: ask}]``.

``mcp:`` names the server and how to reach it: a ``command`` (stdio: qwenrun starts it as a child
process) or a ``url`` (streamable HTTP). Secrets never appear in the file: ``pass_env`` names the
variables of qwenrun's environment that a stdio server gets, ``headers_env`` the variables that
hold HTTP header values; both are read when the server starts (``loading.secret_from_env``).
Pydantic only: validating a file starts no server and needs no network.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from qwenrun.approval import APPROVAL_MODES, Approval
from qwenrun.spec.base import Settings

__all__ = [
    "TOOL_NAME",
    "TOOL_PREFIX",
    "McpStdioServer",
    "McpToolsSpec",
    "approval_for",
    "check_approval",
]

TOOL_NAME = r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$"
"""What a tool name may be (an MCP server's names must match it too, after ``prefix``)."""
TOOL_PREFIX = r"^([A-Za-z_][A-Za-z0-9_.\-]*)?$"
"""What a ``prefix`` (put before each tool name of an MCP server or a toolset) may be."""
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_SERVER_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"


class McpStdioServer(Settings):
    """A server that qwenrun starts as a child process and talks to over stdin/stdout."""

    transport: Literal["stdio"] = Field("stdio", description="Implied by `command`.")
    name: str = Field(pattern=_SERVER_NAME, description="What logs, errors and `qwenrun tools` call it.")
    command: str = Field(min_length=1, description="The program, e.g. uvx, npx or mcp-server-time.")
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Plain (not secret) variables for the server. It inherits only HOME, LOGNAME, "
        "PATH, SHELL, TERM and USER from qwenrun, plus `env` and `pass_env`.",
    )
    pass_env: list[str] = Field(
        default_factory=list,
        description="Names of qwenrun's environment variables the server gets too (secrets go here).",
    )
    cwd: str | None = Field(None, min_length=1, description="Working directory (relative: to the file).")

    @field_validator("pass_env")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            _check_env_name(name)
        return value


class McpHttpServer(Settings):
    """A running server that qwenrun reaches over MCP's streamable HTTP transport."""

    transport: Literal["http"] = Field("http", description="Implied by `url`.")
    name: str = Field(pattern=_SERVER_NAME, description="What logs, errors and `qwenrun tools` call it.")
    url: str = Field(description="The endpoint, e.g. http://127.0.0.1:9000/mcp.")
    headers: dict[str, str] = Field(default_factory=dict, description="Plain (not secret) HTTP headers.")
    headers_env: dict[str, str] = Field(
        default_factory=dict,
        description="Header -> the environment variable holding its whole value, e.g. "
        "{Authorization: FILES_TOKEN} with FILES_TOKEN='Bearer ...'.",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^\s/]+\S*", value):
            raise ValueError("expected an http:// or https:// URL")
        return value

    @field_validator("headers_env")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value.values():
            _check_env_name(name)
        return value


def _check_env_name(name: str) -> None:
    """Refuse what is not a variable name (most likely the secret itself), without printing it."""
    if not re.fullmatch(_ENV_NAME, name):
        raise ValueError(
            "must be the name of an environment variable (e.g. FILES_TOKEN) that holds the value, "
            "not the value itself"
        )


def _transport(value: Any) -> str | None:
    if isinstance(value, dict):
        if "url" in value or value.get("transport") == "http":
            return "http"
        if "command" in value or value.get("transport") == "stdio":
            return "stdio"
        return None
    return getattr(value, "transport", None)


McpServer = Annotated[
    Annotated[McpStdioServer, Tag("stdio")] | Annotated[McpHttpServer, Tag("http")],
    Discriminator(
        _transport,
        custom_error_type="mcp_transport",
        custom_error_message="expected `command` (a stdio server) or `url` (a streamable HTTP server)",
    ),
]


class McpToolsSpec(Settings):
    """The tools of one MCP server: names and schemas come from the server when it starts."""

    mcp: McpServer
    allow: list[Annotated[str, Field(pattern=TOOL_NAME)]] | None = Field(
        None, description="Only these of the server's tools (default: all of them)."
    )
    deny: list[Annotated[str, Field(pattern=TOOL_NAME)]] = Field(
        default_factory=list, description="Never these of the server's tools (hidden from the model)."
    )
    prefix: str = Field(
        "",
        pattern=TOOL_PREFIX,
        description="Put before each tool's name (e.g. `files_`), to avoid a clash with other tools.",
    )
    approval: Approval | dict[Annotated[str, Field(pattern=TOOL_NAME)], Approval] = Field(
        "auto",
        description="auto | ask | deny for every tool of the server, or per tool name "
        "({write_file: ask}; unlisted tools: auto).",
    )
    timeout_s: float | None = Field(
        None, gt=0, description="Time limit of one call (default: agent.timeout_s)."
    )
    startup_timeout_s: float = Field(60, gt=0, description="Time limit for starting and listing the tools.")

    @field_validator("approval", mode="before")
    @classmethod
    def _approval(cls, value: Any) -> Any:
        return check_approval(value)

    @field_validator("deny")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _consistent(self) -> McpToolsSpec:
        if self.allow is not None:
            hidden = sorted(set(self.allow) & set(self.deny))
            if hidden:
                raise ValueError(f"both allowed and denied: {', '.join(hidden)}")
            if isinstance(self.approval, dict):
                unknown = sorted(set(self.approval) - set(self.allow))
                if unknown:
                    raise ValueError(f"approval names tools that `allow` leaves out: {', '.join(unknown)}")
        return self

    @property
    def name(self) -> str:
        return self.mcp.name

    def approval_of(self, tool: str) -> Approval:
        """The approval mode of the server's tool ``tool`` (its name on the server)."""
        return approval_for(self.approval, tool)

    def exposes(self, tool: str) -> bool:
        """Whether the server's tool ``tool`` is offered to the model (``allow`` / ``deny``)."""
        return (self.allow is None or tool in self.allow) and tool not in self.deny

    def describe(self) -> str:
        """``stdio: uvx mcp-server-time`` or ``http: http://...`` for listings."""
        server = self.mcp
        if isinstance(server, McpStdioServer):
            return " ".join(["stdio:", server.command, *server.args])
        return f"http: {server.url}"


def check_approval(value: Any) -> Any:
    """An ``approval:`` setting before validation: one mode, or a mapping of tool names to modes
    (the message names the modes, where pydantic's would list the union's branches)."""
    if isinstance(value, str) and value not in APPROVAL_MODES:
        raise ValueError(f"expected auto, ask or deny, got {value!r}")
    if isinstance(value, dict):
        bad = [f"{key}: {mode!r}" for key, mode in value.items() if mode not in APPROVAL_MODES]
        if bad:
            raise ValueError(f"expected auto, ask or deny for each tool, got {', '.join(map(str, bad))}")
    elif not isinstance(value, str):
        raise ValueError("expected auto, ask or deny, or a mapping of tool names to them")
    return value


def approval_for(setting: Approval | dict[str, Approval], tool: str) -> Approval:
    """The mode an ``approval:`` setting gives the tool ``tool`` (unlisted tools: auto)."""
    return setting.get(tool, "auto") if isinstance(setting, dict) else setting

"""The settings models of the ``frontend:`` table, one per ``frontend.kind`` (default ``cli``).

Pure pydantic: :mod:`qwenrun.spec` builds the agent file from these, and
:mod:`qwenrun.frontends.registry` pairs each with the function that serves it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, PositiveFloat, PositiveInt, Tag, model_validator

from qwenrun.spec.base import Settings

__all__ = [
    "A2AFrontend", "ChainlitFrontend", "CliFrontend", "Frontend", "McpFrontend", "OpenAIFrontend",
]  # fmt: skip


class CliFrontend(Settings):
    """``frontend.kind: cli`` (the default): a REPL in the terminal."""

    kind: Literal["cli"] = "cli"
    show_tool_calls: bool = True


class OpenAIFrontend(Settings):
    """``frontend.kind: openai``: an OpenAI-compatible HTTP server (see docs/server.md)."""

    kind: Literal["openai"]
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key_env: str | None = Field(None, description="Name of the env variable holding the API key.")
    max_request_bytes: PositiveInt = 1_000_000
    max_tokens_cap: PositiveInt | None = Field(None, description="Upper bound on a request's max_tokens.")
    response_retention_days: float | None = Field(
        30, gt=0, description="Days a stored /v1/responses response is kept (null: until deleted)."
    )
    answer_repeated_calls: bool = Field(
        True,
        description="Pass-through mode: when the model writes a call that the request's messages already "
        "hold with its result, stop it and ask for the answer with the tools off (as the agent loop "
        "does), instead of returning the call again or as text.",
    )
    approval_timeout_s: PositiveFloat = Field(
        300, description="How long a call of /v1/responses waits for the client's mcp_approval_response."
    )


class Starter(Settings):
    label: str
    message: str


class ChainlitFrontend(Settings):
    """``frontend.kind: chainlit``: a chat UI in the browser (see docs/chainlit.md)."""

    kind: Literal["chainlit"]
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    title: str | None = None
    watch: bool = False
    welcome: str | None = None
    starters: list[Starter] = Field(default_factory=list)
    password_env: str | None = Field(None, description="Env variable with the password; enables login.")
    username: str = "admin"
    approval_timeout_s: PositiveInt = Field(
        300, description="How long a call of an `approval: ask` tool waits for Approve / Reject."
    )


class A2AFrontend(Settings):
    """``frontend.kind: a2a``: the agent as an A2A server (see docs/a2a.md)."""

    kind: Literal["a2a"]
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    public_url: str | None = Field(
        None, pattern=r"^https?://", description="The URL the agent card gives (default: the one asked)."
    )
    api_key_env: str | None = Field(None, description="Name of the env variable holding the API key.")
    max_request_bytes: PositiveInt = 1_000_000
    max_running_tasks: PositiveInt = Field(32, description="Agent turns running or waiting at once, at most.")
    approval_timeout_s: PositiveInt = Field(
        300, description="How long a task waits in input-required for an approval before it is canceled."
    )


class McpFrontend(Settings):
    """``frontend.kind: mcp``: the agent as an MCP server, one tool (see docs/mcp.md)."""

    kind: Literal["mcp"]
    transport: Literal["stdio", "http"] = Field(
        "stdio", description="stdio (a client starts qwenrun as its child process) or http (streamable HTTP)."
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    path: str = Field("/mcp", pattern=r"^/[A-Za-z0-9_./-]*$", description="The HTTP endpoint's path.")
    api_key_env: str | None = Field(None, description="Name of the env variable holding the API key (http).")
    tool_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="The agent's tool (default: agent.name)."
    )
    expose_tools: bool = Field(False, description="Also offer the agent's own tools, each as a tool.")
    max_request_bytes: PositiveInt = Field(
        1_000_000, description="Largest HTTP request body, and largest `message` on either transport."
    )
    max_concurrent_calls: PositiveInt = Field(8, description="Tool calls running at once; more are refused.")
    turn_timeout_s: PositiveFloat = Field(600, description="Time limit of one call of the agent's tool.")
    approval_timeout_s: PositiveFloat = Field(
        300, description="How long a call of an `approval: ask` tool waits for the client's answer."
    )

    @model_validator(mode="after")
    def _http_only(self) -> McpFrontend:
        if self.transport == "stdio" and self.api_key_env is not None:
            raise ValueError(
                "api_key_env is for transport http (a stdio server talks only to the process that started it)"
            )
        return self


def _kind(value: Any) -> str:
    kind = value.get("kind", "cli") if isinstance(value, dict) else getattr(value, "kind", "cli")
    return kind if isinstance(kind, str) else "cli"


Frontend = Annotated[
    Annotated[CliFrontend, Tag("cli")]
    | Annotated[OpenAIFrontend, Tag("openai")]
    | Annotated[ChainlitFrontend, Tag("chainlit")]
    | Annotated[A2AFrontend, Tag("a2a")]
    | Annotated[McpFrontend, Tag("mcp")],
    Discriminator(_kind),
]
"""The ``frontend:`` table: one of the settings models above, by ``kind`` (default ``cli``)."""

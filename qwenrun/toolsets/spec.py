"""The agent file's built-in toolset entries: ``tools: [{toolset: filesystem, roots: [...]}, ...]``.

One settings model per toolset (``filesystem``, ``fetch``, ``think``, ``todo``), told apart by the
``toolset:`` key; every one has ``prefix`` (put before each of its tool names), ``approval`` (one
mode, or one per tool name) and ``timeout_s``. Each model names the tools it gives
(:meth:`ToolsetBase.tool_names`), so that the agent file's checks (name clashes, ``tool_choice``)
know them without building anything. Pydantic only: validating a file touches no file and no network.
"""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, IPvAnyNetwork, PositiveInt, Tag, field_validator, model_validator

from qwenrun.approval import Approval
from qwenrun.mcp.spec import TOOL_NAME, TOOL_PREFIX, approval_for, check_approval
from qwenrun.spec.base import Settings

__all__ = [
    "FetchToolset",
    "FilesystemToolset",
    "ThinkToolset",
    "TodoToolset",
    "ToolsetBase",
    "ToolsetSpec",
]

class ToolsetBase(Settings):
    """What every toolset entry has."""

    TOOLS: ClassVar[tuple[str, ...]] = ()

    prefix: str = Field(
        "",
        pattern=TOOL_PREFIX,
        description="Put before each tool's name (e.g. `docs_`), to avoid a clash with other tools.",
    )
    approval: Approval | dict[Annotated[str, Field(pattern=TOOL_NAME)], Approval] = Field(
        "auto",
        description="auto | ask | deny for every tool of the toolset, or per tool name (without the "
        "prefix: {write_file: ask}; unlisted tools: auto).",
    )
    timeout_s: float | None = Field(
        None, gt=0, description="Time limit of one call (default: agent.timeout_s)."
    )

    @field_validator("approval", mode="before")
    @classmethod
    def _approval(cls, value: Any) -> Any:
        check_approval(value)
        unknown = sorted(set(value) - set(cls.TOOLS)) if isinstance(value, dict) else []
        if unknown:
            raise ValueError(
                f"no such tool in this toolset: {', '.join(unknown)} (it has: {', '.join(cls.TOOLS)})"
            )
        return value

    @property
    def kind(self) -> str:
        """The entry's ``toolset:`` (filesystem, fetch, ...)."""
        return str(self.model_dump(include={"toolset"})["toolset"])

    def offered(self) -> tuple[str, ...]:
        """The tools this entry gives, without the prefix."""
        return self.TOOLS

    def tool_names(self) -> list[str]:
        """The names the model sees (with the prefix)."""
        return [self.prefix + name for name in self.offered()]

    def approval_of(self, tool: str) -> Approval:
        """The approval mode of the toolset's tool ``tool`` (its name without the prefix)."""
        return approval_for(self.approval, tool)


class FilesystemToolset(ToolsetBase):
    """List, read and search files under declared roots; write and edit them with `write: true`."""

    TOOLS: ClassVar[tuple[str, ...]] = (
        "list_directory",
        "read_file",
        "search_files",
        "write_file",
        "edit_file",
    )
    READ_ONLY: ClassVar[tuple[str, ...]] = ("list_directory", "read_file", "search_files")

    toolset: Literal["filesystem"]
    roots: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1,
        description="The folders the tools may reach (relative: to the agent file). Relative paths of "
        "the model are relative to the first one.",
    )
    write: bool = Field(False, description="Offer write_file and edit_file (default: read-only).")
    max_file_bytes: PositiveInt = Field(
        1_000_000, description="Larger files are not read, searched or written."
    )
    max_entries: PositiveInt = Field(
        500, description="At most this many entries or matches per listing or search."
    )
    max_files_searched: PositiveInt = Field(
        10_000, description="A search stops after reading this many files."
    )

    @field_validator("roots")
    @classmethod
    def _no_nul(cls, value: list[str]) -> list[str]:
        if any("\x00" in root for root in value):
            raise ValueError("a root holds a NUL character")
        return value

    @model_validator(mode="after")
    def _approval_of_offered(self) -> FilesystemToolset:
        if isinstance(self.approval, dict) and not self.write:
            unavailable = sorted(set(self.approval) - set(self.READ_ONLY))
            if unavailable:
                raise ValueError(f"approval names {', '.join(unavailable)}, which need write: true")
        return self

    def offered(self) -> tuple[str, ...]:
        return self.TOOLS if self.write else self.READ_ONLY


class FetchToolset(ToolsetBase):
    """HTTP(S) GET of pages on allowed hosts, with a size cap and a time limit."""

    TOOLS: ClassVar[tuple[str, ...]] = ("fetch",)

    toolset: Literal["fetch"]
    allow_hosts: list[Annotated[str, Field(min_length=1, max_length=253)]] = Field(
        min_length=1,
        description="Host names the tool may fetch from: exact names, `*.example.org` (its subdomains), "
        "or `*` (any host). Checked again on every redirect.",
    )
    ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=lambda: [80, 443], description="The ports a URL may name (default 80 and 443)."
    )
    max_bytes: PositiveInt = Field(500_000, description="At most this many bytes of a body are read.")
    timeout_s: float | None = Field(
        15, gt=0, description="Time limit of one fetch, redirects included (default 15 s)."
    )
    max_redirects: int = Field(
        5, ge=0, le=20, description="Redirects followed, each checked like the first URL."
    )
    allow_private: bool = Field(
        False,
        description="Allow addresses that are not public (loopback, private, link-local, reserved, "
        "multicast); default: refused, checked after DNS resolution.",
    )
    allow_networks: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="Non-public networks to allow anyway, e.g. 10.20.0.0/16 for an intranet host.",
    )
    user_agent: str = Field("qwenrun-fetch/1", min_length=1, max_length=200)

    @field_validator("allow_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        hosts = []
        for host in value:
            with contextlib.suppress(ValueError):  # an IP address: as the URL's host reads it
                hosts.append(str(ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))))
                continue
            bare = host[2:] if host.startswith("*.") else host
            if host != "*" and (not bare or any(c in bare for c in "/:@?#*[] \\")):
                raise ValueError(f"{host!r} is not a host name (e.g. example.org, *.example.org or *)")
            hosts.append(host.lower().rstrip("."))
        return hosts


class ThinkToolset(ToolsetBase):
    """A tool that records a thought and does nothing else (room to reason between calls)."""

    TOOLS: ClassVar[tuple[str, ...]] = ("think",)

    toolset: Literal["think"]


class TodoToolset(ToolsetBase):
    """A to-do list per session, kept in memory: the model writes and reads its plan."""

    TOOLS: ClassVar[tuple[str, ...]] = ("todo_write", "todo_read")

    toolset: Literal["todo"]
    max_items: PositiveInt = Field(50, le=1000, description="At most this many items in one list.")


def _kind(value: Any) -> str | None:
    kind = value.get("toolset") if isinstance(value, dict) else getattr(value, "toolset", None)
    return kind if isinstance(kind, str) else None


ToolsetSpec = Annotated[
    Annotated[FilesystemToolset, Tag("filesystem")]
    | Annotated[FetchToolset, Tag("fetch")]
    | Annotated[ThinkToolset, Tag("think")]
    | Annotated[TodoToolset, Tag("todo")],
    Discriminator(
        _kind,
        custom_error_type="toolset_kind",
        custom_error_message="expected toolset: filesystem, fetch, think or todo",
    ),
]
"""One ``toolset:`` entry of ``tools:``."""

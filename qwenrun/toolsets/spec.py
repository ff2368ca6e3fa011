"""The agent file's built-in toolset entries: ``tools: [{toolset: filesystem, roots: [...]}, ...]``.

One settings model per toolset (``filesystem``, ``fetch``, ``think``, ``todo``, ``shell``,
``python``, ``memory``), told apart by the
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
    "MemoryToolset",
    "PythonToolset",
    "ShellToolset",
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
    """A to-do list per session, kept in the session store: the model writes and reads its plan."""

    TOOLS: ClassVar[tuple[str, ...]] = ("todo_write", "todo_read")

    toolset: Literal["todo"]
    max_items: PositiveInt = Field(50, le=1000, description="At most this many items in one list.")


_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class ProcessSettings(ToolsetBase):
    """What ``shell`` and ``python`` share: a wall-time limit, an output cap and a scrubbed environment."""

    approval: Approval | dict[Annotated[str, Field(pattern=TOOL_NAME)], Approval] = Field(
        "ask",
        description="auto | ask | deny (default ask: every call waits for the session's approver; "
        "without one it is refused).",
    )
    timeout_s: float | None = Field(
        30, gt=0, description="Wall-time limit of one run (default 30 s); then its process group is killed."
    )
    max_output_bytes: PositiveInt = Field(
        100_000, description="At most this many bytes of stdout and stderr together; then the run is stopped."
    )
    path: str = Field(
        "/usr/local/bin:/usr/bin:/bin", min_length=1, description="The PATH of the environment."
    )
    env: dict[Annotated[str, Field(pattern=_ENV_NAME)], str] = Field(
        default_factory=dict,
        description="Variables added to the scrubbed environment (PATH, HOME = the scratch folder, LANG); "
        "nothing else of qwenrun's environment is passed on.",
    )


class ShellToolset(ProcessSettings):
    """Run commands (no shell unless `shell: true`) whose command line matches `allow` and no `deny` glob."""

    TOOLS: ClassVar[tuple[str, ...]] = ("run_command",)

    toolset: Literal["shell"]
    root: str = Field(
        min_length=1,
        description="The folder commands run in (relative: to the agent file); the model's `cwd` is a "
        "folder under it.",
    )
    allow: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1,
        description="Globs (fnmatch) of the whole command line, words joined by one space: `ls*`, "
        "`git status*`, `*` for any command.",
    )
    deny: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="Globs of command lines refused even if `allow` matches."
    )
    shell: bool = Field(
        False,
        description="Run the command line with /bin/sh -c (pipes, redirections, `;`): the globs then "
        "see the raw text and cannot bound what the shell does; default: no shell, metacharacters refused.",
    )
    max_command_chars: PositiveInt = Field(4000, le=100_000, description="The longest command line.")

    @field_validator("root")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("the root holds a NUL character")
        return value


class PythonToolset(ProcessSettings):
    """Run Python code in a subprocess with CPU, memory and wall-time limits, in a scratch folder."""

    TOOLS: ClassVar[tuple[str, ...]] = ("run_python",)

    toolset: Literal["python"]
    cpu_s: PositiveInt = Field(10, le=3600, description="CPU seconds of one run (RLIMIT_CPU).")
    memory_mb: PositiveInt = Field(
        512, ge=64, le=1_048_576, description="Address space of one run in MiB (RLIMIT_AS)."
    )
    scratch: Literal["call", "session"] = Field(
        "call",
        description="The working folder: a new temporary folder per call (default) or one per session "
        "(files stay between the session's calls while the agent runs).",
    )


class MemoryToolset(ToolsetBase):
    """Facts the model remembers, recalls and forgets, kept in the session store."""

    TOOLS: ClassVar[tuple[str, ...]] = ("remember", "recall", "forget")

    toolset: Literal["memory"]
    scope: Literal["agent", "session"] = Field(
        "agent",
        description="agent: one set of facts for every session of the agent (by `namespace`); session: "
        "a set per session (kept with it: a resumed session finds them).",
    )
    namespace: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.:\-]{1,128}$",
        description="Whose facts they are (default: agent.name); agents naming one namespace share them.",
    )
    max_facts: PositiveInt = Field(200, le=10_000, description="At most this many facts in one scope.")
    max_value_chars: PositiveInt = Field(2000, le=100_000, description="The longest fact.")
    max_results: PositiveInt = Field(20, le=1000, description="At most this many facts in one recall.")


def _kind(value: Any) -> str | None:
    kind = value.get("toolset") if isinstance(value, dict) else getattr(value, "toolset", None)
    return kind if isinstance(kind, str) else None


ToolsetSpec = Annotated[
    Annotated[FilesystemToolset, Tag("filesystem")]
    | Annotated[FetchToolset, Tag("fetch")]
    | Annotated[ThinkToolset, Tag("think")]
    | Annotated[TodoToolset, Tag("todo")]
    | Annotated[ShellToolset, Tag("shell")]
    | Annotated[PythonToolset, Tag("python")]
    | Annotated[MemoryToolset, Tag("memory")],
    Discriminator(
        _kind,
        custom_error_type="toolset_kind",
        custom_error_message="expected toolset: filesystem, fetch, think, todo, shell, python or memory",
    ),
]
"""One ``toolset:`` entry of ``tools:``."""

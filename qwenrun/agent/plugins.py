"""Tool plugins: entry points of group ``qwenrun.tools``, one per tool, loaded lazily.

Listing the installed tools reads package metadata only; a plugin's module is imported when an
agent names its tool (or ``qwenrun tools --doctor`` asks). A plugin that fails to import or has a
bad signature is reported, never a crash of the runner. When two packages declare the same tool
name, the one found first on ``sys.path`` wins (as with imports; by package name within one
directory); ``qwenrun tools --doctor`` reports the clash.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from qwenrun.errors import ConfigError, PluginError
from qwenrun.sessions.store import MemoryStore
from qwenrun.spec.agent_file import AgentSpec, ToolSpec
from qwenrun.tools import Tool
from qwenrun.toolsets.registry import Place, build_toolset

try:  # the backport follows the newest metadata semantics on every Python
    from importlib_metadata import EntryPoint, entry_points
except ImportError:  # pragma: no cover - Python >= 3.11's stdlib has the same API
    from importlib.metadata import EntryPoint, entry_points  # type: ignore[assignment]

__all__ = ["check_tools", "doctor", "installed_tools", "load_tools"]

GROUP = "qwenrun.tools"
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ToolEntry:
    """An installed tool, known from package metadata alone (nothing imported yet)."""

    name: str
    target: str
    package: str
    version: str
    entry_point: EntryPoint
    shadowed: tuple[str, ...] = ()
    """The other packages (name and version) that declare the same tool name, and lose."""

    @property
    def origin(self) -> str:
        return f"{self.package} {self.version}".strip()

    def load(self, spec: ToolSpec | None = None) -> Tool:
        """Import the plugin and build the tool. Raises PluginError (import/signature) or
        pydantic's ValidationError (settings)."""
        try:
            function = self.entry_point.load()
        except Exception as exc:  # any import-time failure of third-party code
            raise PluginError(
                f"tool {self.name!r} ({self.target}, from {self.origin}) failed to import: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return Tool.from_function(
            function,
            name=self.name,
            settings=spec.settings if spec else None,
            timeout_s=spec.timeout_s if spec else None,
            origin=self.origin,
            approval=spec.approval if spec else "auto",
        )


def installed_tools() -> dict[str, ToolEntry]:
    """Every tool that an installed distribution declares, by name (first one wins on a clash).

    Scanning the environment's metadata is the slow part of ``qwenrun validate``; the result is
    cached for as long as ``sys.path`` stays the same."""
    return dict(_scan(tuple(sys.path)))


@functools.lru_cache(maxsize=4)
def _scan(path: tuple[str, ...]) -> dict[str, ToolEntry]:
    candidates: dict[str, list[ToolEntry]] = {}
    for entry_point in entry_points(group=GROUP):
        dist = entry_point.dist
        entry = ToolEntry(
            name=entry_point.name,
            target=entry_point.value,
            package=dist.name if dist else "?",
            version=dist.version if dist else "",
            entry_point=entry_point,
        )
        candidates.setdefault(entry.name, []).append(entry)
    found: dict[str, ToolEntry] = {}
    places = [os.path.realpath(place or os.curdir) for place in path]
    for name, entries in sorted(candidates.items()):
        winner, *losers = sorted(entries, key=lambda entry: (_place(entry, places), entry.package))
        if losers:
            shadowed = tuple(loser.origin for loser in losers)
            log.warning(
                "tool %r is declared by %s and %s; %s wins (the first on sys.path); see `qwenrun tools "
                "--doctor`",
                name, winner.origin, ", ".join(shadowed), winner.origin,
            )  # fmt: skip
            winner = dataclasses.replace(winner, shadowed=shadowed)
        found[name] = winner
    return found


def _place(entry: ToolEntry, places: list[str]) -> int:
    """Where the entry's distribution lies on sys.path (0 first; unknown last)."""
    dist = entry.entry_point.dist
    try:
        where = os.path.realpath(str(dist.locate_file(""))) if dist is not None else ""
    except Exception:  # a custom distribution class
        return len(places)
    return places.index(where) if where in places else len(places)


def _unknown_tool(spec: AgentSpec, index: int, name: str, installed: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, installed, n=1, cutoff=0.5)
    message = f"{spec.source}: tools[{index}].name: unknown tool {name!r}"
    if close:
        message += f"; did you mean {close[0]!r}?"
    listing = ", ".join(installed) or "none; install a plugin, e.g. plugins/qwenrun-weather"
    message += f" (installed: {listing})"
    return ConfigError(message)


def check_tools(spec: AgentSpec) -> None:
    """Fail validation for a tool name that no installed plugin provides (metadata only)."""
    installed = installed_tools()
    for index, tool in spec.plugin_tools:
        if tool.name not in installed:
            raise _unknown_tool(spec, index, tool.name, list(installed))


def load_tools(spec: AgentSpec, *, strict: bool = True, store: MemoryStore | None = None) -> list[Tool]:
    """Load the agent's entry-point tools and the tools of its built-in toolsets
    (:mod:`qwenrun.toolsets`), in the file's order (its MCP servers' tools come when they start:
    see :mod:`qwenrun.mcp`). Unknown names and bad settings are ConfigErrors. A plugin that fails
    to import is a PluginError when ``strict``, else logged and skipped. ``store``: the agent's
    session store (the memory toolset keeps its facts there)."""
    installed = installed_tools()
    tools: list[Tool] = []
    base = Path(spec.source).parent if spec.source not in ("<dict>", "<string>") else None
    place = Place(base, spec.agent.name, store)
    toolsets = dict(spec.toolsets)
    for index, tool_spec in enumerate(spec.tools):
        if index in toolsets:
            tools.extend(build_toolset(toolsets[index], f"{spec.source}: tools[{index}]", place))
        if not isinstance(tool_spec, ToolSpec):
            continue
        entry = installed.get(tool_spec.name)
        if entry is None:
            raise _unknown_tool(spec, index, tool_spec.name, list(installed))
        try:
            tools.append(entry.load(tool_spec))
        except ValidationError as exc:
            problems = "\n".join(
                f"{spec.source}: tools[{index}].settings"
                f"{''.join(f'.{part}' for part in err['loc'])}: {err['msg']}"
                for err in exc.errors(include_url=False)
            )
            raise ConfigError(problems) from None
        except PluginError as exc:
            if strict:
                raise PluginError(f"{spec.source}: tools[{index}]: {exc}") from None
            log.warning("skipping tool %r: %s", tool_spec.name, exc)
    return tools


@dataclass(frozen=True, slots=True)
class DoctorReport:
    entry: ToolEntry
    tool: Tool | None
    error: str | None

    @property
    def clash(self) -> str | None:
        """What to say when other packages declare this tool name too."""
        if not self.entry.shadowed:
            return None
        return (f"also declared by {', '.join(self.entry.shadowed)}; {self.entry.origin} wins (the first on "
                "sys.path); uninstall the one you do not want")  # fmt: skip


def doctor() -> list[DoctorReport]:
    """Import every installed tool and report the broken ones with the reason."""
    reports = []
    for entry in installed_tools().values():
        try:
            reports.append(DoctorReport(entry, entry.load(), None))
        except (PluginError, ValidationError) as exc:
            reports.append(DoctorReport(entry, None, str(exc)))
    return reports

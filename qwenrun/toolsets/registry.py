"""``toolset:`` -> the tools it gives: one row per built-in toolset, imported when it is built.

:func:`build_toolset` turns one ``toolset:`` entry of the agent file into ordinary
:class:`~qwenrun.tools.Tool` objects (named with the entry's ``prefix``, with its ``approval`` and
``timeout_s``), so that approvals, time limits and the agent loop treat them like any other tool.
A new toolset is a settings model in :mod:`qwenrun.toolsets.spec`, a module here, and one row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenrun.errors import ConfigError, ToolError
from qwenrun.sessions.store import MemoryStore
from qwenrun.tools import Tool
from qwenrun.toolsets.spec import ToolsetBase

__all__ = ["TOOLSETS", "Place", "build_toolset"]


def _filesystem(settings: Any, place: Place) -> tuple[dict[str, Callable[..., Any]], str]:
    from qwenrun.toolsets.filesystem import FileTools

    tools = FileTools(settings, place.base)
    return {name: getattr(tools, name) for name in settings.offered()}, tools.described()


def _fetch(settings: Any, place: Place) -> tuple[dict[str, Callable[..., Any]], str]:
    from qwenrun.toolsets.fetch import Fetcher

    fetcher = Fetcher(settings)
    return {"fetch": fetcher.fetch}, fetcher.described()


def _think(settings: Any, place: Place) -> tuple[dict[str, Callable[..., Any]], str]:
    from qwenrun.toolsets.think import think

    return {"think": think}, ""


def _todo(settings: Any, place: Place) -> tuple[dict[str, Callable[..., Any]], str]:
    from qwenrun.toolsets.todo import TodoLists

    lists = TodoLists(settings, place.agent, place.store)
    return {"todo_write": lists.todo_write, "todo_read": lists.todo_read}, ""


def _shell(settings: Any, place: Place) -> tuple[dict[str, Callable[..., Any]], str]:
    from qwenrun.toolsets.shell import Shell

    shell = Shell(settings, place.base)
    return {"run_command": shell.run_command}, shell.described()


def _python(settings: Any, place: Place) -> tuple[dict[str, Callable[..., Any]], str]:
    from qwenrun.toolsets.python import PythonRunner

    runner = PythonRunner(settings)
    return {"run_python": runner.run_python}, runner.described()


def _memory(settings: Any, place: Place) -> tuple[dict[str, Callable[..., Any]], str]:
    from qwenrun.toolsets.memory import Memory

    memory = Memory(settings, place.agent, place.store)
    return {"remember": memory.remember, "recall": memory.recall, "forget": memory.forget}, memory.described()


TOOLSETS: dict[str, Callable[[Any, Place], tuple[dict[str, Callable[..., Any]], str]]] = {
    "filesystem": _filesystem,
    "fetch": _fetch,
    "think": _think,
    "todo": _todo,
    "shell": _shell,
    "python": _python,
    "memory": _memory,
}
"""``toolset:`` -> a builder: (the entry's settings, its :class:`Place`) -> its functions by
tool name (without the prefix), and a sentence added to each tool's description."""


@dataclass(frozen=True, slots=True)
class Place:
    """What a toolset may need of its agent: the agent file's folder (relative paths start there),
    the agent's name and its session store (the memory toolset keeps its facts there)."""

    base: Path | None = None
    agent: str = "agent"
    store: MemoryStore | None = None


def build_toolset(settings: ToolsetBase, where: str, place: Place | None = None) -> list[Tool]:
    """The tools of one ``toolset:`` entry (``where``: ``agents/x.yaml: tools[2]``, for errors)."""
    try:
        functions, note = TOOLSETS[settings.kind](settings, place or Place())
    except ToolError as exc:  # e.g. a root that is not a folder
        raise ConfigError(f"{where}: toolset {settings.kind}: {exc}") from None
    tools = []
    for name, function in functions.items():
        tool = Tool.from_function(
            function,
            name=settings.prefix + name,
            timeout_s=_timeout(settings),
            origin=f"built-in toolset {settings.kind} ({where.rpartition(': ')[2]})",
            approval=settings.approval_of(name),
        )
        if note:
            tool = dataclasses.replace(tool, description=f"{tool.description}\n\n{note}".strip())
        tools.append(tool)
    return tools


def _timeout(settings: ToolsetBase) -> float | None:
    """The tool's time limit; the own limit (``timeout_s``) of a fetch or a run comes first, with a
    second to spare (so that its clearer error, and the killing of a process group, come first)."""
    if settings.kind in ("fetch", "shell", "python") and settings.timeout_s is not None:
        return settings.timeout_s + 1
    return settings.timeout_s

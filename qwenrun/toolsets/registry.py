"""``toolset:`` -> the tools it gives: one row per built-in toolset, imported when it is built.

:func:`build_toolset` turns one ``toolset:`` entry of the agent file into ordinary
:class:`~qwenrun.tools.Tool` objects (named with the entry's ``prefix``, with its ``approval`` and
``timeout_s``), so that approvals, time limits and the agent loop treat them like any other tool.
A new toolset is a settings model in :mod:`qwenrun.toolsets.spec`, a module here, and one row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwenrun.errors import ConfigError, ToolError
from qwenrun.tools import Tool
from qwenrun.toolsets.spec import ToolsetBase

__all__ = ["TOOLSETS", "build_toolset"]


def _filesystem(settings: Any, base: Path | None) -> tuple[dict[str, Callable[..., Any]], str]:
    from qwenrun.toolsets.filesystem import FileTools

    tools = FileTools(settings, base)
    return {name: getattr(tools, name) for name in settings.offered()}, tools.described()


def _fetch(settings: Any, base: Path | None) -> tuple[dict[str, Callable[..., Any]], str]:
    from qwenrun.toolsets.fetch import Fetcher

    fetcher = Fetcher(settings)
    return {"fetch": fetcher.fetch}, fetcher.described()


def _think(settings: Any, base: Path | None) -> tuple[dict[str, Callable[..., Any]], str]:
    from qwenrun.toolsets.think import think

    return {"think": think}, ""


def _todo(settings: Any, base: Path | None) -> tuple[dict[str, Callable[..., Any]], str]:
    from qwenrun.toolsets.todo import TodoLists

    lists = TodoLists(settings)
    return {"todo_write": lists.todo_write, "todo_read": lists.todo_read}, ""


def _shell(settings: Any, base: Path | None) -> tuple[dict[str, Callable[..., Any]], str]:
    from qwenrun.toolsets.shell import Shell

    shell = Shell(settings, base)
    return {"run_command": shell.run_command}, shell.described()


def _python(settings: Any, base: Path | None) -> tuple[dict[str, Callable[..., Any]], str]:
    from qwenrun.toolsets.python import PythonRunner

    runner = PythonRunner(settings)
    return {"run_python": runner.run_python}, runner.described()


TOOLSETS: dict[str, Callable[[Any, Path | None], tuple[dict[str, Callable[..., Any]], str]]] = {
    "filesystem": _filesystem,
    "fetch": _fetch,
    "think": _think,
    "todo": _todo,
    "shell": _shell,
    "python": _python,
}
"""``toolset:`` -> a builder: (the entry's settings, the agent file's folder) -> its functions by
tool name (without the prefix), and a sentence added to each tool's description."""


def build_toolset(settings: ToolsetBase, where: str, base: Path | None) -> list[Tool]:
    """The tools of one ``toolset:`` entry (``where``: ``agents/x.yaml: tools[2]``, for errors)."""
    try:
        functions, note = TOOLSETS[settings.kind](settings, base)
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

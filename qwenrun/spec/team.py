"""Agent teams in the agent file: the limits of a team's turn (``team:``) and the checks of the names
that ``agent.delegate_to`` and ``agent.handoffs`` give (``agents:`` holds the agents they name).

* **delegation**: an agent asks another one (a tool ``ask_<name>(task)``), gets its answer back as
  the tool's result and keeps the conversation;
* **handoff**: an agent hands the conversation over (a tool ``transfer_to_<name>``); the other one
  answers the user until it calls ``transfer_back``.

:func:`check_graph` rejects a name that ``agents:`` does not hold and a cycle (an agent that, through
the agents it names, reaches itself); :data:`LOADING` holds the agent files being loaded, so that a
file that names itself (through others) is an error instead of an endless recursion. The runtime is
:mod:`qwenrun.agent.team`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import TypeVar

from pydantic import Field, PositiveInt

from qwenrun.errors import ConfigError
from qwenrun.spec.base import Settings

__all__ = ["MEMBER_NAME", "TeamSpec", "check_graph", "load_file", "tool_names"]

T = TypeVar("T")

MEMBER_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
"""A key of ``agents:`` (it becomes part of tool names: ``ask_<name>``, ``transfer_to_<name>``)."""

LOADING: ContextVar[tuple[str, ...]] = ContextVar("qwenrun_loading_agent_files", default=())
"""The agent files being loaded, outermost first (a member's ``file:`` is loaded inside its team's)."""


class TeamSpec(Settings):
    """Limits of one user turn of a team, that hold whatever the models do."""

    max_depth: PositiveInt = Field(
        3, description="Delegations inside delegations, at most (the first agent asking another is depth 1)."
    )
    max_model_calls: PositiveInt = Field(
        24,
        description="Model calls of one user turn, all the team's agents together; once spent, asking "
        "or handing over to another agent is refused (a tool error the model reads).",
    )
    timeout_s: float = Field(
        120, gt=0, description="Time limit of one delegation: an agent that has not answered then is stopped."
    )
    max_handoffs: PositiveInt = Field(4, description="Handoffs and transfers back of one user turn, at most.")


def tool_names(delegate_to: Sequence[str], handoffs: Sequence[str]) -> list[str]:
    """The tools an agent gets for the agents it names."""
    return [f"ask_{name}" for name in delegate_to] + [f"transfer_to_{name}" for name in handoffs]


def check_graph(source: str, edges: Mapping[str, tuple[str, Sequence[str], Sequence[str]]]) -> None:
    """Check the names of a team: ``edges`` maps each agent (``""``: the file's own agent, else a key
    of ``agents:``) to (where it is in the file, its ``delegate_to``, its ``handoffs``). Raises a
    :class:`ConfigError` naming the path of an unknown name, of a name given twice, or a cycle."""
    members = [name for name in edges if name]
    for node, (where, delegate_to, handoffs) in edges.items():
        for key, names in (("delegate_to", delegate_to), ("handoffs", handoffs)):
            for index, name in enumerate(names):
                if name not in members:
                    raise ConfigError(
                        f"{source}: {where}.{key}[{index}]: {name!r} is not an agent of agents: "
                        f"({', '.join(members) or 'none declared'})"
                    )
                if name == node:
                    raise ConfigError(f"{source}: {where}.{key}[{index}]: an agent cannot name itself")
            twice = sorted({name for name in names if list(names).count(name) > 1})
            if twice:
                raise ConfigError(f"{source}: {where}.{key}: named twice: {', '.join(twice)}")
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        _, delegate_to, handoffs = edges[node]
        for name in [*delegate_to, *handoffs]:
            if state.get(name) == 1:
                cycle = [*path[path.index(name) :], name]
                raise ConfigError(
                    f"{source}: agents: a cycle: {' -> '.join(cycle)} (through "
                    + ", ".join(f"{edges[n][0]}.delegate_to/handoffs" for n in cycle[:-1])
                    + ")"
                )
            if state.get(name) is None:
                walk(name, [*path, name])
        state[node] = 2

    for node in edges:
        if state.get(node) is None:
            walk(node, [node or "agent"])


def load_file(source: str, where: str, file: str, load: Callable[[Path], T]) -> T:
    """Load the agent file ``file`` that ``where`` of the file ``source`` names (relative to it) with
    ``load``; a file that names itself, through any number of files, is a :class:`ConfigError`, and
    so is a member file's own error, prefixed with ``source: where.file:``."""
    base = Path.cwd() if source.startswith("<") else Path(source).parent  # <string>, <dict>: here
    path = (base / file).resolve()
    loading = LOADING.get() or (str(Path(source).resolve()),)
    if str(path) in loading:
        chain = " -> ".join([*loading[loading.index(str(path)) :], str(path)])
        raise ConfigError(f"{source}: {where}.file: a cycle of agent files: {chain}")
    token = LOADING.set((*loading, str(path)))
    try:
        return load(path)
    except ConfigError as exc:  # name it from the file the user loaded: where, then the member's own
        raise ConfigError(f"{source}: {where}.file: {exc}") from None
    finally:
        LOADING.reset(token)

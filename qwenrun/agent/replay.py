"""Replay: re-run the user turns of a recorded session against an agent and compare tool calls.

A regression harness for prompt, model and tool changes: :func:`recorded_turns` reads each turn's
user message and the tool calls the model made (name and arguments, in order) from a
:class:`~qwenrun.sessions.store.StoredSession`; :func:`replay` runs the same user messages, in order, in a
fresh session of the given agent and :func:`compare` lines the two call lists up turn by turn
(``difflib``: calls kept, removed, added). A team's delegated calls (a sub-agent's, between an
``ask_<name>`` call and its result) are compared too, as ``[name] call(...)``. With
``recorded_tools`` the tools answer a call that was recorded with its recorded result (others run
for real), so tool output does not drift.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from qwenrun.agent import Agent
from qwenrun.events import Final, ToolCall, ToolResult
from qwenrun.sessions.store import StoredSession
from qwenrun.tools import Tool

__all__ = ["compare", "format_call", "recorded_turns", "replay"]


def format_call(name: str, arguments: Mapping[str, Any] | str) -> str:
    """``name({"a": 1})``: canonical (sorted keys), so equal calls format equally."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return f"{name}({arguments})"
    return f"{name}({json.dumps(arguments, ensure_ascii=False, sort_keys=True)})"


@dataclass(slots=True)
class RecordedTurn:
    """One recorded turn: the user's message, the tool calls in order, their results."""

    number: int
    prompt: str
    calls: list[str] = field(default_factory=list)
    results: dict[str, deque[str]] = field(default_factory=lambda: defaultdict(deque))
    answer: str = ""


def recorded_turns(stored: StoredSession) -> list[RecordedTurn]:
    """The turns of a stored session, from its ``message`` records."""
    turns: list[RecordedTurn] = []
    names: dict[str, str] = {}  # tool call id -> formatted call
    for record in stored.records:
        message = record.data
        if record.kind == "event" and message.get("type") == "tool_call" and turns:
            # A delegation's call (a team's sub-agent, recorded as an event: docs/teams.md).
            call = format_call(str(message.get("name")), message.get("arguments") or {})
            turns[-1].calls.append(f"[{message.get('agent')}] {call}")
            continue
        if record.kind != "message":
            continue
        role = message.get("role")
        if role == "user":
            turns.append(RecordedTurn(len(turns) + 1, str(message.get("content") or "")))
        elif not turns:
            continue
        elif role == "assistant":
            for call in message.get("tool_calls") or []:
                function = call.get("function", {})
                text = format_call(str(function.get("name")), function.get("arguments") or "{}")
                turns[-1].calls.append(text)
                names[str(call.get("id"))] = text
            if not message.get("tool_calls"):
                turns[-1].answer = str(message.get("content") or "")
        elif role == "tool" and (called := names.get(str(message.get("tool_call_id")))):
            turns[-1].results[called].append(str(message.get("content") or ""))
    return turns


@dataclass(slots=True)
class TurnDiff:
    """A turn's recorded and replayed tool calls, and the diff lines between them."""

    turn: RecordedTurn
    replayed: list[str]
    answer: str
    lines: list[tuple[Literal["=", "-", "+"], str]]

    @property
    def same(self) -> bool:
        return all(mark == "=" for mark, _ in self.lines)


@dataclass(slots=True)
class Diff:
    """The result of a replay: one :class:`TurnDiff` per recorded turn."""

    turns: list[TurnDiff]

    @property
    def differing(self) -> list[TurnDiff]:
        return [turn for turn in self.turns if not turn.same]


def compare(turn: RecordedTurn, replayed: Sequence[str], answer: str = "") -> TurnDiff:
    """Line up the recorded and the replayed calls of a turn (``=`` kept, ``-`` gone, ``+`` new)."""
    lines: list[tuple[Literal["=", "-", "+"], str]] = []
    matcher = difflib.SequenceMatcher(a=turn.calls, b=list(replayed), autojunk=False)
    for tag, a1, a2, b1, b2 in matcher.get_opcodes():
        if tag == "equal":
            lines.extend(("=", call) for call in turn.calls[a1:a2])
            continue
        lines.extend(("-", call) for call in turn.calls[a1:a2])
        lines.extend(("+", call) for call in replayed[b1:b2])
    return TurnDiff(turn, list(replayed), answer, lines)


class _RecordedTool(Tool):
    """A tool that answers a recorded call with its recorded result (in order); others run."""

    recorded: dict[str, deque[str]]

    async def call(self, arguments: Mapping[str, Any]) -> Any:
        results = self.recorded.get(format_call(self.name, arguments))
        if results:
            return results.popleft()
        return await Tool.call(self, arguments)


def _use_recorded_results(agent: Agent, turn: RecordedTurn) -> None:
    for name, tool in list(agent.tools.items()):
        if not isinstance(tool, _RecordedTool):
            fields = {item.name: getattr(tool, item.name) for item in dataclasses.fields(tool)}
            tool = agent.tools[name] = _RecordedTool(**fields)
        tool.recorded = {call: deque(results) for call, results in turn.results.items()}


def _delegation_tools(agent: Agent) -> set[str]:
    """The ``ask_<name>`` tools of ``agent``'s team and of the teams of its members' files."""
    names: set[str] = set()
    teams, seen = [agent.team], set()
    while teams:
        team = teams.pop()
        if team is None or id(team) in seen:
            continue
        seen.add(id(team))
        for name, member in team.members.items():
            names.add(f"ask_{name}")
            teams.append(member.team)
    return names


async def replay(agent: Agent, turns: Sequence[RecordedTurn], *, recorded_tools: bool = False) -> Diff:
    """Run the recorded user messages in a fresh (unrecorded) session of ``agent``; compare."""
    session = agent.session(record=False)
    delegations = _delegation_tools(agent)
    diffs = []
    for turn in turns:
        if recorded_tools:
            _use_recorded_results(agent, turn)
        calls: list[str] = []
        answer = ""
        asking: dict[str, str] = {}  # the delegations in progress: call id -> the agent that asked
        async for event in session.stream(turn.prompt):
            if isinstance(event, ToolCall):
                call = format_call(event.name, event.arguments)
                delegated = bool(asking) and event.agent != next(iter(asking.values()))
                calls.append(f"[{event.agent}] {call}" if delegated else call)
                if event.name in delegations:
                    asking[event.id] = event.agent
            elif isinstance(event, ToolResult):
                asking.pop(event.id, None)
            elif isinstance(event, Final):
                answer = event.text
        diffs.append(compare(turn, calls, answer))
    return Diff(diffs)

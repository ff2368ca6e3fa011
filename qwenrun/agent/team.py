"""Agent teams at run time: the agents of ``agents:`` around the file's own, and their two ways of
working together (the spec and its checks: :mod:`qwenrun.spec.team`; the guide: docs/teams.md).

* **delegation**: ``ask_<name>(task)`` is an ordinary tool of an agent that names ``<name>`` in
  ``agent.delegate_to``. It runs the other agent's own loop in a conversation of its own (on the
  same engine when it has the same model and engine) and returns its answer. Its events (which say
  ``agent: <name>``) are shown and recorded in the caller's session before the tool's result (all
  but its :class:`~qwenrun.events.Final`: its answer is the tool's result).
* **handoff**: ``transfer_to_<name>`` (``agent.handoffs``) hands the conversation over: the other
  agent answers this turn and the next ones, on the same history, until it calls ``transfer_back``.
  A :class:`~qwenrun.events.Notice` (``code: handoff``) marks each change; who holds the
  conversation is read from its history (:func:`held_by`), so a resumed session keeps it.

Limits of one user turn that hold whatever the models do (``team:``): delegations inside
delegations (``max_depth``), model calls of all the agents together (``max_model_calls``; once spent,
asking and handing over fail as tool errors the model reads), the time of one delegation
(``timeout_s``) and the handoffs of one turn (``max_handoffs``).

:class:`Team` is built by the agent of a file with ``agents:`` (:class:`qwenrun.agent.loop.Agent`);
``Session`` runs every turn through :meth:`Team.steps`. This module does not import the loop (it
imports this one): agents and sessions are typed :data:`Any` here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import weakref
from collections.abc import AsyncGenerator, Coroutine
from contextlib import aclosing
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from qwenrun.errors import ToolError
from qwenrun.events import Event, Final, Notice, TextDelta, ToolCall, ToolResult, Usage
from qwenrun.events import to_dict as event_dict
from qwenrun.spec.team import TeamSpec
from qwenrun.tools import Tool

__all__ = ["Team"]

TRANSFER_BACK = "transfer_back"
TRANSFERRED = "The conversation is transferred to {name}."  # what a handoff's tools answer; the
TRANSFERRED_BACK = "The conversation is transferred back."  # history says who holds it (held_by)
GRACE_S = 5.0  # the tool's own time limit is the delegation's plus this: the clearer error comes first


def held_by(messages: list[dict[str, Any]], members: set[str]) -> list[str]:
    """The handoffs in force after ``messages``, oldest first (``[]``: the file's own agent holds the
    conversation), read from the successful results of the handoff tools in the history."""
    held: list[str] = []
    called: dict[str, str] = {}  # tool call id -> the tool's name (a tool message may not say it)
    for message in messages:
        for call in message.get("tool_calls") or ():
            called[str(call.get("id"))] = str(call.get("function", {}).get("name"))
        if message.get("role") != "tool":
            continue
        name = str(message.get("name") or called.get(str(message.get("tool_call_id")), ""))
        content = message.get("content")
        if name == TRANSFER_BACK and content == TRANSFERRED_BACK:
            held = held[:-1]
        elif name.startswith("transfer_to_"):
            to = name.removeprefix("transfer_to_")
            if to in members and content == TRANSFERRED.format(name=to):
                held = [*held, to]
    return held


@dataclass(slots=True)
class TeamTurn:
    """What the agents of one user turn share: the model calls made, the handoffs, and the events
    of delegations that are waiting to be shown in the session that asked."""

    limits: TeamSpec
    model_calls: int = 0
    handoffs: int = 0
    pending: list[Event] = field(default_factory=list)

    def check_budget(self, what: str) -> None:
        if self.model_calls >= self.limits.max_model_calls:
            raise ToolError(
                f"cannot {what}: this turn's {self.limits.max_model_calls} model calls "
                "(team.max_model_calls) are spent; answer with what you have"
            )


TURN: ContextVar[TeamTurn | None] = ContextVar("qwenrun_team_turn", default=None)
DEPTH: ContextVar[int] = ContextVar("qwenrun_team_depth", default=0)


class Team:
    """The agents of one team file: the file's own (``root``) and those of its ``agents:``."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.limits: TeamSpec = root.spec.team
        self.members: dict[str, Any] = {}  # name -> Agent
        self.owned: set[str] = set()  # members with an engine of their own (started and stopped here)
        self.names: dict[int, str] = {id(root): root.name}  # id(agent) -> the name its events carry
        self._handed: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()
        for name, spec in root.spec.members.items():
            shared = spec.model == root.spec.model and spec.engine == root.spec.engine
            member = type(root)(spec, engine=root.engine if shared else None, telemetry=root.telemetry)
            if not shared:
                self.owned.add(name)
            self.members[name] = member
            self.names[id(member)] = name
        targets = set()
        inline = [self.members[name] for name, entry in root.spec.agents.items() if entry.file is None]
        for agent in [root, *inline]:
            settings = agent.spec.agent
            for name in settings.delegate_to:
                agent.tools[f"ask_{name}"] = self._ask_tool(name)
            for name in settings.handoffs:
                agent.tools[f"transfer_to_{name}"] = self._transfer_tool(name)
                targets.add(name)
            if agent is not root:
                agent.team = self  # its turns run here too: its events are named, its calls counted
        for name in targets:
            self.members[name].tools[TRANSFER_BACK] = self._back_tool()

    # -- starting and stopping -------------------------------------------------------------------

    @staticmethod
    def starts(agent: Any) -> list[Coroutine[Any, Any, None]]:
        """What starts with ``agent``: its team's agents if it is a team's first agent."""
        team = agent.team
        return [team.start()] if team is not None and team.root is agent else []

    @staticmethod
    def stops(agent: Any) -> list[Coroutine[Any, Any, None]]:
        team = agent.team
        return [team.shutdown()] if team is not None and team.root is agent else []

    async def start(self) -> None:
        """Start the members' MCP servers, and the engines of those with engines of their own."""
        members = self.members.items()
        starts = [agent.start() if name in self.owned else agent._start_mcp() for name, agent in members]
        await asyncio.gather(*starts)

    async def shutdown(self) -> None:
        for name, member in self.members.items():
            if name in self.owned:
                await member.shutdown()
            else:
                await member.mcp.close()

    # -- the tools -------------------------------------------------------------------------------

    def _ask_tool(self, name: str) -> Tool:
        member = self.members[name]

        async def ask(task: str) -> str:
            """Ask the agent.

            Args:
                task: What the agent should do or answer, with everything it needs to know.
            """
            return await self.delegate(name, task)

        about = member.spec.agent.description or f"the {name} agent"
        description = f"Ask {name} ({about}) to do a task; returns its answer."
        limit = self.limits.timeout_s + GRACE_S
        tool = Tool.from_function(ask, name=f"ask_{name}", timeout_s=limit, origin="team")
        return dataclasses.replace(tool, description=description)

    def _transfer_tool(self, name: str) -> Tool:
        member = self.members[name]

        async def transfer() -> str:
            """Hand the conversation over."""
            self._count_handoff(f"transfer to {name}")
            return TRANSFERRED.format(name=name)

        about = member.spec.agent.description or f"the {name} agent"
        description = f"Hand the conversation over to {name} ({about}); it answers the user from now on."
        tool = Tool.from_function(transfer, name=f"transfer_to_{name}", origin="team")
        return dataclasses.replace(tool, description=description)

    def _back_tool(self) -> Tool:
        async def transfer_back() -> str:
            """Hand the conversation back to the agent that handed it to you, when the user's
            request is not yours to answer."""
            self._count_handoff("transfer back")
            return TRANSFERRED_BACK

        return Tool.from_function(transfer_back, origin="team")

    def _count_handoff(self, what: str) -> None:
        turn = TURN.get()
        if turn is None:
            return
        turn.check_budget(what)
        if turn.handoffs >= self.limits.max_handoffs:
            limit = self.limits.max_handoffs
            raise ToolError(f"cannot {what}: this turn's {limit} handoffs (team.max_handoffs) are spent")
        turn.handoffs += 1

    async def delegate(self, name: str, task: str) -> str:
        """Run agent ``name`` on ``task`` in a conversation of its own; its answer, or a
        :class:`ToolError` when a limit stops it."""
        turn = TURN.get()
        if turn is None:  # called outside a team's turn (a test, a program): a turn of its own
            turn = TeamTurn(self.limits)
            TURN.set(turn)  # this task's context only
        depth = DEPTH.get() + 1
        if depth > self.limits.max_depth:
            limit = self.limits.max_depth
            raise ToolError(f"cannot ask {name}: {limit} delegations deep already (team.max_depth)")
        turn.check_budget(f"ask {name}")
        member = self.members[name]
        session = member.session(record=False)
        uncounted = member.team is None  # a team's agents count their model calls in Team.steps
        token = DEPTH.set(depth)
        final: Final | None = None
        try:
            async with asyncio.timeout(self.limits.timeout_s), aclosing(session.stream(task)) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        continue  # the answer is shown whole, in its Final
                    if uncounted and isinstance(event, Usage):
                        turn.model_calls += event.model_calls
                        event = dataclasses.replace(event, agent=name)
                    elif uncounted:
                        event = dataclasses.replace(event, agent=name)
                    if isinstance(event, Final):
                        final = event  # not shown: one Final ends a turn; the answer is the tool's result
                    else:
                        turn.pending.append(event)
                    if final is None and turn.model_calls > self.limits.max_model_calls:
                        raise ToolError(
                            f"{name} was stopped: this turn's {self.limits.max_model_calls} model calls "
                            "(team.max_model_calls) are spent"
                        )
        except TimeoutError:
            limit_s = self.limits.timeout_s
            raise ToolError(f"{name} gave no answer within {limit_s:g} s (team.timeout_s)") from None
        finally:
            DEPTH.reset(token)
        assert final is not None  # a turn ends with Final unless an exception escapes
        if final.stop_reason != "answer":
            return f"({name} stopped: {final.stop_reason}) {final.text}"
        return final.text

    # -- the turns -------------------------------------------------------------------------------

    @staticmethod
    def turn(
        session: Any, prompt: str, tool_choice: str | None, options: Any, text: bool
    ) -> AsyncGenerator[Event, None]:
        """The steps of one turn of ``session``: through :meth:`steps` if its agent is in a team."""
        team: Team | None = session.agent.team
        if team is None:
            steps: AsyncGenerator[Event, None] = session._steps(prompt, tool_choice, options, text)
            return steps
        return team.steps(session, prompt, tool_choice, options, text)

    async def steps(
        self, session: Any, prompt: str, tool_choice: str | None, options: Any, text: bool
    ) -> AsyncGenerator[Event, None]:
        """One user turn of ``session`` (an agent of this team's): the turn of the agent that holds
        the conversation, with each event named, the model calls counted, the events of
        delegations shown before their results, and the handoffs carried out."""
        turn = TURN.get()
        token = None
        if turn is None:
            token = TURN.set(turn := TeamTurn(self.limits))
        try:
            continued = False
            total = Usage()
            while True:
                held = self._handed.get(session)
                if held is None:  # a session resumed from the store (another replica's, a restart);
                    # a history the client sent (agent_history: client) is not trusted to name one
                    resumed = session.stored and session.store is not None
                    held = held_by(session.messages, set(self.members)) if resumed else []
                    self._handed[session] = held
                runner = self._holder(session, held[-1]) if held else session
                name = self.names[id(runner.agent)]
                handoff: str | None = None
                open_calls = 0
                steps = runner._steps(prompt, None if continued else tool_choice, options, text, continued)
                async with aclosing(steps) as events:
                    async for event in events:
                        for waiting in self._drain(turn, session):
                            yield waiting
                        if not event.agent:
                            event = dataclasses.replace(event, agent=name)
                        if isinstance(event, Usage):
                            turn.model_calls += event.model_calls
                            total += event
                        elif isinstance(event, ToolCall):
                            open_calls += 1
                        elif isinstance(event, ToolResult):
                            open_calls -= 1
                            if not event.is_error and event.name.startswith(("transfer_to_", TRANSFER_BACK)):
                                handoff = event.name.removeprefix("transfer_to_")
                        elif isinstance(event, Final):
                            event = dataclasses.replace(event, usage=total)
                        yield event
                        if handoff is not None and open_calls <= 0:
                            break
                if session is not runner:
                    session.stored = runner.stored
                if handoff is None:
                    return
                if handoff == TRANSFER_BACK:
                    held = held[:-1]
                    to = held[-1] if held else self.names[id(self.root)]
                else:
                    held = [*held, handoff]
                    to = handoff
                self._handed[session] = held
                notice = Notice("handoff", f"{name} hands the conversation to {to}", name=to, agent=name)
                session._write("event", event_dict(notice))
                yield notice
                continued = True
        finally:
            if token is not None:
                TURN.reset(token)

    def _holder(self, session: Any, name: str) -> Any:
        """A session of member ``name`` on ``session``'s conversation: the same history, store and id."""
        holder = self.members[name].session(record=False, approver=session.approver)
        holder.messages = session.messages
        holder.store, holder.id, holder.stored = session.store, session.id, session.stored
        holder._turn, holder._trace = session._turn, session._trace
        return holder

    @staticmethod
    def _drain(turn: TeamTurn, session: Any) -> list[Event]:
        """The delegations' events waiting to be shown; recorded in ``session`` (but their usage)."""
        waiting, turn.pending = turn.pending, []
        for event in waiting:
            if not isinstance(event, Usage):
                session._write("event", event_dict(event))
        return waiting

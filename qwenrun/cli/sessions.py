"""``qwenrun sessions list|show|export`` and ``qwenrun replay``: the recorded sessions, from the shell.

The store is the one of ``--db PATH``, else of the agent file given with ``-f FILE`` (its
``sessions.path``), else the default (``$QWENRUN_SESSIONS_DB``, ``~/.local/share/qwenrun/...``).
Reading never creates a database. ``replay`` exits with 1 when the tool calls differ.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from qwenrun.cli import common
from qwenrun.cli.common import errors, load_spec
from qwenrun.sessions.sqlite import SQLiteStore
from qwenrun.sessions.store import Record, SessionInfo, StoredSession, default_path, store_path

if TYPE_CHECKING:
    from qwenrun.agent import Agent

__all__ = ["replay", "sessions"]

db_option = click.option("--db", type=click.Path(dir_okay=False), help="The session database (SQLite file).")
file_option = click.option(
    "-f", "--file", "agent_file", type=click.Path(dir_okay=False), help="Use this agent file's store."
)


def _store_path(db: str | None, agent_file: str | None) -> str:
    if db:
        return os.path.expanduser(db)
    if agent_file:
        with errors():
            return store_path(load_spec(agent_file, ()))
    return os.path.expanduser(default_path())


def _open(path: str) -> SQLiteStore | None:
    """The store at ``path``, or None when there is no database there (nothing is created)."""
    if path != ":memory:" and not os.path.exists(path):
        return None
    return SQLiteStore(path)


def _get(path: str, session_id: str) -> StoredSession:
    store = _open(path)
    stored = store.get(session_id) if store is not None else None
    if store is not None:
        store.close()
    if stored is None:
        raise click.ClickException(f"no session {session_id!r} in {path}; see `qwenrun sessions list`")
    return stored


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


@click.group()
@db_option
@file_option
@click.pass_context
def sessions(ctx: click.Context, db: str | None, agent_file: str | None) -> None:
    """List, show and export the recorded sessions."""
    ctx.obj = _store_path(db, agent_file)


@sessions.command("list")
@click.option("-n", "--limit", default=20, show_default=True, help="How many sessions, newest first.")
@click.option("--agent", help="Only this agent's sessions.")
@click.pass_obj
def list_sessions(path: str, limit: int, agent: str | None) -> None:
    """The latest sessions: id, last update, agent, front end, turns and first question."""
    store = _open(path)
    found = store.list(limit, agent) if store is not None else []
    if store is not None:
        store.close()
    if not found:
        click.echo(f"No sessions recorded in {path}.", err=True)
        return
    # columns as wide as their longest value: Chainlit's thread ids have 36 characters, qwenrun's 32
    ids = max(32, *(len(_safe(info.id)) for info in found))
    agents = max(16, *(len(_safe(info.agent)) for info in found))
    click.echo(f"{'ID':<{ids}}  {'UPDATED':<19}  {'AGENT':<{agents}} {'FRONTEND':<8} {'TURNS':>5}  TITLE")
    for info in found:
        click.echo(f"{_safe(info.id):<{ids}}  {_when(info.updated)}  {_safe(info.agent):<{agents}} "
                   f"{info.frontend:<8} {info.turns:>5}  {_safe(info.title)}")  # fmt: skip


@sessions.command("show")
@click.argument("session_id")
@click.pass_obj
def show(path: str, session_id: str) -> None:
    """Print a session turn by turn: messages, tool calls and results, usage, timing, errors."""
    stored = _get(path, session_id)
    info = stored.info
    click.echo(f"Session {info.id}: agent {info.agent} ({info.frontend}), model {info.model}")
    click.echo(f"File: {info.source or '(none)'}")
    click.echo(f"Created {_when(info.created)}, updated {_when(info.updated)}; {info.turns} turns, "
               f"{info.messages} messages")  # fmt: skip
    turn = 0
    for record in stored.records:
        if record.turn != turn:
            turn = record.turn
            click.echo(click.style(f"\n── turn {turn} ──", bold=True))
        click.echo(_show_record(record))


def _usage(meta: dict[str, Any]) -> str:
    usage = meta.get("usage") or {}
    if not usage:
        return ""
    return f"{usage.get('prompt_tokens', 0)} + {usage.get('completion_tokens', 0)} tokens"


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _safe(value: object) -> str:
    """Text from the model or a tool, with control characters (terminal escapes) made visible."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", str(value))


def _show_record(record: Record) -> str:
    data: dict[str, Any] = {k: _safe(v) if isinstance(v, str) else v for k, v in record.data.items()}
    meta = record.meta
    if record.kind == "event":
        took = f"{meta.get('duration_s', 0):.2f} s"
        who = f"[{data['agent']}] " if data.get("agent") else ""  # an agent of a team
        if data.get("type") == "tool_call":  # a delegation's (docs/teams.md)
            arguments = json.dumps(data.get("arguments"), ensure_ascii=False)
            return _safe(f"  {who}→ {data.get('name')}({arguments})")
        if data.get("type") == "tool_result":
            return f"  {who}{'✗' if data.get('is_error') else '←'} {data.get('name')}: {data.get('content')}"
        if data.get("type") == "final" and "text" in data:
            return f"  {who}answer: {data['text']}"
        if data.get("type") == "final":
            what = f"{data.get('stop_reason')}, {data.get('tool_calls')} tool calls, {_usage(meta)}, {took}"
            return click.style(f"{who}({what})", dim=True)
        if data.get("type") == "notice":
            return click.style(f"  ! {data.get('message')}", fg="yellow")
        return click.style(f"({data.get('type')}: {data.get('error')}, after {took})", fg="red")
    role = data.get("role")
    if role == "tool":
        mark = "✗" if meta.get("is_error") else "←"
        return f"  {mark} {data.get('name')}: {data.get('content')}"
    lines = []
    if data.get("content"):
        tail = click.style(f"  [{_usage(meta)}]", dim=True) if _usage(meta) else ""
        tail += click.style("  (interrupted)", fg="yellow") if meta.get("interrupted") else ""
        lines.append(f"{role}: {data['content']}{tail}")
    for call in data.get("tool_calls") or []:
        function = call.get("function", {})
        lines.append(_safe(f"  → {function.get('name')}({function.get('arguments')})"))
    return "\n".join(lines)


@sessions.command("export")
@click.argument("session_id")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "markdown"]), default="jsonl", show_default=True)
@click.option("-o", "--output", type=click.File("w", encoding="utf-8"), default="-", help="Default: stdout.")
@click.pass_obj
def export(path: str, session_id: str, fmt: str, output: Any) -> None:
    """Write a session as JSON lines (the session, then every record) or as Markdown."""
    stored = _get(path, session_id)
    lines = _jsonl(stored) if fmt == "jsonl" else _markdown(stored)
    for line in lines:
        output.write(line + "\n")


def _jsonl(stored: StoredSession) -> Iterator[str]:
    yield json.dumps({"type": "session", **dataclasses.asdict(stored.info)}, ensure_ascii=False)
    for record in stored.records:
        body = {"type": record.kind, "seq": record.seq, "turn": record.turn, "created": record.created,
                record.kind: record.data, "meta": record.meta}  # fmt: skip
        yield json.dumps(body, ensure_ascii=False)


def _markdown(stored: StoredSession) -> Iterator[str]:
    info: SessionInfo = stored.info
    yield f"# Session `{info.id}`\n"
    yield f"- Agent: {info.agent} ({info.frontend}), model `{info.model}`"
    yield f"- File: `{info.source or '(none)'}`"
    yield f"- Created {_when(info.created)}, updated {_when(info.updated)}; {info.turns} turns"
    turn = 0
    for record in stored.records:
        if record.turn != turn:
            turn = record.turn
            yield f"\n## Turn {turn}"
        data, meta = record.data, record.meta
        if record.kind == "event" and data.get("type") == "notice":
            yield f"\n*notice: {data.get('message')}*"
        elif record.kind == "event":
            what = data.get("stop_reason") if data.get("type") == "final" else data.get("error")
            took = f"{meta.get('duration_s', 0):.2f} s"
            yield f"\n*{data.get('type')}: {what}; {_usage(meta) or 'no usage'}, {took}*"
        elif data.get("role") == "tool":
            yield f"\n**Tool `{data.get('name')}`{' (error)' if meta.get('is_error') else ''}:**\n"
            yield f"```text\n{data.get('content')}\n```"
        else:
            if data.get("content"):
                yield f"\n**{str(data.get('role')).capitalize()}:** {data['content']}"
            for call in data.get("tool_calls") or []:
                function = call.get("function", {})
                yield f"\n**Assistant** calls `{function.get('name')}` with `{function.get('arguments')}`"


@click.command()
@click.argument("session_id")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@db_option
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a value of FILE.")
@click.option("--tools", "tool_mode", type=click.Choice(["live", "recorded"]), default="live",
              show_default=True, help="recorded: a recorded call gets its recorded result.")  # fmt: skip
def replay(
    session_id: str, file: str | None, db: str | None, overrides: tuple[str, ...], tool_mode: str
) -> None:
    """Re-run a session's user turns against the agent (FILE, else the recorded one) and show where
    the tool calls differ. Exit code 1 when they do."""
    from qwenrun.agent.replay import recorded_turns
    from qwenrun.agent.replay import replay as run_replay
    from qwenrun.frontends.base import run_agent

    stored = _get(_store_path(db, file), session_id)
    file = file or stored.info.source
    if file is None:
        raise click.ClickException(f"session {session_id!r} was recorded without a file: give the FILE")
    turns = recorded_turns(stored)
    with errors():
        agent = common.make_agent(load_spec(file, [*overrides, "sessions.enabled=false"]))
        result: list[Any] = []

        async def body(agent: Agent) -> None:
            result.append(await run_replay(agent, turns, recorded_tools=tool_mode == "recorded"))

        run_agent(agent, body)
    diff = result[0]
    click.echo(f"Replaying session {session_id} ({len(turns)} turns) with {file}")
    for turn in diff.turns:
        mark = click.style("same", fg="green") if turn.same else click.style("DIFFERS", fg="red", bold=True)
        click.echo(f"turn {turn.turn.number} [{mark}]: {' '.join(turn.turn.prompt.split())[:100]}")
        if not turn.lines:
            click.echo("    (no tool calls)")
        for sign, call in turn.lines:
            colour = {"=": None, "-": "red", "+": "green"}[sign]
            click.echo(click.style(f"  {sign if sign != '=' else ' '} {call}", fg=colour))
    differing = len(diff.differing)
    if differing:
        click.echo(f"{differing} of {len(diff.turns)} turns call tools differently", err=True)
        click.get_current_context().exit(1)
    click.echo(f"tool calls match in all {len(diff.turns)} turns", err=True)

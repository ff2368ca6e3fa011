"""The terminal front end: a REPL (``qwenrun up`` with ``frontend.kind: cli``) and one-shot runs.

Thin: it turns agent events into terminal output (the model's reasoning dimmed). ``/reset`` clears
the conversation, ``/exit`` (or end of input) leaves, ``/help`` lists the commands; Ctrl-C stops the
current answer and keeps the session. Text from the model and the tools is printed with its control
characters made visible (:func:`printable`): an ESC in a tool result must not drive the user's
terminal. A call of an ``approval: ask`` tool waits for y/n on the terminal (:func:`console_approver`).
The loop's notices (arguments dropped from a call) are shown with ``-v``.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import TextIO

import click

from qwenrun.agent import Agent, Session
from qwenrun.approval import ApprovalRequest, Approver, escape
from qwenrun.errors import QwenrunError, RequestError
from qwenrun.events import (
    Event,
    Final,
    Notice,
    Reasoning,
    Repair,
    TextDelta,
    ToolCall,
    ToolResult,
    Usage,
    to_dict,
)
from qwenrun.frontends.base import Launch, run_agent
from qwenrun.spec.output import answer_schema

__all__ = ["EventPrinter", "printable", "repl", "run", "run_once"]

PROMPT = ">>> "
COMMANDS = {
    "/help": "this list",
    "/reset": "clear the conversation (it goes on as a new session)",
    "/exit": "leave (also /quit or Ctrl-D)",
}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but tab and newline, DEL, C1
_C1 = re.compile(r"[\x7f-\x9f]")  # what json.dumps(ensure_ascii=False) leaves raw
_COMMAND = re.compile(r"/[A-Za-z?]+")


def printable(text: str) -> str:
    """``text`` (from the model or a tool) safe to print on a terminal: control characters (ESC
    starts the sequences that move the cursor, clear the screen or set the window title) become a
    visible ``\\xNN``; tabs and newlines stay."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text.replace("\r\n", "\n"))


class EventPrinter:
    """Prints events compactly: the reasoning streams dimmed, the answer streams, tool steps get one
    dim line each; the loop's notices one yellow line if ``notices`` (``-v``). A structured answer
    (``agent.output_schema``: the final event's ``output``) is printed as indented JSON instead."""

    def __init__(
        self,
        out: TextIO | None = None,
        *,
        show_tools: bool = True,
        as_json: bool = False,
        notices: bool = False,
        structured: bool = False,
    ) -> None:
        self.out = out
        self.structured = structured  # the answer is JSON: printed indented at the end of the turn
        self._answer = ""
        self.show_tools = show_tools
        self.as_json = as_json
        self.notices = notices
        self._open_line = False
        self._thinking = False  # the last thing printed was reasoning
        self._speaker = ""  # the agent of a team whose answer text was printed last

    def _write(self, text: str) -> None:
        click.echo(text, file=self.out, nl=False)

    def _end_line(self) -> None:
        if self._open_line:
            self._write("\n")
            self._open_line = False

    def __call__(self, event: Event) -> None:
        if self.as_json:
            line = json.dumps(to_dict(event), ensure_ascii=False)
            click.echo(_C1.sub(lambda match: f"\\u{ord(match.group()):04x}", line), file=self.out)
            return
        if isinstance(event, Reasoning):
            text = printable(event.text)
            if not self._thinking:
                self._end_line()
                text = text.lstrip("\n")
            self._write(click.style(text, dim=True))
            self._open_line, self._thinking = not text.endswith("\n"), True
            return
        if isinstance(event, Usage):
            return
        if self._thinking:  # what follows the reasoning starts on a line of its own
            self._thinking = False
            self._end_line()
            if isinstance(event, TextDelta):
                self._write("\n")  # a blank line between the reasoning and the answer
        if isinstance(event, TextDelta):
            if event.agent and event.agent != self._speaker:  # a team: say who answers
                self._end_line()
                self._write(click.style(f"[{printable(event.agent)}] ", bold=True))
                self._speaker = event.agent
            self._answer += event.text
            if not self.structured:
                self._write(printable(event.text))
                self._open_line = not event.text.endswith("\n")
            return
        if isinstance(event, Final):
            self._final(event)
            return
        if isinstance(event, Notice) and not self.notices:
            return
        if isinstance(event, Usage) or (not self.show_tools and not isinstance(event, Repair | Notice)):
            return
        self._end_line()
        who = f"[{printable(event.agent)}] " if event.agent else ""  # an agent of a team
        if isinstance(event, ToolCall):
            args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in event.arguments.items())
            note = " (written in its thinking)" if event.from_thinking else ""
            self._write(click.style(printable(f"  {who}→ {event.name}({args}){note}") + "\n", dim=True))
        elif isinstance(event, ToolResult):
            text = " ".join(printable(event.content).split())
            text = text if len(text) <= 160 else text[:157] + "..."
            colour = "red" if event.is_error else None
            self._write(click.style(f"  {who}← {text}\n", dim=not event.is_error, fg=colour))
        elif isinstance(event, Repair):
            self._write(click.style(f"  ! {printable(event.reason)}\n", fg="yellow"))
        elif isinstance(event, Notice):
            self._write(click.style(f"  {who}! {printable(event.message)}\n", fg="yellow"))

    def _final(self, final: Final) -> None:
        """End the turn's line, with a word when the answer is not all there: cut at max_tokens,
        stopped at max_iterations (the loop's note), or empty."""
        if final.stop_reason == "length":
            note = "(cut off: the answer reached sampling.max_tokens)"
        elif final.stop_reason == "max_iterations":
            note = printable(final.text)
        elif not final.text.strip():
            note = "(the model's answer is empty)"
        else:
            note = ""
        if self.structured and final.output is not None:
            self._end_line()
            self._write(printable(json.dumps(final.output, indent=2, ensure_ascii=False)) + "\n")
        elif self.structured and self._answer:  # cut off or stopped: what the model wrote
            self._write(printable(self._answer))
            self._open_line = not self._answer.endswith("\n")
        self._answer = ""
        if self._open_line:
            self._write("\n")
        if note:
            self._write(click.style(note + "\n", fg="yellow"))
        self._open_line = False


def run(launch: Launch) -> None:
    """``qwenrun up FILE`` for ``frontend.kind: cli``: the REPL (``launch.resume``: continue that
    recorded session)."""
    agent = launch.make_agent(launch.spec)
    resume = launch.resume
    if resume is not None:
        if agent.store is None:
            raise QwenrunError("sessions are not recorded for this agent (sessions.enabled: false)")
        if agent.store.load(resume) is None:
            where = getattr(agent.store, "path", "the session store")
            raise QwenrunError(f"no session {resume!r} in {where}; see `qwenrun sessions list`")

    async def body(agent: Agent) -> None:
        await repl(agent, resume=resume, notices=launch.verbose > 0)

    run_agent(agent, body)


def console_approver(next_line: Callable[[], Awaitable[str | None]]) -> Approver:
    """Ask y/n on stderr before a call runs (the call shown escaped); ``next_line`` reads the
    answer. Only y or yes approves; anything else, or the end of input, rejects."""

    async def approve(request: ApprovalRequest) -> bool:
        origin = f" from {escape(request.origin)}" if request.origin else ""
        origin += f" ({escape(request.rule)})" if request.rule else ""  # the `permissions:` rule that asks
        question = f"  ? run {request.shown()}{origin}? [y/N] "
        click.echo(click.style(question, fg="yellow"), nl=False, err=True)
        answer = await next_line()
        approved = (answer or "").strip().lower() in ("y", "yes")
        verdict = "    approved" if approved else "    rejected"
        click.echo(verdict if answer is not None else "\n" + verdict, err=True)
        return approved

    return approve


async def run_once(agent: Agent, prompt: str, *, as_json: bool = False, notices: bool = False) -> Final:
    """Answer one prompt, printing events as they come (``notices``: the loop's too); approvals
    are read from stdin."""
    printer = EventPrinter(
        as_json=as_json,
        notices=notices,
        structured=answer_schema(agent.spec) is not None,
        show_tools=agent.spec.frontend.kind != "cli" or getattr(agent.spec.frontend, "show_tool_calls", True),
    )
    reader: _LineReader | None = None

    async def next_line() -> str | None:  # stdin is read only if a call needs approval
        nonlocal reader
        reader = reader or _LineReader(sys.stdin)
        return await reader.next()

    final: Final | None = None
    async for event in agent.session(approver=console_approver(next_line)).stream(prompt):
        printer(event)
        if isinstance(event, Final):
            final = event
    assert final is not None
    return final


async def repl(
    agent: Agent, stdin: TextIO | None = None, *, resume: str | None = None, notices: bool = False
) -> None:
    """Read questions until ``/exit`` or end of input; stream each answer.

    ``resume``: the id of a recorded session to continue (its history is loaded from the store);
    ``notices``: show the loop's notices (``-v``).
    """
    show = getattr(agent.spec.frontend, "show_tool_calls", True)
    structured = answer_schema(agent.spec) is not None
    printer = EventPrinter(show_tools=show, notices=notices, structured=structured)
    lines = _LineReader(stdin or sys.stdin)
    session = agent.session(resume, approver=console_approver(lines.next))
    _announce(session, resumed=resume is not None)
    loop = asyncio.get_running_loop()
    click.echo("Type a question; /help lists the commands, /exit leaves. Ctrl-C stops an answer.", err=True)
    while True:
        click.echo(PROMPT, nl=False, err=True)
        line = await lines.next()
        if line is None or line.strip() in ("/exit", "/quit"):
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset()
            click.echo("(conversation cleared)", err=True)
            _announce(session)
            continue
        if text in ("/help", "/?"):
            click.echo("\n".join(f"  {name:<8} {what}" for name, what in COMMANDS.items()), err=True)
            click.echo("  Ctrl-C   stop the answer being written (the conversation stays)", err=True)
            continue
        if _COMMAND.fullmatch(text):  # a typo of a command is not a question for the model
            click.echo(f"unknown command {text}; /help lists the commands", err=True)
            continue
        turn = asyncio.ensure_future(_turn(session, text, printer))
        installed = _on_sigint(loop, turn.cancel)
        try:
            await turn
        except asyncio.CancelledError:
            if not turn.cancelled():
                raise
            click.echo("\n(stopped)", err=True)
        except RequestError as exc:  # e.g. the conversation outgrew max_model_len: the engine is fine
            click.echo(f"\nError: {exc}; /reset starts a new conversation", err=True)
        finally:
            if installed:
                loop.remove_signal_handler(signal.SIGINT)
    click.echo("", err=True)


def _announce(session: Session, *, resumed: bool = False) -> None:
    """Tell the session id on stderr, and how to continue the session later."""
    if session.store is None:
        click.echo(f"Session {session.id} (not recorded)", err=True)
    elif resumed:
        turns = sum(1 for message in session.messages if message.get("role") == "user")
        click.echo(f"Resumed session {session.id} ({turns} turns)", err=True)
    else:
        click.echo(f"Session {session.id} (continue it later with --resume {session.id})", err=True)


async def _turn(session: Session, text: str, printer: EventPrinter) -> None:
    async for event in session.stream(text):
        printer(event)


def _on_sigint(loop: asyncio.AbstractEventLoop, callback: object) -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        loop.add_signal_handler(signal.SIGINT, callback)  # type: ignore[arg-type]
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    return True


class _LineReader:
    """Reads lines in a daemon thread so a blocked ``input`` never holds the event loop."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._wanted = threading.Semaphore(0)
        threading.Thread(target=self._read, daemon=True, name="qwenrun-stdin").start()

    def _read(self) -> None:
        while True:
            self._wanted.acquire()
            try:
                line = self._stream.readline()
            except (OSError, ValueError):
                line = ""
            self._loop.call_soon_threadsafe(self._queue.put_nowait, line or None)
            if not line:
                return

    async def next(self) -> str | None:
        self._wanted.release()
        return await self._queue.get()

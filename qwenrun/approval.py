"""Human approval of tool calls: the seam between the agent loop and whoever approves.

Each tool has an ``approval`` mode from the agent file (``auto``: it runs; ``ask``: a person
approves each call; ``deny``: it never runs). The agent loop knows no front end: a session holds an
:data:`Approver`, an async callback that a front end gives it (the CLI asks y/n on the terminal,
Chainlit shows approve/reject buttons, the OpenAI server answers from a request header). The loop
yields a call's :class:`~qwenrun.events.ToolCall` event first (so the front end has shown it), then
awaits the approver once per ``ask`` call, one call at a time, before any of the turn's calls runs.
A rejected or denied call does not run: the model gets a tool result that says so.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from qwenrun.events import ToolCall, ToolResult

__all__ = [
    "APPROVAL_MODES",
    "Approval",
    "ApprovalRequest",
    "Approver",
    "escape",
    "fixed_approver",
    "review",
    "shown_call",
]

Approval = Literal["auto", "ask", "deny"]
"""``auto``: the call runs; ``ask``: a person approves each call first; ``deny``: it never runs."""

APPROVAL_MODES: tuple[Approval, ...] = ("auto", "ask", "deny")


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """One call that waits for a person: the event the front end showed, and the tool's origin."""

    call: ToolCall
    origin: str = ""  # "qwenrun-weather 0.1.0", "MCP server 'time'"
    rule: str | None = None  # the `permissions:` rule that asks, "permissions.ask[0]: mcp_*"

    def shown(self) -> str:
        """The call as one line of safe text: ``name({"key": "value"})``, see :func:`shown_call`."""
        return shown_call(self.call.name, self.call.arguments)


Approver = Callable[[ApprovalRequest], Awaitable[bool]]
"""Answers True to run the call, False to refuse it. It may take as long as a person needs; a
cancelled turn cancels it."""


def fixed_approver(approve: bool) -> Approver:
    """An approver that always gives the same answer (e.g. from the server's approval header)."""

    async def answer(request: ApprovalRequest) -> bool:
        return approve

    return answer


def escape(text: str) -> str:
    """``text`` with control, format and other invisible code points written as ``\\uXXXX``, so
    that a terminal or a chat shows exactly what the model wrote (no ANSI sequences, no bidi
    overrides, no lines that fake a prompt)."""
    out = []
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            code = ord(char)
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)


def shown_call(name: str, arguments: dict[str, Any]) -> str:
    """``name(arguments as JSON)`` on one line, every invisible or control character escaped."""
    try:
        body = json.dumps(arguments, ensure_ascii=False, sort_keys=True, default=str)
    except (TypeError, ValueError, RecursionError):
        body = repr(arguments)
    return escape(f"{name}({body})")


async def review(
    call: ToolCall, mode: Approval, origin: str, approver: Approver | None, rule: str | None = None
) -> ToolResult | None:
    """None if ``call`` may run; else the tool result that tells the model why it did not.
    ``rule``: the ``permissions:`` rule that gave ``mode`` (None: the tool's ``approval``)."""
    if mode == "auto":
        return None
    if mode == "deny":
        why = "approval: deny" if rule is None else f"denied by the rule {rule}"
        text = f"Error: {call.name} is not allowed here ({why}); the call was not run."
        return ToolResult(call.id, call.name, text, True)
    if approver is None:
        text = (
            f"Error: {call.name} needs a person's approval and nobody can give it here; "
            "the call was not run."
        )
        return ToolResult(call.id, call.name, text, True)
    if await approver(ApprovalRequest(call, origin, rule)):
        return None
    text = f"Error: the user rejected this call of {call.name}; it was not run."
    return ToolResult(call.id, call.name, text, True)

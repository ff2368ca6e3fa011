"""The context of the running turn, readable by any layer: :data:`SESSION_ID`, the id of the
session whose turn is running (set by the agent loop's telemetry for the length of a turn, read by
the JSON log lines and by tools that keep state per session, such as the ``todo`` toolset)."""

from __future__ import annotations

from contextvars import ContextVar

__all__ = ["SESSION_ID"]

SESSION_ID: ContextVar[str | None] = ContextVar("qwenrun_session_id", default=None)

"""The agent: the loop of one user turn (:mod:`~qwenrun.agent.loop`) and what it needs around it:
the tools of the agent file's plugins (:mod:`~qwenrun.agent.plugins`), telemetry
(:mod:`~qwenrun.agent.observability`) and replaying recorded sessions (:mod:`~qwenrun.agent.replay`).

The package exports ``Agent`` and ``Session`` for the rest of qwenrun (programs import them from
``qwenrun``: docs/api.md); the loop is imported on first use, so that importing a helper module of
this package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwenrun.agent.loop import Agent, Session

__all__ = ["Agent", "Session"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from qwenrun.agent import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'qwenrun.agent' has no attribute {name!r}")

"""The agent: the loop of one user turn (:mod:`~qwenrun.agent.loop`) and what it needs around it:
the tools of the agent file's plugins (:mod:`~qwenrun.agent.plugins`), telemetry
(:mod:`~qwenrun.agent.observability`) and replaying recorded sessions (:mod:`~qwenrun.agent.replay`).

``from qwenrun.agent import Agent, Session`` is the public face (also ``from qwenrun import Agent``).
"""

from __future__ import annotations

from qwenrun.agent.loop import Agent, Session

__all__ = ["Agent", "Session"]

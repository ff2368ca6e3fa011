"""The A2A front end (``frontend.kind: a2a``): the agent as an A2A server, on Google's official SDK.

``create_app(agent)`` builds the Starlette app (:mod:`~qwenrun.frontends.a2a.app`), ``serve(agent)``
runs it with uvicorn, ``run(launch)`` is ``qwenrun up``'s entry. Tasks are agent turns
(:mod:`~qwenrun.frontends.a2a.turns`), the agent card says who the agent is
(:mod:`~qwenrun.frontends.a2a.card`). Needs the ``a2a`` extra (``a2a-sdk[http-server]``, uvicorn).
See ``docs/a2a.md``.
"""

from __future__ import annotations

from qwenrun.errors import MissingExtraError

try:
    import a2a.server.routes  # noqa: F401
    import sse_starlette  # noqa: F401
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise MissingExtraError(exc.name or "a2a-sdk", "a2a") from exc

from qwenrun.frontends.a2a.app import create_app, serve
from qwenrun.frontends.base import Launch

__all__ = ["create_app", "run"]


def run(launch: Launch) -> None:
    """``qwenrun up FILE`` for ``frontend.kind: a2a``: serve the agent over A2A."""
    serve(launch.make_agent(launch.spec))

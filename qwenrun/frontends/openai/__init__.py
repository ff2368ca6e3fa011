"""The OpenAI-compatible HTTP front end (``frontend.kind: openai``).

``create_app(agent)`` builds the FastAPI app, ``serve(agent)`` runs it with uvicorn, ``run(launch)``
is ``qwenrun up``'s entry. Needs the
``server`` extra (FastAPI, uvicorn, sse-starlette, prometheus-client). See ``docs/server.md``.
"""

from __future__ import annotations

from qwenrun.errors import MissingExtraError

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import sse_starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise MissingExtraError(exc.name or "fastapi", "server") from exc

from qwenrun.frontends.base import Launch
from qwenrun.frontends.openai.app import create_app, serve

__all__ = ["create_app", "run", "serve"]


def run(launch: Launch) -> None:
    """``qwenrun up FILE`` for ``frontend.kind: openai``: serve the agent over HTTP."""
    serve(launch.make_agent(launch.spec))

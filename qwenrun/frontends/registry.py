"""Front ends: ``frontend.kind`` in the agent file -> its settings model and its ``run``.

:data:`FRONTENDS` is the table. Each row's ``load`` imports the front end's module only when
``qwenrun up`` starts it, so that the optional extras (FastAPI, Chainlit) load only for their own
front end. A new front end is one module with ``run(launch: Launch) -> None`` (its settings model in
:mod:`qwenrun.frontends.settings`) and one row here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwenrun.errors import ConfigError
from qwenrun.frontends.settings import A2AFrontend, ChainlitFrontend, CliFrontend, McpFrontend, OpenAIFrontend
from qwenrun.spec.base import Settings

if TYPE_CHECKING:
    from qwenrun.frontends.base import Launch

__all__ = ["FRONTENDS", "launch"]

Run = Callable[["Launch"], None]


@dataclass(frozen=True, slots=True)
class FrontendKind:
    """One row of :data:`FRONTENDS`: the settings model and a function that imports ``run``."""

    spec: type[Settings]
    load: Callable[[], Run]
    resumes: bool = False  # whether `qwenrun up --resume SESSION_ID` applies


def _console() -> Run:
    from qwenrun.frontends.console import run

    return run


def _openai() -> Run:
    from qwenrun.frontends.openai import run

    return run


def _chainlit() -> Run:
    from qwenrun.frontends.chainlit.app import run

    return run


def _a2a() -> Run:
    from qwenrun.frontends.a2a import run

    return run


def _mcp() -> Run:
    from qwenrun.frontends.mcp import run

    return run


FRONTENDS: dict[str, FrontendKind] = {
    "cli": FrontendKind(CliFrontend, _console, resumes=True),
    "openai": FrontendKind(OpenAIFrontend, _openai),
    "chainlit": FrontendKind(ChainlitFrontend, _chainlit),
    "a2a": FrontendKind(A2AFrontend, _a2a),
    "mcp": FrontendKind(McpFrontend, _mcp),
}


def launch(options: Launch) -> None:
    """Run the front end of ``options.spec`` until it stops."""
    kind = options.spec.frontend.kind
    row = FRONTENDS.get(kind)
    if row is None:  # the config's union and the table disagree: a programming error
        raise ConfigError(f"{options.spec.source}: frontend.kind: no front end {kind!r}")
    if options.resume is not None and not row.resumes:
        raise ConfigError(f"--resume is for frontend.kind cli, not {kind}")
    row.load()(options)

"""Front ends: ``frontend.kind`` in the agent file -> one module of this package each.

:data:`FRONTENDS` is the table: a kind, the settings model of its ``frontend:`` table, and the
``run(launch)`` function that serves it (imported only when ``qwenrun up`` starts it, so that the
optional extras FastAPI and Chainlit load only for their own front end). A new front end is one
module and one line here (its settings model beside it). Every front end consumes the agent's
event stream (:mod:`qwenrun.events`) and keeps its state in its app or session objects.

* ``cli`` (:mod:`qwenrun.frontends.console`): a REPL.
* ``openai`` (:mod:`qwenrun.frontends.openai`): an OpenAI-compatible server.
* ``chainlit`` (:mod:`qwenrun.frontends.chainlit`): a chat UI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, PositiveInt, Tag

from qwenrun.settings import Settings

__all__ = [
    "FRONTENDS",
    "ChainlitFrontend",
    "CliFrontend",
    "Frontend",
    "FrontendKind",
    "OpenAIFrontend",
    "Starter",
]


class CliFrontend(Settings):
    """``frontend.kind: cli`` (the default): a REPL in the terminal."""

    kind: Literal["cli"] = "cli"
    show_tool_calls: bool = True


class OpenAIFrontend(Settings):
    """``frontend.kind: openai``: an OpenAI-compatible HTTP server (see docs/server.md)."""

    kind: Literal["openai"]
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key_env: str | None = Field(None, description="Name of the env variable holding the API key.")
    max_request_bytes: PositiveInt = 1_000_000
    max_tokens_cap: PositiveInt | None = Field(None, description="Upper bound on a request's max_tokens.")
    response_retention_days: float | None = Field(
        30, gt=0, description="Days a stored /v1/responses response is kept (null: until deleted)."
    )
    answer_repeated_calls: bool = Field(
        True,
        description="Pass-through mode: when the model writes a call that the request's messages already "
        "hold with its result, stop it and ask for the answer with the tools off (as the agent loop "
        "does), instead of returning the call again or as text.",
    )


class Starter(Settings):
    label: str
    message: str


class ChainlitFrontend(Settings):
    """``frontend.kind: chainlit``: a chat UI in the browser (see docs/chainlit.md)."""

    kind: Literal["chainlit"]
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    title: str | None = None
    watch: bool = False
    welcome: str | None = None
    starters: list[Starter] = Field(default_factory=list)
    password_env: str | None = Field(None, description="Env variable with the password; enables login.")
    username: str = "admin"
    approval_timeout_s: PositiveInt = Field(
        300, description="How long a call of an `approval: ask` tool waits for Approve / Reject."
    )


def _kind(value: Any) -> str:
    kind = value.get("kind", "cli") if isinstance(value, dict) else getattr(value, "kind", "cli")
    return kind if isinstance(kind, str) else "cli"


Frontend = Annotated[
    Annotated[CliFrontend, Tag("cli")]
    | Annotated[OpenAIFrontend, Tag("openai")]
    | Annotated[ChainlitFrontend, Tag("chainlit")],
    Discriminator(_kind),
]
"""The ``frontend:`` table: one of the settings models above, by ``kind`` (default ``cli``)."""


@dataclass(frozen=True, slots=True)
class FrontendKind:
    """One row of :data:`FRONTENDS`."""

    spec: type[Settings]
    target: str  # "module:function" of its run(launch: qwenrun.frontends.base.Launch) -> None
    resumes: bool = False  # whether `qwenrun up --resume SESSION_ID` applies


FRONTENDS: dict[str, FrontendKind] = {
    "cli": FrontendKind(CliFrontend, "qwenrun.frontends.console:run", resumes=True),
    "openai": FrontendKind(OpenAIFrontend, "qwenrun.frontends.openai:run"),
    "chainlit": FrontendKind(ChainlitFrontend, "qwenrun.frontends.chainlit:run"),
}

"""What every ``qwenrun`` command shares: loading an agent file, building its agent, and the one
place where qwenrun's errors become Click's (a bad file exits with 2, other errors with 1)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from qwenrun.errors import ConfigError, QwenrunError
from qwenrun.spec.agent_file import AgentSpec

if TYPE_CHECKING:
    from qwenrun.agent import Agent

__all__ = ["ConfigProblem", "errors", "load_spec", "make_agent", "set_option"]


class ConfigProblem(click.ClickException):
    """A bad agent file: printed without a traceback, exit code 2."""

    exit_code = 2


@contextmanager
def errors() -> Iterator[None]:
    """Turn qwenrun's errors into Click's: ConfigError exits with 2, any other with 1."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigProblem(str(exc)) from None
    except QwenrunError as exc:
        raise click.ClickException(str(exc)) from None


def load_spec(path: str, overrides: Sequence[str]) -> AgentSpec:
    return AgentSpec.from_file(path, overrides)


def make_agent(spec: AgentSpec) -> Agent:
    """Build the agent of a spec (tests replace this to run without vLLM)."""
    from qwenrun.frontends.base import default_agent

    return default_agent(spec)


set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override a value of the file, e.g. --set engine.max_num_seqs=8 (repeatable).",
)

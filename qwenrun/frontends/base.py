"""What every front end gets and shares: the :class:`Launch` of ``qwenrun up`` (run by
:func:`qwenrun.frontends.registry.launch`) and starting an agent with a status line
(:func:`start_with_status`).

A front end is a module with ``run(launch: Launch) -> None`` that serves until it is stopped; it
builds its agent with ``launch.make_agent`` (the CLI's, which tests replace) and keeps its state
in its own objects, never in module globals.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import click

from qwenrun.agent import Agent
from qwenrun.engines.settings import VLLMEngineSpec
from qwenrun.sessions import open_store
from qwenrun.spec.agent_file import AgentSpec

__all__ = ["Launch", "default_agent", "run_agent", "start_with_status"]


def default_agent(spec: AgentSpec) -> Agent:
    """The agent of a spec as ``qwenrun up`` builds it: its plugins (a broken one is skipped and
    logged), its engine, and the session store its file names."""
    return Agent(spec, strict_plugins=False, store=open_store(spec))


@dataclass(frozen=True, slots=True)
class Launch:
    """What ``qwenrun up FILE`` hands to the front end ``frontend.kind`` names."""

    spec: AgentSpec
    file: str | None = None  # the agent file (a front end may watch it); None: built in code
    overrides: tuple[str, ...] = ()  # the --set overrides it was loaded with
    resume: str | None = None  # a recorded session to continue (front ends with `resumes`)
    make_agent: Callable[[AgentSpec], Agent] = field(default=default_agent)
    verbose: int = 0  # -v given this many times (the terminal shows the loop's notices with -v)


async def start_with_status(agent: Agent) -> None:
    """Start the engine with a status line on stderr."""
    engine = agent.spec.engine
    where = "vLLM" if isinstance(engine, VLLMEngineSpec) else engine.base_url
    click.echo(f"Loading {agent.spec.model.path} ({where}) ...", err=True)
    started = time.perf_counter()
    await agent.start()
    click.echo(
        f"Ready in {time.perf_counter() - started:.1f} s: agent {agent.name!r}, "
        f"tools: {', '.join(agent.tools) or 'none'}.",
        err=True,
    )


def run_agent(agent: Agent, body: Callable[[Agent], Awaitable[Any]]) -> None:
    """Start ``agent`` (with a status line), run ``body(agent)``, shut the agent down; blocking."""

    async def main() -> None:
        try:
            await start_with_status(agent)
            await body(agent)
        finally:
            await agent.shutdown()

    asyncio.run(main())

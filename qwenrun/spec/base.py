"""The base of every settings model of the agent file: unknown keys are errors, defaults validated.

Lives below :mod:`qwenrun.spec.agent_file` so that the registries of engines and front ends
(:mod:`qwenrun.engines`, :mod:`qwenrun.frontends`) can define their settings without importing it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["Settings"]


class Settings(BaseModel):
    """A table of the agent file (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

"""Engine backends: ``engine.kind`` in the agent file -> its settings model and its class.

:data:`ENGINES` is the table. Each row's ``load`` imports the backend's module only when an engine
is built, so that ``qwenrun validate`` never imports vLLM. A new backend is one module (its
settings model in :mod:`qwenrun.engines.settings`) and one row here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qwenrun.engines.settings import OpenAIEngineSpec, VLLMEngineSpec
from qwenrun.errors import ConfigError
from qwenrun.spec.base import Settings

if TYPE_CHECKING:
    from qwenrun.engines.base import Engine
    from qwenrun.spec.agent_file import AgentSpec

__all__ = ["ENGINES", "create_engine"]


@dataclass(frozen=True, slots=True)
class EngineKind:
    """One row of :data:`ENGINES`: the settings model and a function that imports the class."""

    spec: type[Settings]
    load: Callable[[], Callable[[AgentSpec], Engine]]


def _vllm() -> Callable[[AgentSpec], Engine]:
    from qwenrun.engines.vllm.engine import VLLMEngine

    return VLLMEngine


def _openai() -> Callable[[AgentSpec], Engine]:
    from qwenrun.engines.openai import OpenAIEngine

    return OpenAIEngine


ENGINES: dict[str, EngineKind] = {
    "vllm": EngineKind(VLLMEngineSpec, _vllm),
    "openai": EngineKind(OpenAIEngineSpec, _openai),
}


def create_engine(spec: AgentSpec) -> Engine:
    """The engine ``spec.engine.kind`` names (its module is imported now)."""
    kind = spec.engine.kind
    row = ENGINES.get(kind)
    if row is None:  # the spec's union and the table disagree: a programming error
        raise ConfigError(f"{spec.source}: engine.kind: no engine backend {kind!r}")
    return row.load()(spec)

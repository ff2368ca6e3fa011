"""qwenrun: a declarative, YAML-configured agent runner for Qwen models on vLLM.

Importing this package is cheap: vLLM and torch load only when an engine starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qwenrun.errors import ConfigError, EngineError, PluginError, QwenrunError, ToolError
from qwenrun.spec.agent_file import AgentSpec
from qwenrun.version import __version__

if TYPE_CHECKING:
    from qwenrun.agent import Agent, Session

__all__ = [
    "Agent",
    "AgentSpec",
    "ConfigError",
    "EngineError",
    "PluginError",
    "QwenrunError",
    "Session",
    "ToolError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in ("Agent", "Session"):
        from qwenrun import agent

        return getattr(agent, name)
    raise AttributeError(f"module 'qwenrun' has no attribute {name!r}")

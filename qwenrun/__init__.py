"""qwenrun: a declarative, YAML-configured agent runner for Qwen models on vLLM.

This module is the public API (docs/api.md): what a program that embeds qwenrun, or the tests of a
tool plugin, import. Everything else is internal and may change between versions.

Importing it is cheap: the exception tree and the events load at once; the agent, the agent file's
models, tools, the scripted engine and the version (``importlib.metadata``) on first use
(:data:`_LAZY`), and vLLM and torch only when an engine starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qwenrun.errors import (
    ChecksumError,
    ConfigError,
    DiskFullError,
    DownloadError,
    EngineError,
    EvalError,
    MissingExtraError,
    ModelError,
    OutputError,
    PluginError,
    QwenrunError,
    RequestError,
    StoreError,
    ToolError,
)
from qwenrun.events import Event, Final, Notice, Reasoning, Repair, TextDelta, ToolCall, ToolResult, Usage

if TYPE_CHECKING:
    from qwenrun.agent.loop import Agent, Session
    from qwenrun.engines.scripted import ScriptedEngine, tool_call_text
    from qwenrun.spec.agent_file import AgentSpec
    from qwenrun.tools import Tool
    from qwenrun.version import __version__

_LAZY: dict[str, str] = {
    "Agent": "qwenrun.agent.loop",
    "AgentSpec": "qwenrun.spec.agent_file",
    "ScriptedEngine": "qwenrun.engines.scripted",
    "Session": "qwenrun.agent.loop",
    "Tool": "qwenrun.tools",
    "__version__": "qwenrun.version",
    "tool_call_text": "qwenrun.engines.scripted",
}
"""The public names imported on first use, and the module each lives in."""

__all__ = [
    "Agent",
    "AgentSpec",
    "ChecksumError",
    "ConfigError",
    "DiskFullError",
    "DownloadError",
    "EngineError",
    "EvalError",
    "Event",
    "Final",
    "MissingExtraError",
    "ModelError",
    "Notice",
    "OutputError",
    "PluginError",
    "QwenrunError",
    "Reasoning",
    "Repair",
    "RequestError",
    "ScriptedEngine",
    "Session",
    "StoreError",
    "TextDelta",
    "Tool",
    "ToolCall",
    "ToolError",
    "ToolResult",
    "Usage",
    "__version__",
    "tool_call_text",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qwenrun' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

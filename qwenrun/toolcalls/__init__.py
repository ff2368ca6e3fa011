"""Reading model output: thinking, and tool calls in each format Qwen models write.

Pure and stdlib-only (no vLLM, no torch). :class:`OutputParser` / :func:`parse_output` read one
completion into reasoning, answer text and tool calls; ``PARSERS`` maps a format name to its
parser class; :func:`detect_format` picks the format from a model's chat template;
:func:`forced_call` and :func:`thinking_prefill` say how an engine forces a call of a format.
:mod:`qwenrun.toolcalls.hermes` is the Hermes parser (Qwen2.5/Qwen3 JSON calls);
:mod:`qwenrun.toolcalls.lenient` reads bare JSON calls over any format.
"""

from __future__ import annotations

from qwenrun.toolcalls.base import ParseResult
from qwenrun.toolcalls.forcing import FORCED_PREFILL, forced_call, thinking_prefill
from qwenrun.toolcalls.formats import AUTO, PARSERS, HermesParser, detect_format, new_parser, resolve_format
from qwenrun.toolcalls.output import OutputEvent, OutputParser, ParsedOutput, parse_output
from qwenrun.toolcalls.qwen3_coder import Qwen3CoderParser
from qwenrun.toolcalls.thinking import (
    ThinkingParser,
    ThinkingResult,
    prompt_opens_thinking,
    split_thinking,
)

__all__ = [
    "AUTO",
    "FORCED_PREFILL",
    "PARSERS",
    "HermesParser",
    "OutputEvent",
    "OutputParser",
    "ParseResult",
    "ParsedOutput",
    "Qwen3CoderParser",
    "ThinkingParser",
    "ThinkingResult",
    "detect_format",
    "forced_call",
    "new_parser",
    "parse_output",
    "prompt_opens_thinking",
    "resolve_format",
    "split_thinking",
    "thinking_prefill",
]

"""Reading tool calls out of raw model text the way ``vllm serve --tool-call-parser hermes`` does,
and telling when a model meant to call a tool.

:class:`VLLMHermesReader` runs vLLM's own ``Hermes2ProToolParser.extract_tool_calls`` (imported
lazily: ``import qwenrun`` never imports vLLM) on the text, with the request's tools and
``tool_choice: auto``, as vLLM's OpenAI server does for a non-streaming request.

:func:`meant_a_call` is the neutral judge of "format failures": the text meant a call when it holds
a ``<tool_call>`` tag, or a ``"name"`` key (JSON or Python quotes) whose value is one of the
declared tools. A reader that read no call from such a text made a format failure.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from qwenrun.evals.cases import Case
from qwenrun.evals.checker import CheckedCall

__all__ = ["Reading", "VLLMHermesReader", "meant_a_call"]

_NAME_KEY = re.compile(r"""["']name["']\s*:\s*["']([^"'\n]{1,256})["']""")


def meant_a_call(text: str, tool_names: Iterable[str]) -> bool:
    """Whether ``text`` shows a tool call: a ``<tool_call>`` tag or a declared tool's name as the
    value of a ``"name"`` key (however the rest is written: bare, fenced, broken JSON)."""
    if "<tool_call>" in text:
        return True
    names = set(tool_names)
    return any(match.group(1) in names for match in _NAME_KEY.finditer(text))


@dataclass(frozen=True, slots=True)
class Reading:
    """The calls a reader read from one text (well-formed ones only), and whether the text meant
    a call that the reader did not read (a format failure)."""

    calls: list[CheckedCall]
    format_failure: bool


def reading(calls: list[CheckedCall], text: str, tool_names: Iterable[str]) -> Reading:
    return Reading(calls, not calls and meant_a_call(text, tool_names))


class VLLMHermesReader:
    """vLLM's Hermes tool parser (``--tool-call-parser hermes``) on raw model text."""

    name = "vllm-hermes"

    def __init__(self, tokenizer: Any) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

        self._request_type: Any = ChatCompletionRequest
        self._parser_type: Any = Hermes2ProToolParser
        self._tokenizer = tokenizer
        # vLLM logs a traceback for every output it cannot parse; the eval reports those itself.
        logging.getLogger(Hermes2ProToolParser.__module__).setLevel(logging.CRITICAL)

    def read(self, case: Case, text: str) -> Reading:
        request = self._request_type.model_validate(
            {
                "model": "eval",
                "messages": case.openai_messages(),
                "tools": case.openai_tools() or None,
                "tool_choice": "auto",
            }
        )
        parser = self._parser_type(self._tokenizer, request.tools)  # one per request, as vLLM does
        request = parser.adjust_request(request)
        info = parser.extract_tool_calls(text, request=request)
        calls: list[CheckedCall] = []
        if info.tools_called:
            for call in info.tool_calls:
                try:
                    arguments = json.loads(call.function.arguments)
                except ValueError:
                    continue
                if isinstance(arguments, dict):  # what BFCL can score as a call
                    calls.append((call.function.name, arguments))
        return reading(calls, text, case.tool_names)

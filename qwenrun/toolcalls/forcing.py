"""Forcing a tool call in each format: the prefill and the structured-output constraint.

An in-process engine forces a call (``tool_choice`` ``required`` or a tool's name, and the agent's
repair of a malformed call) by prefilling the answer and constraining what follows:

* ``hermes``: prefill ``<tool_call>\\n``, then one JSON object ``{"name", "arguments"}`` by a JSON
  schema (:func:`qwenrun.toolcalls.hermes.forced_call`).
* ``qwen3_coder``: prefill ``<tool_call>\\n``, then ``<function=NAME>``, the parameters in Qwen's
  XML and ``</function>\\n</tool_call>`` by an xgrammar *structural tag* (vLLM's
  ``structured_outputs.structural_tag``): a ``json_schema`` content of style ``qwen_xml`` types the
  values by the tool's schema and keeps its required parameters, so the call is valid.

With thinking on, the call must not start inside a think block: :func:`thinking_prefill` is what
the prefill starts with so that the block is closed first (empty reasoning, as Qwen3's template
renders it for ``enable_thinking=False``). Pure; no vLLM import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qwenrun.toolcalls import hermes
from qwenrun.toolcalls.thinking import END_THINK, THINK, prompt_opens_thinking

__all__ = ["FORCED_PREFILL", "ForcedCall", "forced_call", "qwen_xml_structural_tag", "thinking_prefill"]

FORCED_PREFILL = hermes.FORCED_PREFILL  # "<tool_call>\n", the same in both formats
_XML_END = "\n</function>\n</tool_call>"
_MAX_WHITESPACE = 4  # structural whitespace of a forced XML call (string values are not limited)


@dataclass(frozen=True, slots=True)
class ForcedCall:
    """How to force one call: the answer starts with ``prefill`` and continues under exactly one of
    ``json_schema`` (a JSON Schema) or ``structural_tag`` (an xgrammar structural tag)."""

    prefill: str
    json_schema: dict[str, Any] | None = None
    structural_tag: dict[str, Any] | None = None


def _chosen(tools: Sequence[Mapping[str, Any]], choice: str) -> list[Mapping[str, Any]]:
    functions = [tool.get("function", tool) for tool in tools]
    return [f for f in functions if choice == "required" or f.get("name") == choice]


def qwen_xml_structural_tag(functions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The structural tag of one Qwen3-Coder call of one of ``functions`` (OpenAI function dicts),
    after the prefilled ``<tool_call>\\n``."""
    tags = [
        {
            "type": "tag",
            "begin": f"<function={function.get('name')}>\n",
            "content": {
                "type": "json_schema",
                "json_schema": dict(function.get("parameters") or {"type": "object", "properties": {}}),
                "style": "qwen_xml",
                "max_whitespace_cnt": _MAX_WHITESPACE,
            },
            "end": _XML_END,
        }
        for function in functions
    ]
    body = tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}
    return {"type": "structural_tag", "format": body}


def forced_call(format: str, tools: Sequence[Mapping[str, Any]], choice: str) -> ForcedCall | None:
    """How to force a call of ``format`` (``hermes`` or ``qwen3_coder``) for ``tool_choice``
    ``choice`` (``required`` or a tool's name); None for ``auto``, ``none``, no tools or an unknown
    name (nothing to force)."""
    if choice in ("auto", "none") or not tools:
        return None
    if format == "qwen3_coder":
        chosen = _chosen(tools, choice)
        return ForcedCall(FORCED_PREFILL, structural_tag=qwen_xml_structural_tag(chosen)) if chosen else None
    schema, prefill = hermes.forced_call(tools, choice)
    return ForcedCall(prefill, json_schema=schema) if schema is not None else None


def thinking_prefill(prompt: str, chat_template: str | None) -> str:
    """What a forced answer must start with so that no think block is open when the call begins.

    * the prompt ends inside ``<think>`` (Qwen3 Thinking-2507, QwQ): ``\\n</think>\\n\\n`` closes it;
    * the prompt already holds a closed block (``enable_thinking=False``), or the template knows no
      ``<think>`` (Qwen2.5, Qwen3-Coder): nothing;
    * else (a thinking template with thinking on, e.g. Qwen3): an empty block
      ``<think>\\n\\n</think>\\n\\n``.
    """
    if prompt_opens_thinking(prompt):
        return f"\n{END_THINK}\n\n"
    if prompt.rstrip().endswith(END_THINK) or THINK not in (chat_template or ""):
        return ""
    return f"{THINK}\n\n{END_THINK}\n\n"

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
from qwenrun.toolcalls.values import param_type

__all__ = ["FORCED_PREFILL", "forced_call", "thinking_prefill"]

FORCED_PREFILL = hermes.FORCED_PREFILL  # "<tool_call>\n", the same in both formats
_XML_END = "</function>\n</tool_call>"
_MAX_WHITESPACE = 1  # between the tokens of a JSON value (none needed; one keeps it readable)


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


def _string_option(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    """The string schema among ``anyOf``/``oneOf`` options (the first), else ``schema`` itself."""
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) or ():
            if isinstance(option, Mapping) and param_type(option).kind == "string":
                return option
    return schema


def _string_format(schema: Mapping[str, Any]) -> dict[str, Any]:
    values = schema.get("enum") if isinstance(schema.get("enum"), list) else None
    if values is None and "const" in schema:
        values = [schema["const"]]
    texts = [value for value in values or () if isinstance(value, str)]
    if texts:
        options = [{"type": "const_string", "value": text} for text in texts]
        return options[0] if len(options) == 1 else {"type": "or", "elements": options}
    if isinstance(schema.get("pattern"), str):
        return {"type": "regex", "pattern": schema["pattern"]}
    text: dict[str, Any] = {"type": "any_text", "excludes": ["</parameter>"]}
    if isinstance(schema.get("maxLength"), int):
        text["max_chars"] = schema["maxLength"]
    return text


def _value_format(schema: Any, defs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The format of one parameter's value, as the parser reads it back."""
    schema = schema if isinstance(schema, Mapping) else {}
    ptype = param_type(schema)
    if ptype.kind != "string":
        document = {**schema, "$defs": defs} if defs else dict(schema)
        return {"type": "json_schema", "json_schema": document, "style": "json",
                "max_whitespace_cnt": _MAX_WHITESPACE}  # fmt: skip
    text = _string_format(_string_option(schema))
    if ptype.nullable:
        return {"type": "or", "elements": [{"type": "const_string", "value": "null"}, text]}
    return text


def _function_format(function: Mapping[str, Any]) -> dict[str, Any]:
    name = function.get("name")
    schema = function.get("parameters")
    schema = schema if isinstance(schema, Mapping) else {}
    properties = schema.get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    required = set(schema.get("required") or ())
    defs = schema.get("$defs") if isinstance(schema.get("$defs"), Mapping) else None
    order = [
        *(key for key in properties if key in required),
        *(key for key in properties if key not in required),
    ]
    elements = []
    for key in order:
        value = _value_format(properties[key], defs)
        tag = {"type": "tag", "begin": f"<parameter={key}>\n", "content": value, "end": "\n</parameter>\n"}
        elements.append(tag if key in required else {"type": "optional", "content": tag})
    if not elements:  # no parameters: the call is fixed text (its arguments are {})
        return {"type": "const_string", "value": f"<function={name}>\n{_XML_END}"}
    body = {"type": "sequence", "elements": elements} if len(elements) > 1 else elements[0]
    return {"type": "tag", "begin": f"<function={name}>\n", "content": body, "end": _XML_END}


def qwen_xml_structural_tag(functions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The structural tag of one Qwen3-Coder call of one of ``functions`` (OpenAI function dicts),
    after the prefilled ``<tool_call>\n``."""
    formats = [_function_format(function) for function in functions]
    body = formats[0] if len(formats) == 1 else {"type": "or", "elements": formats}
    return {"type": "structural_tag", "format": body}


def forced_call(
    format: str, tools: Sequence[Mapping[str, Any]], choice: str, *, parallel: bool = False
) -> ForcedCall | None:
    """How to force a call of ``format`` (``hermes`` or ``qwen3_coder``) for ``tool_choice``
    ``choice`` (``required`` or a tool's name); None for ``auto``, ``none``, no tools or an unknown
    name (nothing to force). With ``parallel`` and ``required`` a Hermes answer may go on with more
    ``<tool_call>`` blocks, as ``vllm serve`` allows several calls."""
    if choice in ("auto", "none") or not tools:
        return None
    if format == "qwen3_coder":
        chosen = _chosen(tools, choice)
        return ForcedCall(FORCED_PREFILL, structural_tag=qwen_xml_structural_tag(chosen)) if chosen else None
    schema, prefill = hermes.forced_call(tools, choice)
    if schema is None:
        return None
    if parallel and choice == "required":
        return ForcedCall(prefill, structural_tag=_several_calls(schema))
    return ForcedCall(prefill, json_schema=schema)


def _several_calls(schema: dict[str, Any]) -> dict[str, Any]:
    """One or more Hermes calls after the prefill: ``{call}\n</tool_call>``, then any number of
    ``\n<tool_call>\n{call}\n</tool_call>``; compact JSON (at most one space in a row)."""

    def call() -> dict[str, Any]:
        return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": _MAX_WHITESPACE}

    close = {"type": "const_string", "value": "\n</tool_call>"}
    opening = {"type": "const_string", "value": "\n<tool_call>\n"}
    more = {"type": "sequence", "elements": [opening, call(), close]}
    return {
        "type": "structural_tag",
        "format": {"type": "sequence", "elements": [call(), close, {"type": "star", "content": more}]},
    }


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
    if prompt[-256:].rstrip().endswith(END_THINK) or THINK not in (chat_template or ""):
        return ""
    return f"{THINK}\n\n{END_THINK}\n\n"

"""Typed tool-call arguments of the Qwen3-Coder XML format: text -> JSON value by the tool's schema.

In ``<parameter=NAME>\\nvalue\\n</parameter>`` every value is bare text. The JSON type comes from
the tool's JSON schema, as vLLM's ``qwen3coder_tool_parser`` does it: strings stay as written;
integers, numbers and booleans are converted; objects and arrays are read as JSON, then as a Python
literal (``{'a': 1}``, ``True``); ``null``/``None`` is JSON null where the schema allows it (and for
every non-string type). A value that cannot be converted stays the text it was, so the tool's
own validation names the problem; nothing is guessed (unlike vLLM, ``yes`` for a boolean is not
``false``). An empty value of a non-string parameter is left out, so the tool's default applies.
Pure and stdlib-only; nothing here raises on any input.
"""

from __future__ import annotations

import ast
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["OMIT", "ParamType", "convert", "param_type", "tool_parameter_types"]

_MAX_LITERAL = 100_000  # longest text handed to ast.literal_eval
_NULLS = ("null", "none")
_STRING = ("string", "str", "text", "varchar", "char", "enum")


@dataclass(frozen=True, slots=True)
class ParamType:
    """The JSON type of one parameter: ``kind`` is ``string``, ``integer``, ``number``,
    ``boolean``, ``object``, ``array``, ``null`` or another schema word (read as a literal)."""

    kind: str = "string"
    nullable: bool = False

    @property
    def streams(self) -> bool:
        """A string value can be sent as it is written; other types only once complete."""
        return self.kind == "string"


STRING = ParamType()
OMIT: Any = object()
"""What :func:`convert` returns for a value that is left out."""


def _kind(word: str) -> str:
    """vLLM's spellings of a type, folded onto the JSON-schema names."""
    word = word.strip().lower()
    if word in _STRING:
        return "string"
    if word.startswith(("int", "uint", "long", "short", "unsigned")):
        return "integer"
    if word.startswith(("num", "float", "double")):
        return "number"
    if word in ("boolean", "bool", "binary"):
        return "boolean"
    if word.startswith("dict") or word == "object":
        return "object"
    if word.startswith("list") or word in ("array", "arr"):
        return "array"
    return word


def _enum_kind(values: Sequence[Any]) -> str:
    if values and all(isinstance(v, bool) for v in values):
        return "boolean"
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "integer"
    if values and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return "number"
    return "string"


def param_type(schema: Any, _depth: int = 0) -> ParamType:
    """The :class:`ParamType` of one property schema (``anyOf``/``oneOf``/type lists: the first
    non-null type; ``enum``/``const``: the type of the values; anything else: a string)."""
    if not isinstance(schema, Mapping) or _depth > 8:
        return STRING
    declared = schema.get("type")
    if isinstance(declared, str):
        kind = _kind(declared)
        return ParamType(kind, kind == "null")
    if isinstance(declared, list):
        words = [_kind(w) for w in declared if isinstance(w, str)]
        others = [w for w in words if w != "null"]
        return ParamType(others[0] if others else "null", "null" in words)
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            kinds = [param_type(option, _depth + 1) for option in options]
            nullable = any(k.kind == "null" or k.nullable for k in kinds)
            picked = [k.kind for k in kinds if k.kind != "null"]
            return ParamType(picked[0] if picked else "null", nullable)
    if isinstance(schema.get("enum"), list):
        return ParamType(_enum_kind(schema["enum"]), None in schema["enum"])
    if "const" in schema:
        return ParamType(_enum_kind([schema["const"]]), schema["const"] is None)
    return STRING


def tool_parameter_types(tools: Sequence[Any] | None) -> dict[str, dict[str, ParamType]]:
    """``{function name: {parameter name: ParamType}}`` of OpenAI ``tools`` (entries may also be
    bare function dicts). Entries that are not understood are skipped."""
    table: dict[str, dict[str, ParamType]] = {}
    for tool in tools or ():
        if not isinstance(tool, Mapping):
            continue
        function = tool.get("function", tool)
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
        if not isinstance(properties, Mapping):
            properties = {}
        table[function["name"]] = {str(name): param_type(schema) for name, schema in properties.items()}
    return table


def _plain_json(value: Any) -> Any:
    """``value`` as plain JSON (tuples to lists, no NaN), or OMIT if it cannot be."""
    try:
        return json.loads(json.dumps(value, ensure_ascii=False, allow_nan=False))
    except Exception:  # ValueError (NaN), TypeError (a set, bytes, tuple keys), RecursionError
        return OMIT


def _literal(text: str) -> Any:
    """A Python literal (``{'a': (1, True)}``), or OMIT."""
    if len(text) > _MAX_LITERAL:
        return OMIT
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd escapes warn; process-global, harmless
            return ast.literal_eval(text)
    except Exception:  # ValueError, SyntaxError, RecursionError, MemoryError, ...
        return OMIT


def _structured(text: str, container: bool) -> Any:
    value: Any = OMIT
    if container:
        try:
            value = json.loads(text)
        except Exception:  # JSONDecodeError, RecursionError
            value = OMIT
        if isinstance(value, str):  # a JSON-quoted Python repr: "{'k': 'v'}"
            inner = _literal(value)
            value = inner if inner is not OMIT else value
    if value is OMIT:
        value = _literal(text)
        if container and isinstance(value, str):
            inner = _literal(value)
            value = inner if inner is not OMIT else value
    return OMIT if value is OMIT else _plain_json(value)


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return OMIT
    if not math.isfinite(value):
        return OMIT
    return int(value) if value.is_integer() else value


def convert(text: str, ptype: ParamType) -> Any:
    """The JSON value of parameter text ``text`` (one leading and one trailing newline already
    removed), or :data:`OMIT` for an empty value of a non-string parameter. Never raises."""
    if ptype.kind == "string":
        return None if ptype.nullable and text.lower() in _NULLS else text
    bare = text.strip()
    if not bare:
        return OMIT
    if bare.lower() in _NULLS:
        return None
    value: Any = OMIT
    if ptype.kind == "integer":
        try:
            value = int(bare)
        except ValueError:  # also digit strings past Python's int-size limit
            value = OMIT
    elif ptype.kind == "number":
        value = _number(bare)
    elif ptype.kind == "boolean":
        value = {"true": True, "false": False}.get(bare.lower(), OMIT)
    else:
        value = _structured(bare, ptype.kind in ("object", "array"))
    return text if value is OMIT else value

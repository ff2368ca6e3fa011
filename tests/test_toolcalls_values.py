"""qwenrun.toolcalls.values: parameter types from JSON schemas, and text -> typed JSON values."""

from __future__ import annotations

from typing import Any

import pytest

from qwenrun.toolcalls.values import OMIT, ParamType, convert, param_type, tool_parameter_types

STR, INT, NUM, BOOL = ParamType("string"), ParamType("integer"), ParamType("number"), ParamType("boolean")
OBJ, ARR = ParamType("object"), ParamType("array")


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "string"}, STR),
        ({"type": "integer"}, INT),
        ({"type": "INT64"}, INT),
        ({"type": "float"}, NUM),
        ({"type": "bool"}, BOOL),
        ({"type": "dict"}, OBJ),
        ({"type": "list"}, ARR),
        ({"type": "null"}, ParamType("null", True)),
        ({"type": ["integer", "null"]}, ParamType("integer", True)),
        ({"type": ["null"]}, ParamType("null", True)),
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, ParamType("string", True)),
        ({"anyOf": [{"type": "null"}, {"type": "integer"}, {"type": "string"}]}, ParamType("integer", True)),
        ({"oneOf": [{"type": ["number", "null"]}]}, ParamType("number", True)),
        ({"anyOf": [{"$ref": "#/$defs/X"}]}, STR),
        ({"enum": ["a", "b"]}, STR),
        ({"enum": [1, 2]}, INT),
        ({"enum": [1, 2.5]}, NUM),
        ({"enum": [True, False]}, BOOL),
        ({"enum": ["a", None]}, ParamType("string", True)),
        ({"const": 3}, INT),
        ({"$ref": "#/$defs/X"}, STR),
        ({}, STR),
        ("not a schema", STR),
        ({"type": 3}, STR),
    ],
)
def test_param_type(schema: Any, expected: ParamType) -> None:
    assert param_type(schema) == expected


def test_param_type_of_deep_schema_does_not_recurse_forever() -> None:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(100):
        schema = {"anyOf": [schema]}
    assert param_type(schema) == STR


def test_tool_parameter_types() -> None:
    tools: list[Any] = [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"properties": {"n": {"type": "integer"}}}},
        },
        {"name": "g", "parameters": {"type": "object"}},  # a bare function, no properties
        {"type": "function", "function": {"name": "h", "parameters": None}},
        {"function": {"name": 3}},
        "junk",
    ]
    assert tool_parameter_types(tools) == {"f": {"n": INT}, "g": {}, "h": {}}
    assert tool_parameter_types(None) == {}


@pytest.mark.parametrize(
    ("text", "ptype", "expected"),
    [
        ("  x \n", STR, "  x \n"),
        ("", STR, ""),
        ("null", STR, "null"),
        ("None", ParamType("string", True), None),
        ("nulls", ParamType("string", True), "nulls"),
        (" 42 ", INT, 42),
        ("-7", INT, -7),
        ("4.0", INT, "4.0"),
        ("9" * 5000, INT, "9" * 5000),  # past Python's int-size limit: kept as text
        ("abc", INT, "abc"),
        ("3.5", NUM, 3.5),
        ("3.0", NUM, 3),
        ("12", NUM, 12),
        ("1e3", NUM, 1000),
        ("nan", NUM, "nan"),
        ("inf", NUM, "inf"),
        ("True", BOOL, True),
        ("false", BOOL, False),
        ("yes", BOOL, "yes"),
        ("NULL", INT, None),
        ("none", BOOL, None),
        ("", INT, OMIT),
        ("  \n", OBJ, OMIT),
        ('{"a": [1, null]}', OBJ, {"a": [1, None]}),
        ("{'a': (1, None), 'b': True}", OBJ, {"a": [1, None], "b": True}),
        ("\"{'k': 'v'}\"", OBJ, {"k": "v"}),
        ("[1, 'x']", ARR, [1, "x"]),
        ("'[1]'", ARR, [1]),
        ("not json", OBJ, "not json"),
        ("{1, 2}", ARR, "{1, 2}"),  # a set is no JSON
        ("[NaN]", ARR, "[NaN]"),
        ("[" * 10_000, ARR, "[" * 10_000),
        ("(" * 200_000, ARR, "(" * 200_000),
        ("{1: 2}", OBJ, {"1": 2}),
        ("'text'", ParamType("foo"), "text"),
        ("7", ParamType("foo"), 7),
        ("x", ParamType("null", True), "x"),
    ],
)
def test_convert(text: str, ptype: ParamType, expected: Any) -> None:
    assert convert(text, ptype) == expected
    if expected is not OMIT:
        assert type(convert(text, ptype)) is type(expected)

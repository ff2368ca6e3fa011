"""Tools from typed functions: exact schemas, argument validation, settings, result formatting."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qwenrun.errors import PluginError, ToolError
from qwenrun.tools import Tool, format_result


def get_current_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
    """Get the current weather of a city.

    Args:
        city: The city, e.g. 广州.
        unit: Temperature unit.
    """
    return f"{city}: 25 {unit}"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prefix: str = ">"


async def echo(text: Annotated[str, Field(max_length=10)], times: int = 1, *, settings: Settings) -> str:
    """Repeat a text."""
    await asyncio.sleep(0)
    return settings.prefix + text * times


def test_schema_from_signature_and_docstring() -> None:
    tool = Tool.from_function(get_current_weather)
    assert tool.openai_schema() == {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather of a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city, e.g. 广州."},
                    "unit": {
                        "type": "string",
                        "enum": ["celsius", "fahrenheit"],
                        "default": "celsius",
                        "description": "Temperature unit.",
                    },
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }


def test_settings_are_hidden_from_the_model_and_validated() -> None:
    tool = Tool.from_function(echo, settings={"prefix": "#"})
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "text": {"type": "string", "maxLength": 10},
            "times": {"type": "integer", "default": 1},
        },
        "required": ["text"],
        "additionalProperties": False,
    }
    assert asyncio.run(tool.call({"text": "ab", "times": 2})) == "#abab"
    assert asyncio.run(Tool.from_function(echo).call({"text": "x"})) == ">x"
    with pytest.raises(ValidationError):
        Tool.from_function(echo, settings={"prefx": "#"})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "invalid arguments for get_current_weather: city: Field required"),
        ({"city": 3}, "invalid arguments for get_current_weather: city: Input should be a valid string"),
        (
            {"city": "x", "unit": "kelvin"},
            "invalid arguments for get_current_weather: unit: Input should be 'celsius' or 'fahrenheit'",
        ),
        (
            {"city": "x", "country": "cn"},
            "invalid arguments for get_current_weather: country: Extra inputs are not permitted",
        ),
    ],
)
def test_bad_arguments_name_the_problem(arguments: dict[str, Any], message: str) -> None:
    tool = Tool.from_function(get_current_weather)
    with pytest.raises(ToolError) as info:
        asyncio.run(tool.call(arguments))
    assert str(info.value) == message


def test_sync_tools_run_in_a_thread() -> None:
    tool = Tool.from_function(get_current_weather)
    assert asyncio.run(tool.call({"city": "广州"})) == "广州: 25 celsius"


def untyped(city):  # type: ignore[no-untyped-def]
    return city


def variadic(*cities: str) -> str:
    return ""


def bad_settings(*, settings: dict[str, str]) -> str:
    return ""


@pytest.mark.parametrize(
    ("function", "message"),
    [
        (untyped, "tool 'untyped': parameter 'city' has no type annotation"),
        (variadic, "tool 'variadic': *args is not supported ('cities')"),
        (bad_settings, "tool 'bad_settings': parameter 'settings' must be annotated with a pydantic model"),
    ],
)
def test_unusable_signatures_are_plugin_errors(function: Any, message: str) -> None:
    with pytest.raises(PluginError) as info:
        Tool.from_function(function)
    assert str(info.value) == message


async def noop(arguments: dict[str, Any]) -> str:
    return ""


@pytest.mark.parametrize(
    ("schema", "undeclared"),
    [
        ({"type": "object", "properties": {"city": {}}}, ["required", "x"]),
        ({"type": "object", "properties": {"city": {}}, "additionalProperties": False}, ["required", "x"]),
        ({"type": "object", "properties": {}}, ["city", "required", "x"]),  # takes no arguments
        ({"type": "object", "properties": {"city": {}}, "additionalProperties": True}, []),
        ({"type": "object", "properties": {"city": {}}, "additionalProperties": {"type": "integer"}}, []),
        ({"type": "object", "patternProperties": {"^x": {}}}, []),  # only evaluating the schema tells
        ({"type": "object", "anyOf": [{"properties": {"city": {}}}, {"properties": {"x": {}}}]}, []),
    ],
)
def test_undeclared_names_the_arguments_a_schema_does_not_declare(schema: Any, undeclared: list[str]) -> None:
    tool = Tool.from_schema("t", "", schema, noop)
    assert tool.undeclared({"city": "深圳", "required": ["city"], "x": 1}) == undeclared


def test_a_function_declares_its_parameters_and_kwargs_accept_any_other() -> None:
    assert Tool.from_function(get_current_weather).undeclared(
        {"city": "a", "required": [], "unit": "celsius"}
    ) == ["required"]

    def tagged(city: str, **tags: int) -> str:
        return city + ",".join(f"{k}={v}" for k, v in sorted(tags.items()))

    tool = Tool.from_function(tagged)
    assert tool.parameters["additionalProperties"] is True and tool.undeclared({"city": "a", "days": 2}) == []
    assert (
        asyncio.run(tool.call({"city": "深圳", "days": "2", "n": 1})) == "深圳days=2,n=1"
    )  # checked as ints
    with pytest.raises(
        ToolError, match=r"^invalid arguments for tagged: days: Input should be a valid integer"
    ):
        asyncio.run(tool.call({"city": "深圳", "days": "two"}))


async def test_kwargs_never_reach_the_settings_parameter() -> None:
    async def configured(text: str, *, settings: Settings, **extra: Any) -> str:
        return settings.prefix + text

    tool = Tool.from_function(configured, settings={"prefix": "#"})
    assert await tool.call({"text": "a", "other": 1}) == "#a"
    with pytest.raises(ToolError, match=r"^invalid arguments for configured: settings: not an argument"):
        await tool.call({"text": "a", "settings": {"prefix": "!"}})


def test_settings_given_to_a_tool_without_settings() -> None:
    with pytest.raises(PluginError, match="takes no settings, got: key"):
        Tool.from_function(get_current_weather, settings={"key": 1})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("text", "text"),
        (None, "(the tool returned nothing)"),
        (b"\x00\x01", "(the tool returned 2 bytes of binary data, not shown)"),
        ({"城市": "广州", "t": 25}, '{"城市": "广州", "t": 25}'),
        ([1, 2.5, None], "[1, 2.5, null]"),
        ("x" * 62, "x" * 60 + "\n[truncated: 2 more characters of 62 not shown]"),
    ],
)
def test_format_result_bounds_any_value(value: Any, expected: str) -> None:
    assert format_result(value, limit=60) == expected


def test_format_result_of_an_object_uses_str() -> None:
    class Odd:
        def __str__(self) -> str:
            return "odd"

    assert format_result(Odd(), limit=100) == '"odd"'


# -- a tool from a JSON schema (what an MCP server's tools become) ---------------------------------


async def record(arguments: dict[str, Any]) -> Any:
    return {"got": arguments}


ADD_SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "minimum": 0}},
    "required": ["a", "b"],
    "additionalProperties": False,
}


async def test_a_schema_tool_checks_its_arguments_then_calls() -> None:
    tool = Tool.from_schema(
        "add", "Add.", ADD_SCHEMA, record, timeout_s=3, origin="somewhere", approval="ask"
    )
    assert tool.openai_schema() == {
        "type": "function",
        "function": {"name": "add", "description": "Add.", "parameters": ADD_SCHEMA},
    }
    assert (tool.timeout_s, tool.origin, tool.approval) == (3, "somewhere", "ask")
    assert await tool.call({"a": 1, "b": 2}) == {"got": {"a": 1, "b": 2}}
    with pytest.raises(ToolError) as bad:
        await tool.call({"a": "1", "b": -1, "c": 0})
    assert str(bad.value) == (
        "invalid arguments for add: arguments: Additional properties are not allowed ('c' was unexpected); "
        "a: '1' is not of type 'integer'; b: -1 is less than the minimum of 0"
    )


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ([], "tool 't': its input schema is a list, not an object"),
        ({"type": "array"}, "tool 't': its input schema has type 'array', not 'object'"),
        ({"type": "object", "properties": {"x": {"type": "nonsense"}}},
         "tool 't': its input schema is not a valid JSON Schema (at properties/x/type: 'nonsense' is not valid "
         "under any of the given schemas)"),
        ({"type": "object", "required": "x"}, "tool 't': its input schema is not a valid JSON Schema (at required: "
         "'x' is not of type 'array')"),
    ],
)  # fmt: skip
def test_a_malformed_schema_is_a_plugin_error(schema: Any, message: str) -> None:
    with pytest.raises(PluginError) as error:
        Tool.from_schema("t", "", schema, record)
    assert str(error.value) == message


async def test_a_schema_without_type_is_an_object_and_refs_are_never_fetched() -> None:
    tool = Tool.from_schema("t", "", {"properties": {"x": {"$ref": "https://example.com/x.json"}}}, record)
    assert tool.parameters == {"type": "object", "properties": {"x": {"$ref": "https://example.com/x.json"}}}
    with pytest.raises(
        ToolError, match=r"^cannot check the arguments of t: Unresolvable: https://example.com/x.json$"
    ):
        await tool.call({"x": 1})

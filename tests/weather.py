"""The weather tool as the tests send it in OpenAI requests (one definition for every test file)."""

from __future__ import annotations

from typing import Any


def weather_tool(city: dict[str, Any] | None = None, **parameters: Any) -> dict[str, Any]:
    """``get_current_weather`` as an OpenAI ``tools`` entry: ``city`` is the JSON schema of its one
    argument (a plain string by default), ``parameters`` extra keys of its parameters schema."""
    return {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather of a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": city or {"type": "string"}},
                "required": ["city"],
                **parameters,
            },
        },
    }

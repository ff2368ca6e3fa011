"""The weather tool of the tests, in one place: `get_current_weather` as a Python tool (the seed's
sentence for any city, an error for 火星) and as an OpenAI `tools` entry (`weather_tool`)."""

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


WEATHER = "目前{city}多云到晴，气温28~31℃，吹轻微的偏北风。"
"""The seed's tool result, for any city."""


def weather_of(city: str) -> str:
    """What :func:`get_current_weather` returns for ``city``."""
    return WEATHER.format(city=city)


def get_current_weather(city: str) -> str:
    """Get the current weather of a city.

    Args:
        city: The city, e.g. 广州.
    """
    if city == "火星":
        raise ValueError("no weather station on Mars")
    return weather_of(city)

"""qwenrun tool plugin: the current weather of a city.

One tool, :func:`get_current_weather`, registered in the ``qwenrun.tools`` entry-point
group. It has two backends, picked by :class:`WeatherSettings` (filled from the agent YAML):

* ``mock`` (default): a fixed sentence, for demos and tests; no network.
* ``open-meteo``: a real async client for the free Open-Meteo APIs: the geocoding API turns
  the city into coordinates, the forecast API gives the current conditions, and the tool
  answers with one Chinese sentence (WMO weather code, temperature, wind).

Failures raise :class:`WeatherError` with a message meant to be read by the model.
This package does not import qwenrun.
"""

from __future__ import annotations

import asyncio
import bisect
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:  # httpx is imported when the open-meteo backend runs: listing tools stays fast
    import httpx

__all__ = ["WeatherError", "WeatherSettings", "get_current_weather"]
__version__ = "0.1.0"

_USER_AGENT = f"qwenrun-weather/{__version__}"
_M = TypeVar("_M", bound=BaseModel)
_CURRENT_FIELDS = "temperature_2m,weather_code,wind_speed_10m,wind_direction_10m"

# WMO weather interpretation codes (the table in Open-Meteo's docs), in Chinese.
WMO_CODES_ZH: dict[int, str] = {
    0: "晴",
    1: "大部晴朗",
    2: "局部多云",
    3: "阴",
    45: "有雾",
    48: "有雾凇",
    51: "有小毛毛雨",
    53: "有毛毛雨",
    55: "有大毛毛雨",
    56: "有轻微冻毛毛雨",
    57: "有冻毛毛雨",
    61: "有小雨",
    63: "有中雨",
    65: "有大雨",
    66: "有轻微冻雨",
    67: "有冻雨",
    71: "有小雪",
    73: "有中雪",
    75: "有大雪",
    77: "有米雪",
    80: "有小阵雨",
    81: "有阵雨",
    82: "有强阵雨",
    85: "有小阵雪",
    86: "有大阵雪",
    95: "有雷暴",
    96: "有雷暴并伴有小冰雹",
    99: "有雷暴并伴有大冰雹",
}
_DIRECTIONS_ZH = ("北", "东北", "东", "东南", "南", "西南", "西", "西北")
# Upper bounds (km/h, exclusive) of Beaufort forces 0..11; 118 km/h and above is force 12.
_BEAUFORT_KMH = (1, 6, 12, 20, 29, 39, 50, 62, 75, 89, 103, 118)


class WeatherError(Exception):
    """The weather lookup failed; the message says why, in words meant for the model."""


class WeatherSettings(BaseModel):
    """Settings of :func:`get_current_weather`, from the agent YAML (every field has a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["mock", "open-meteo"] = "mock"
    geocoding_url: str = Field(
        default="https://geocoding-api.open-meteo.com/v1/search", pattern=r"^https?://"
    )
    forecast_url: str = Field(default="https://api.open-meteo.com/v1/forecast", pattern=r"^https?://")
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    language: str = Field(default="zh", min_length=2, max_length=8)


_DEFAULT_SETTINGS = WeatherSettings()


class _Place(BaseModel):
    name: str
    latitude: float
    longitude: float
    country: str | None = None


class _Geocoding(BaseModel):
    # Open-Meteo leaves the "results" key out entirely when nothing matches.
    results: list[_Place] = Field(default_factory=list)


class _Current(BaseModel):
    temperature_2m: float
    weather_code: int
    wind_speed_10m: float
    wind_direction_10m: float


class _Forecast(BaseModel):
    current: _Current


async def get_current_weather(
    city: Annotated[str, Field(min_length=1, max_length=100)],
    *,
    settings: WeatherSettings = _DEFAULT_SETTINGS,
) -> str:
    """Get the current weather of a city: sky condition, temperature and wind, in one sentence.

    Args:
        city: Name of the city, e.g. "广州", "北京" or "Paris".
    """
    city = city.strip()
    if not city:
        raise WeatherError("city must not be empty")
    if settings.backend == "mock":
        return f"目前{city}多云到晴，气温28~31℃，吹轻微的偏北风。"
    return await _open_meteo(city, settings)


async def _open_meteo(city: str, settings: WeatherSettings) -> str:
    headers = {"User-Agent": _USER_AGENT, "Accept": "application/json"}
    import httpx

    timeout = httpx.Timeout(settings.timeout_s)
    async with httpx.AsyncClient(timeout=timeout, headers=headers, follow_redirects=True) as client:
        data = await _get_json(
            client,
            settings.geocoding_url,
            {"name": city, "count": 1, "language": settings.language, "format": "json"},
            "geocoding",
            settings.timeout_s,
        )
        geocoding = _parse(_Geocoding, data, "geocoding", settings.geocoding_url)
        if not geocoding.results:
            raise WeatherError(f"unknown city: {city!r} (Open-Meteo geocoding found no match)")
        place = geocoding.results[0]
        data = await _get_json(
            client,
            settings.forecast_url,
            {
                "latitude": place.latitude,
                "longitude": place.longitude,
                "current": _CURRENT_FIELDS,
                "temperature_unit": "celsius",
                "wind_speed_unit": "kmh",
                "timezone": "auto",
            },
            "forecast",
            settings.timeout_s,
        )
        forecast = _parse(_Forecast, data, "forecast", settings.forecast_url)
    return describe(place.name, place.country, forecast.current)


async def _get_json(
    client: httpx.AsyncClient, url: str, params: dict[str, Any], what: str, timeout_s: float
) -> Any:
    import httpx

    try:
        async with asyncio.timeout(timeout_s):
            response = await client.get(url, params=params)
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise WeatherError(f"Open-Meteo {what} request to {url} timed out after {timeout_s:g} s") from exc
    except httpx.HTTPError as exc:
        raise WeatherError(f"could not reach the Open-Meteo {what} endpoint {url}: {exc}") from exc
    if not response.is_success:
        reason = _error_reason(response)
        raise WeatherError(
            f"Open-Meteo {what} endpoint {url} returned HTTP {response.status_code} "
            f"{response.reason_phrase}" + (f": {reason}" if reason else "")
        )
    try:
        return response.json()
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WeatherError(f"malformed JSON from the Open-Meteo {what} endpoint {url}: {exc}") from exc


def _error_reason(response: httpx.Response) -> str:
    """Open-Meteo reports errors as {"error": true, "reason": "..."}; else use the body text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200]
    if isinstance(body, dict) and isinstance(body.get("reason"), str):
        return str(body["reason"])[:200]
    return ""


def _parse(model: type[_M], data: Any, what: str, url: str) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()[:3]
        )
        raise WeatherError(
            f"malformed response from the Open-Meteo {what} endpoint {url}: {problems}"
        ) from exc


def describe(name: str, country: str | None, current: _Current) -> str:
    """Build the Chinese sentence for the current conditions at a place."""
    where = f"{name}（{country}）" if country else name
    sky = WMO_CODES_ZH.get(current.weather_code, f"天气代码{current.weather_code}")
    temperature = f"{round(current.temperature_2m, 1):g}"
    wind = describe_wind(current.wind_speed_10m, current.wind_direction_10m)
    return f"目前{where}{sky}，气温{temperature}℃，{wind}。"


def describe_wind(speed_kmh: float, direction_deg: float) -> str:
    """Describe the wind the Chinese way, e.g. "北风2级（风速9.7公里/小时）"."""
    force = bisect.bisect_right(_BEAUFORT_KMH, speed_kmh)
    if force == 0:
        return "无风"
    direction = _DIRECTIONS_ZH[int((direction_deg % 360 + 22.5) // 45) % 8]
    return f"{direction}风{force}级（风速{round(speed_kmh, 1):g}公里/小时）"

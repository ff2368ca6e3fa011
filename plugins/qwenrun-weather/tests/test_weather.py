"""Tests of qwenrun-weather. None touches the internet: the Open-Meteo client talks to a
replay server on 127.0.0.1 (see conftest.py) serving recorded responses."""

import inspect
import socket
from importlib.metadata import entry_points
from typing import Any

import pytest
import qwenrun_weather
from pydantic import ValidationError
from qwenrun_weather import WeatherError, WeatherSettings, describe_wind, get_current_weather

GUANGZHOU_ZH = "目前广州（中国）局部多云，气温24.3℃，北风2级（风速9.7公里/小时）。"


def meteo(
    server: Any, geocoding: str = "/v1/search", forecast: str = "/v1/forecast", **kw: Any
) -> WeatherSettings:
    return WeatherSettings(
        backend="open-meteo",
        geocoding_url=server.base_url + geocoding,
        forecast_url=server.base_url + forecast,
        **kw,
    )


# -- mock backend -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_mock_sentence_is_the_seed_sentence() -> None:
    assert await get_current_weather("广州") == "目前广州多云到晴，气温28~31℃，吹轻微的偏北风。"
    mock = WeatherSettings(backend="mock")
    assert (
        await get_current_weather("北京", settings=mock) == "目前北京多云到晴，气温28~31℃，吹轻微的偏北风。"
    )


@pytest.mark.asyncio
async def test_blank_city_is_rejected() -> None:
    with pytest.raises(WeatherError, match="city must not be empty"):
        await get_current_weather("   ")


# -- open-meteo backend against the replay server ---------------------------------------------------


@pytest.mark.asyncio
async def test_open_meteo_answers_in_chinese(open_meteo: Any) -> None:
    assert await get_current_weather("Guangzhou", settings=meteo(open_meteo)) == GUANGZHOU_ZH
    (geo_path, geo), (fc_path, fc) = open_meteo.requests
    assert geo_path == "/v1/search"
    assert geo == {"name": "Guangzhou", "count": "1", "language": "zh", "format": "json"}
    assert fc_path == "/v1/forecast"
    assert fc["latitude"] == "23.11667" and fc["longitude"] == "113.25"
    assert fc["current"] == "temperature_2m,weather_code,wind_speed_10m,wind_direction_10m"


@pytest.mark.asyncio
async def test_language_setting_reaches_geocoding(open_meteo: Any) -> None:
    answer = await get_current_weather("Guangzhou", settings=meteo(open_meteo, language="en"))
    assert answer == "目前Guangzhou（China）局部多云，气温24.3℃，北风2级（风速9.7公里/小时）。"
    assert open_meteo.requests[0][1]["language"] == "en"


@pytest.mark.asyncio
async def test_unknown_city(open_meteo: Any) -> None:
    with pytest.raises(WeatherError, match=r"unknown city: 'Atlantis'"):
        await get_current_weather("Atlantis", settings=meteo(open_meteo))
    assert [path for path, _ in open_meteo.requests] == ["/v1/search"]  # no forecast asked


@pytest.mark.asyncio
@pytest.mark.parametrize("slow", ["geocoding", "forecast"])
async def test_timeout(open_meteo: Any, slow: str) -> None:
    paths = {"geocoding": "/v1/search", "forecast": "/v1/forecast"}
    paths[slow] = "/slow" + paths[slow]
    settings = meteo(open_meteo, paths["geocoding"], paths["forecast"], timeout_s=0.3)
    # the server answers after 10 s: an error that says it timed out after 0.3 s is the limit at work
    with pytest.raises(WeatherError, match=rf"{slow} request to .*/slow/v1/\w+ timed out after 0.3 s"):
        await get_current_weather("Guangzhou", settings=settings)


@pytest.mark.asyncio
@pytest.mark.parametrize("failing", ["geocoding", "forecast"])
async def test_http_500_names_status_and_endpoint(open_meteo: Any, failing: str) -> None:
    paths = {"geocoding": "/v1/search", "forecast": "/v1/forecast"}
    paths[failing] = "/error500" + paths[failing]
    with pytest.raises(WeatherError) as caught:
        await get_current_weather(
            "Guangzhou", settings=meteo(open_meteo, paths["geocoding"], paths["forecast"])
        )
    message = str(caught.value)
    assert f"Open-Meteo {failing} endpoint {open_meteo.base_url}/error500/v1/" in message
    assert "HTTP 500 Internal Server Error" in message


@pytest.mark.asyncio
async def test_http_400_carries_open_meteo_reason(open_meteo: Any) -> None:
    with pytest.raises(WeatherError, match=r"HTTP 400 Bad Request: Latitude must be in range"):
        await get_current_weather("Guangzhou", settings=meteo(open_meteo, forecast="/error400/v1/forecast"))


@pytest.mark.asyncio
async def test_malformed_json(open_meteo: Any) -> None:
    with pytest.raises(WeatherError, match=r"malformed JSON from the Open-Meteo geocoding endpoint"):
        await get_current_weather("Guangzhou", settings=meteo(open_meteo, geocoding="/badjson/v1/search"))


@pytest.mark.asyncio
async def test_json_of_the_wrong_shape(open_meteo: Any) -> None:
    with pytest.raises(
        WeatherError, match=r"malformed response from the Open-Meteo forecast endpoint .*current"
    ):
        await get_current_weather("Guangzhou", settings=meteo(open_meteo, forecast="/badshape/v1/forecast"))


@pytest.mark.asyncio
async def test_connection_refused() -> None:
    with socket.socket() as sock:  # find a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/search"
    settings = WeatherSettings(backend="open-meteo", geocoding_url=url, timeout_s=2)
    with pytest.raises(WeatherError, match=r"could not reach the Open-Meteo geocoding endpoint"):
        await get_current_weather("Guangzhou", settings=settings)


# -- sentence building ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("speed", "direction", "expected"),
    [
        (0.4, 90, "无风"),
        (9.7, 350, "北风2级（风速9.7公里/小时）"),
        (15.0, 45, "东北风3级（风速15公里/小时）"),
        (25.26, 180, "南风4级（风速25.3公里/小时）"),
        (40, 315, "西北风6级（风速40公里/小时）"),
        (130, 270, "西风12级（风速130公里/小时）"),
    ],
)
def test_describe_wind(speed: float, direction: float, expected: str) -> None:
    assert describe_wind(speed, direction) == expected


def test_wmo_table_covers_the_documented_codes() -> None:
    documented = {0, 1, 2, 3, 45, 48, 51, 53, 55, 56, 57, 61, 63, 65, 66, 67, 71, 73, 75, 77, 80, 81, 82}
    assert documented | {85, 86, 95, 96, 99} == set(qwenrun_weather.WMO_CODES_ZH)


# -- the qwenrun contract ------------------------------------------------------------------------


def test_settings_defaults_and_validation() -> None:
    settings = WeatherSettings()
    assert settings.backend == "mock"
    assert settings.geocoding_url == "https://geocoding-api.open-meteo.com/v1/search"
    assert settings.forecast_url == "https://api.open-meteo.com/v1/forecast"
    assert settings.timeout_s == 10 and settings.language == "zh"
    with pytest.raises(ValidationError):
        WeatherSettings.model_validate({"backend": "open-meteo", "units": "metric"})  # extra key
    with pytest.raises(ValidationError):
        WeatherSettings(backend="accuweather")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        WeatherSettings(timeout_s=0)


def test_signature_and_docstring_follow_the_tool_contract() -> None:
    signature = inspect.signature(get_current_weather, eval_str=True)
    assert inspect.iscoroutinefunction(get_current_weather)
    settings = signature.parameters["settings"]
    assert settings.kind is inspect.Parameter.KEYWORD_ONLY and settings.annotation is WeatherSettings
    doc = inspect.getdoc(get_current_weather) or ""
    assert doc.split("\n\n")[0].startswith("Get the current weather")
    assert "Args:\n    city:" in doc


def test_entry_point_is_registered() -> None:
    (ep,) = [ep for ep in entry_points(group="qwenrun.tools") if ep.name == "get_current_weather"]
    assert ep.value == "qwenrun_weather:get_current_weather"
    assert ep.load() is get_current_weather

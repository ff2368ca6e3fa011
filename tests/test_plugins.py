"""Entry-point plugins: discovery without import, exact schemas, broken plugins, tool settings."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwenrun.agent import plugins
from qwenrun.cli import main as cli_main
from qwenrun.errors import ConfigError, PluginError
from qwenrun.spec.agent_file import AgentSpec


@pytest.fixture
def broken_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An installed distribution whose tool fails to import (a dist-info on sys.path)."""
    dist = tmp_path / "qwenrun_broken-0.0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: qwenrun-broken\nVersion: 0.0.1\n")
    (dist / "entry_points.txt").write_text(
        "[qwenrun.tools]\nexplode = qwenrun_broken_mod:explode\nuntyped = qwenrun_untyped_mod:untyped\n"
    )
    (tmp_path / "qwenrun_broken_mod.py").write_text("raise ImportError('missing native library libfoo.so')\n")
    (tmp_path / "qwenrun_untyped_mod.py").write_text("def untyped(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("qwenrun_broken_mod", "qwenrun_untyped_mod"):
        sys.modules.pop(name, None)


def test_installed_tools_come_from_metadata_without_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "qwenrun_calculator", raising=False)  # restored afterwards
    tools = plugins.installed_tools()
    assert {"calculate", "get_current_weather", "search_documents"} <= set(tools)
    entry = tools["calculate"]
    assert (entry.target, entry.package, entry.version) == (
        "qwenrun_calculator:calculate",
        "qwenrun-calculator",
        "0.1.0",
    )
    assert "qwenrun_calculator" not in sys.modules


EXPECTED_PARAMETERS = {
    "get_current_weather": {
        "additionalProperties": False,
        "properties": {
            "city": {
                "description": 'Name of the city, e.g. "广州", "北京" or "Paris".',
                "maxLength": 100,
                "minLength": 1,
                "type": "string",
            }
        },
        "required": ["city"],
        "type": "object",
    },
    "calculate": {
        "additionalProperties": False,
        "properties": {
            "expression": {
                "description": 'The expression to evaluate, e.g. "2 * (3 + 4) ** 2" or "sqrt(2) / 2".',
                "maxLength": 500,
                "minLength": 1,
                "type": "string",
            }
        },
        "required": ["expression"],
        "type": "object",
    },
    "search_documents": {
        "additionalProperties": False,
        "properties": {
            "query": {
                "description": "What to look for, as a question or a few keywords.",
                "maxLength": 2000,
                "minLength": 1,
                "type": "string",
            },
            "k": {
                "default": 3,
                "description": "How many passages to return (1 to 20).",
                "maximum": 20,
                "minimum": 1,
                "type": "integer",
            },
        },
        "required": ["query"],
        "type": "object",
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_plugin_schemas_exactly(name: str) -> None:
    tool = plugins.installed_tools()[name].load()
    assert tool.parameters == EXPECTED_PARAMETERS[name]
    assert tool.openai_schema()["function"]["name"] == name
    assert tool.description.splitlines()[0]


async def test_weather_plugin_runs_with_settings_from_yaml() -> None:
    spec = AgentSpec.from_text(
        "model: {path: x}\ntools: [{name: get_current_weather, settings: {backend: mock}}]\n"
    )
    (tool,) = plugins.load_tools(spec)
    assert tool.settings is not None and tool.settings.model_dump()["backend"] == "mock"
    assert await tool.call({"city": "广州"}) == "目前广州多云到晴，气温28~31℃，吹轻微的偏北风。"


async def test_calculator_plugin_through_the_tool_layer() -> None:
    (tool,) = plugins.load_tools(AgentSpec.from_text("model: {path: x}\ntools: [calculate]\n"))
    assert await tool.call({"expression": "2 * (3 + 4) ** 2"}) == "98"


def test_bad_settings_name_the_path() -> None:
    spec = AgentSpec.from_text(
        "model: {path: x}\ntools: [{name: get_current_weather, settings: {backend: mock, timeout: 3}}]\n",
        source="w.yaml",
    )
    with pytest.raises(ConfigError) as info:
        plugins.load_tools(spec)
    assert str(info.value) == "w.yaml: tools[0].settings.timeout: Extra inputs are not permitted"


def test_broken_plugins_are_reported_and_skipped(broken_plugin: Path) -> None:
    reports = {report.entry.name: report for report in plugins.doctor()}
    assert reports["explode"].error == (
        "tool 'explode' (qwenrun_broken_mod:explode, from qwenrun-broken 0.0.1) failed to import: "
        "ImportError: missing native library libfoo.so"
    )
    assert reports["untyped"].error == "tool 'untyped': parameter 'x' has no type annotation"
    assert reports["calculate"].error is None
    spec = AgentSpec.from_text("model: {path: x}\ntools: [explode, calculate]\n", source="a.yaml")
    assert [tool.name for tool in plugins.load_tools(spec, strict=False)] == ["calculate"]
    with pytest.raises(PluginError, match=r"^a.yaml: tools\[0\]: tool 'explode' .* failed to import"):
        plugins.load_tools(spec, strict=True)


def test_tools_doctor_command(broken_plugin: Path) -> None:
    result = CliRunner().invoke(cli_main, ["tools", "--doctor"])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert (
        "BROKEN explode (qwenrun-broken 0.0.1): tool 'explode' (qwenrun_broken_mod:explode, from "
        "qwenrun-broken 0.0.1) failed to import: ImportError: missing native library libfoo.so" in lines
    )
    assert "ok     calculate (qwenrun-calculator 0.1.0)" in lines
    assert lines[-1] == "Error: 2 broken tool(s); they are skipped when agents load"
    listing = CliRunner().invoke(cli_main, ["tools"])
    assert listing.exit_code == 0
    assert "(broken: ImportError; see qwenrun tools --doctor)" in listing.output
    assert "(broken: PluginError; see qwenrun tools --doctor)" in listing.output


def test_unknown_tool_suggests_the_closest_name() -> None:
    spec = AgentSpec.from_text("model: {path: x}\ntools: [calculator]\n", source="a.yaml")
    with pytest.raises(ConfigError) as info:
        plugins.check_tools(spec)
    message = str(info.value)
    assert message.startswith("a.yaml: tools[0].name: unknown tool 'calculator'; did you mean 'calculate'? (installed: ")
    assert "calculate, " in message.split("(installed: ")[1]


def _dist(where: Path, package: str, tools: str) -> None:
    dist = where / f"{package.replace('-', '_')}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[qwenrun.tools]\n{tools}\n")


def test_a_tool_declared_by_two_packages_is_a_clash_the_doctor_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The package first on sys.path wins, whatever order the directories are listed in."""
    first, second = tmp_path / "first", tmp_path / "second"
    _dist(first, "zz-weather-fork", "get_current_weather = qwenrun_weather:get_current_weather")
    _dist(second, "aa-weather-fork", "get_current_weather = qwenrun_weather:get_current_weather")
    monkeypatch.syspath_prepend(str(second))
    monkeypatch.syspath_prepend(str(first))  # now first, then second, then the real qwenrun-weather
    entry = plugins.installed_tools()["get_current_weather"]
    assert entry.package == "zz-weather-fork"
    assert entry.shadowed == ("aa-weather-fork 1.0", "qwenrun-weather 0.1.0")
    assert "tool 'get_current_weather' is declared by zz-weather-fork 1.0 and aa-weather-fork 1.0" in caplog.text
    result = CliRunner().invoke(cli_main, ["tools", "--doctor"])
    assert result.exit_code == 1
    assert (
        "CLASH  get_current_weather (zz-weather-fork 1.0): also declared by aa-weather-fork 1.0, "
        "qwenrun-weather 0.1.0; zz-weather-fork 1.0 wins (the first on sys.path); uninstall the one you "
        "do not want"
    ) in result.output.splitlines()
    assert result.output.splitlines()[-1] == "Error: 1 tool name(s) declared by several packages"

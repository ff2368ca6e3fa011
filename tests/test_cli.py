"""The command line: validate, schema, --set, tools, run and the REPL (scripted engine)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from mcp_fixtures import SERVER, stdio

from qwenrun import __version__
from qwenrun.agent import Agent
from qwenrun.cli import common as cli
from qwenrun.cli import main as cli_main
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.spec.agent_file import AgentSpec

ROOT = Path(__file__).parent.parent
AGENTS = sorted(str(p) for p in (ROOT / "agents").glob("*.yaml"))
WEATHER = str(ROOT / "agents" / "weather.yaml")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> list[ScriptedEngine]:
    """Make the CLI build agents on a scripted engine that calls the weather tool, then answers."""
    engines: list[ScriptedEngine] = []

    def make_agent(spec: AgentSpec) -> Agent:
        def script(request: object) -> str:
            messages = request.messages  # type: ignore[attr-defined]
            if messages[-1]["role"] == "user":
                return tool_call_text("get_current_weather", {"city": "广州"})
            return f"answer {len(messages)}"

        engine = ScriptedEngine(script)
        engines.append(engine)
        return Agent(spec, engine)

    monkeypatch.setattr(cli, "make_agent", make_agent)
    return engines


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(cli_main, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"qwenrun, version {__version__}\n"


def test_validate_every_shipped_agent(runner: CliRunner) -> None:
    result = runner.invoke(cli_main, ["validate", *AGENTS])
    assert result.exit_code == 0, result.output
    assert result.output.count(": ok (") == len(AGENTS)


def test_validate_reports_bad_files_with_exit_code_2(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: x}\nengine: {max_num_seqs: 0}\n")
    result = runner.invoke(cli_main, ["validate", str(bad)])
    assert result.exit_code == 2
    assert result.output == f"Error: {bad}: engine.max_num_seqs: Input should be greater than 0\n"
    assert "Traceback" not in result.output


def test_validate_unknown_tool_lists_installed_ones(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "tool.yaml"
    bad.write_text("model: {path: x}\ntools: [get_weather]\n")
    result = runner.invoke(cli_main, ["validate", str(bad)])
    assert result.exit_code == 2
    assert result.output.startswith(
        f"Error: {bad}: tools[0].name: unknown tool 'get_weather'; did you mean 'get_current_weather'? "
        "(installed: "
    )
    assert "calculate" in result.output and "search_documents" in result.output


def test_validate_bad_tool_settings(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "settings.yaml"
    bad.write_text("model: {path: x}\ntools: [{name: get_current_weather, settings: {backend: bing}}]\n")
    result = runner.invoke(cli_main, ["validate", str(bad)])
    assert result.exit_code == 2
    assert result.output == (
        f"Error: {bad}: tools[0].settings.backend: Input should be 'mock' or 'open-meteo'\n"
    )


def test_validate_with_set_override(runner: CliRunner) -> None:
    result = runner.invoke(cli_main, ["validate", WEATHER, "--set", "engine.max_num_seqs=0"])
    assert result.exit_code == 2
    assert "engine.max_num_seqs: Input should be greater than 0" in result.output


HEAVY = ("vllm", "torch", "transformers", "tokenizers", "huggingface_hub", "numpy",
         "fastapi", "chainlit", "mcp", "openai")  # fmt: skip


def test_validate_imports_no_vllm_torch_or_other_heavy_package() -> None:
    """``qwenrun validate`` of every shipped agent file, in a fresh interpreter, loads none of the
    packages that take seconds to import (its speed is measured by benchmarks/cli_startup.py)."""
    code = (
        "import sys\nfrom qwenrun.cli import main\n"
        "try:\n    main(['validate', *sys.argv[1:]])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules) or '(none)')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *AGENTS], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.splitlines()[-1] == "(none)", done.stdout
    assert done.stdout.count(": ok (") == len(AGENTS) > 0


def test_schema_is_json_schema_of_the_spec(runner: CliRunner) -> None:
    result = runner.invoke(cli_main, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == ["model"]
    top_level = {"version", "model", "engine", "sampling", "agent", "tools", "frontend", "sessions", "permissions"}
    top_level |= {"agents", "team"}  # docs/teams.md
    assert set(schema["properties"]) == top_level
    assert schema["additionalProperties"] is False
    assert {item["$ref"] for item in schema["properties"]["engine"]["oneOf"]} == {
        "#/$defs/VLLMEngineSpec",
        "#/$defs/OpenAIEngineSpec",
    }
    engine = schema["$defs"]["VLLMEngineSpec"]["properties"]
    assert engine["max_num_seqs"] == {
        "default": 256,
        "exclusiveMinimum": 0,
        "title": "Max Num Seqs",
        "type": "integer",
    }
    shipped = json.loads((ROOT / "docs" / "agent.schema.json").read_text())
    assert shipped == schema, "docs/agent.schema.json is stale: qwenrun schema > docs/agent.schema.json"


def test_tools_lists_the_installed_plugins(runner: CliRunner) -> None:
    result = runner.invoke(cli_main, ["tools"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert {"calculate", "get_current_weather", "search_documents"} <= set(lines)
    assert "qwenrun-weather 0.1.0" in lines["get_current_weather"]


def test_tools_show_prints_the_schema(runner: CliRunner) -> None:
    result = runner.invoke(cli_main, ["tools", "show", "get_current_weather"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    assert schema["function"]["name"] == "get_current_weather"
    assert schema["function"]["parameters"]["required"] == ["city"]
    missing = runner.invoke(cli_main, ["tools", "show", "nope"])
    assert missing.exit_code == 1 and "unknown tool 'nope'" in missing.output


def test_run_once_streams_the_weather_flow(runner: CliRunner, scripted: list[ScriptedEngine]) -> None:
    result = runner.invoke(cli_main, ["run", WEATHER, "-p", "广州天气情况如何?"])
    assert result.exit_code == 0, result.output
    assert '→ get_current_weather(city="广州")' in result.output
    assert "← 目前广州多云到晴，气温28~31℃，吹轻微的偏北风。" in result.output
    assert result.output.rstrip().endswith("answer 4")


def test_run_json_prints_events(runner: CliRunner, scripted: list[ScriptedEngine]) -> None:
    result = runner.invoke(cli_main, ["run", WEATHER, "-p", "广州天气情况如何?", "--json"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    types = [e["type"] for e in events]
    assert types[:3] == ["usage", "tool_call", "tool_result"]
    assert types[-1] == "final"
    assert events[1]["arguments"] == {"city": "广州"}
    assert events[-1]["text"] == "answer 4"


def test_repl_keeps_history_resets_and_exits(runner: CliRunner, scripted: list[ScriptedEngine]) -> None:
    stdin = "广州天气情况如何?\n\n/reset\n还有呢?\n/exit\n"
    result = runner.invoke(cli_main, ["up", WEATHER], input=stdin)
    assert result.exit_code == 0, result.output
    assert result.output.count("→ get_current_weather") == 2
    assert "(conversation cleared)" in result.output
    engine = scripted[0]
    # after /reset the second question starts a fresh history: system + user
    assert [m["role"] for m in engine.calls[2].messages] == ["system", "user"]


def test_up_with_a_bad_file_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: x}\nfrontend: {kind: openai, port: 99999}\n")
    result = runner.invoke(cli_main, ["up", str(bad)])
    assert result.exit_code == 2
    assert result.output == f"Error: {bad}: frontend.port: Input should be less than or equal to 65535\n"


# -- MCP servers in an agent file ----------------------------------------------------------------


def mcp_file(tmp_path: Path, *entries: object) -> str:
    path = tmp_path / "mcp-agent.yaml"
    path.write_text(json.dumps({"model": {"path": "scripted"}, "tools": list(entries)}), encoding="utf-8")
    return str(path)


def test_validate_starts_no_mcp_server(runner: CliRunner, tmp_path: Path) -> None:
    started = tmp_path / "started"
    path = mcp_file(tmp_path, "get_current_weather", {"mcp": {"name": "probe", "command": "sh", "args": ["-c", f"touch {started}"]}})
    result = runner.invoke(cli_main, ["validate", path])
    assert result.exit_code == 0, result.output
    assert result.output == f"{path}: ok (qwenrun-agent, 1 tools, 1 MCP servers, frontend cli)\n"
    assert not started.exists()
    listed = runner.invoke(cli_main, ["tools", "--agent", path])  # this one starts it: it is no MCP server
    assert started.exists()
    assert listed.exit_code == 0 and "(MCP server 'probe' did not start: the server closed the connection)" in listed.output


def test_tools_of_an_agent_file_include_its_mcp_tools(runner: CliRunner, tmp_path: Path) -> None:
    path = mcp_file(tmp_path, "get_current_weather", stdio(allow=["add", "echo"], approval={"echo": "ask"}))
    result = runner.invoke(cli_main, ["tools", "--agent", path])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if not line.startswith("Starting")}
    assert list(lines) == ["get_current_weather", "add", "echo"]
    assert "MCP server 'test' (tools[1])" in lines["add"] and "Add two integers." in lines["add"]
    assert lines["echo"].endswith("[approval: ask]")
    shown = runner.invoke(cli_main, ["tools", "show", "add", "--agent", path])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["function"]["parameters"]["required"] == ["a", "b"]


def test_tools_doctor_starts_each_server_and_says_what_is_wrong(runner: CliRunner, tmp_path: Path) -> None:
    path = mcp_file(
        tmp_path,
        stdio("--malformed", allow=["echo", "broken_schema"]),
        {"mcp": {"name": "missing", "command": str(tmp_path / "nothing-here")}},
        stdio("--exit-at-start", name="quits"),
    )
    result = runner.invoke(cli_main, ["tools", "--doctor", "--agent", path])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert f"ok     MCP server 'test' (stdio: {sys.executable} {SERVER} --malformed): 1 tools: echo" in lines
    assert any(line.startswith("WARN   MCP server 'test'") and "tool 'broken_schema': its input schema is not a valid"
               in line for line in lines)  # fmt: skip
    assert any(line.startswith("BROKEN MCP server 'missing'") and "FileNotFoundError" in line for line in lines)
    assert "  config error: the test server was told to exit at start" in lines
    assert lines[-1] == "Error: 2 MCP server(s) with problems; see above"


def test_run_mixes_entry_point_and_mcp_tools(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = mcp_file(tmp_path, "get_current_weather", stdio(allow=["echo"]))

    def script(request: ModelRequest) -> str:
        if request.messages[-1]["role"] == "user":
            return tool_call_text("get_current_weather", {"city": "广州"}) + tool_call_text("echo", {"text": "回声"})
        return "done"

    monkeypatch.setattr(cli, "make_agent", lambda spec: Agent(spec, ScriptedEngine(script)))
    result = runner.invoke(cli_main, ["run", path, "-p", "go"])
    assert result.exit_code == 0, result.output
    assert "← 目前广州多云到晴，气温28~31℃，吹轻微的偏北风。" in result.output
    assert "← 回声" in result.output and result.output.rstrip().endswith("done")


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_run_is_quiet_without_v(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`qwenrun run` on the tiny vLLM model: without -v, stderr holds qwenrun's two status lines and
    nothing of vLLM (its warnings, progress bars, shutdown lines, nanobind's leak report at exit);
    the answer is on stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL")}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    command = [str(Path(sys.executable).with_name("qwenrun")), "run", str(ROOT / "agents" / "weather-tiny.yaml"),
               "--set", f"model.path={tiny_model_dir}", "-p", "广州天气情况如何?"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=500, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert lines[0] == f"Loading {tiny_model_dir} (vLLM) ..." and lines[1].startswith("Ready in "), done.stderr
    assert len(lines) == 2, done.stderr[-3000:]
    assert "→ get_current_weather(city=" in done.stdout


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_eval_is_quiet_without_v(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`qwenrun eval` of one case on the tiny vLLM model: without -v, stderr holds its progress
    line and nothing of vLLM (nanobind's leak report at exit was 30 to 500 lines)."""
    tool = {"type": "function", "function": {"name": "get_current_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
    case = {"id": "w1", "category": "weather", "messages": [{"role": "user", "content": "广州天气情况如何?"}],
            "tools": [tool], "expected": [{"get_current_weather": {"city": ["广州"]}}]}  # fmt: skip
    (tmp_path / "cases.jsonl").write_text(json.dumps(case, ensure_ascii=False) + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL")}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    command = [str(Path(sys.executable).with_name("qwenrun")), "eval", str(ROOT / "agents" / "weather-tiny.yaml"),
               "cases.jsonl", "--set", f"model.path={tiny_model_dir}", "--set", "sampling.max_tokens=40"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=500, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nanobind" not in done.stderr, done.stderr[-3000:]
    [line] = done.stderr.splitlines()
    assert re.fullmatch(r"\[1/1\] w1: qwenrun (pass|FAIL) vllm-hermes (pass|FAIL) \(.* s\).*", line), line
    assert "qwenrun eval: 1 cases via agent, model tiny-qwen2" in done.stdout


QUIET_EXIT = """
import atexit, os, sys, types
sys.modules["triton"] = types.ModuleType("triton")  # as vLLM leaves it
atexit.register(os.write, 2, b"nanobind: leaked 4 instances!\\n")  # runs after the CLI's handlers
from qwenrun.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize(("flags", "leaked"), [([], False), (["-v"], True)])
@pytest.mark.parametrize("command", [["schema"], ["validate", WEATHER]])
def test_every_command_hides_what_triton_writes_at_exit(flags: list[str], leaked: bool, command: list[str]) -> None:
    """Once Triton is imported, what is written to stderr after a command is done (nanobind's leak
    report) shows only with -v, whatever the command."""
    done = subprocess.run([sys.executable, "-c", QUIET_EXIT, *flags, *command], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert ("nanobind: leaked" in done.stderr) is leaked, done.stderr


@pytest.mark.parametrize(("flags", "level"), [([], "ERROR"), (["-v"], None)])
def test_vllm_logs_only_with_v(monkeypatch: pytest.MonkeyPatch, flags: list[str], level: str | None) -> None:
    """Without -v vLLM (and its child processes) log errors only; -v leaves vLLM's own default."""
    for name in ("VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL", "PYTHONWARNINGS"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(cli_main, [*flags, "validate", WEATHER])
    assert result.exit_code == 0, result.output
    assert os.environ.get("VLLM_LOGGING_LEVEL") == level
    assert os.environ.get("TORCH_CPP_LOG_LEVEL") == level
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # the user's own setting wins
    CliRunner().invoke(cli_main, [*flags, "validate", WEATHER])
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"

"""`qwenrun eval` end to end on a scripted engine: the agent loop and the OpenAI server (real
uvicorn on 127.0.0.1, the official openai client), each output read by qwenrun and by vLLM's own
Hermes parser, scored, summed per category (qwenrun/evals/{cli,evaluate,runner,readers,report}.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from weather import weather_tool

from qwenrun import cli
from qwenrun.cli import eval as eval_cli
from qwenrun.engines.scripted import ModelRequest, ScriptedEngine, tool_call_text
from qwenrun.errors import EngineError
from qwenrun.evals.readers import meant_a_call

CALL = '{"name": "get_current_weather", "arguments": {"city": "Paris"}}'
REPLIES = {
    "tags": tool_call_text("get_current_weather", {"city": "Paris"}),
    "fenced": f"```json\n{CALL}\n```",
    "wrong": tool_call_text("get_current_weather", {"city": "Rome"}),
    "broken": "<tool_call>\n" + CALL[:-1] + "\n</tool_call>",
    "chat": "I can only tell the weather.",
}


def script(request: ModelRequest) -> str:
    if request.constraint is not None:  # the agent's grammar-forced repair of a malformed call
        return "<tool_call>\n" + CALL
    asked = str(request.messages[-1]["content"])
    if asked == "error":
        raise EngineError("the scripted engine refuses this one")
    return REPLIES[asked]


def case(case_id: str, prompt: str, category: str = "weather", expected: Any = None) -> dict[str, Any]:
    return {
        "id": case_id,
        "category": category,
        "messages": [{"role": "user", "content": prompt}],
        "tools": [weather_tool()],
        "expected": [{"get_current_weather": {"city": ["Paris"]}}] if expected is None else expected,
    }


CASES = [
    case("tags", "tags"),
    case("fenced", "fenced"),
    case("wrong", "wrong"),
    case("broken", "broken"),
    case("chat", "chat", "irrelevance", []),
    case("error", "error", "irrelevance", []),
]


@pytest.fixture
def files(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """An agent file (the tiny model's folder gives vLLM's parser its tokenizer), a cases file,
    and ``qwenrun eval`` wired to a scripted engine."""
    agent = tmp_path / "agent.yaml"
    agent.write_text(
        f"model: {{path: {tiny_model_dir}, served_model_name: scripted}}\n"
        "sampling: {temperature: 0}\n"
        "agent: {name: bfcl-test}\n"
        "tools: []\n"
    )
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps(c) + "\n" for c in CASES))
    monkeypatch.setattr(eval_cli, "make_engine", lambda spec: ScriptedEngine(script))
    return str(agent), str(cases)


def run(*args: str) -> Any:
    result = CliRunner().invoke(cli.main, ["eval", *args])
    return result


def report(files: tuple[str, str], *args: str) -> dict[str, Any]:
    result = run(*files, "--json", *args)
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def outcomes(data: dict[str, Any], reader: str) -> dict[str, tuple[bool, bool]]:
    """case id -> (passed, format failure) for one reader."""
    return {
        c["id"]: (c["readers"][reader]["passed"], c["readers"][reader]["format_failure"])
        for c in data["cases"]
    }


# What vLLM's Hermes parser makes of the same texts, on either path: tags only, strict JSON.
VLLM = {
    "tags": (True, False), "fenced": (False, True), "wrong": (False, False), "broken": (False, True),
    "chat": (True, False), "error": (False, False),
}  # fmt: skip


def test_via_agent(files: tuple[str, str]) -> None:
    data = report(files, "--via", "agent")
    assert data["via"] == "agent"
    assert data["readers"] == ["qwenrun", "vllm-hermes"]
    assert outcomes(data, "vllm-hermes") == VLLM
    # qwenrun reads the fenced call, and the agent repairs the malformed one with a forced call
    assert outcomes(data, "qwenrun") == {**VLLM, "fenced": (True, False), "broken": (True, False)}
    by_id = {c["id"]: c for c in data["cases"]}
    assert (by_id["broken"]["model_calls"], by_id["broken"]["repaired"]) == (2, True)
    assert by_id["broken"]["text"] == REPLIES["broken"]  # the first model call's raw text
    assert by_id["fenced"]["text"] == REPLIES["fenced"]
    assert by_id["tags"]["readers"]["qwenrun"]["calls"] == [["get_current_weather", {"city": "Paris"}]]
    assert "refuses this one" in by_id["error"]["error"]
    weather, irrelevance = data["categories"]
    assert (weather["category"], weather["cases"], weather["passed"]) == (
        "weather",
        4,
        {"qwenrun": 3, "vllm-hermes": 1},
    )
    assert weather["format_failures"] == {"qwenrun": 0, "vllm-hermes": 2}
    assert (irrelevance["cases"], irrelevance["errors"], irrelevance["passed"]["qwenrun"]) == (2, 1, 1)
    assert data["total"]["passed"] == {"qwenrun": 4, "vllm-hermes": 2}
    assert data["meta"]["tool_choice"] == "auto"


def test_via_server(files: tuple[str, str]) -> None:
    data = report(files, "--via", "server")
    assert data["via"] == "server"
    assert outcomes(data, "vllm-hermes") == VLLM
    # pass-through reads the fenced call too, but does not repair: the broken call stays text
    assert outcomes(data, "qwenrun") == {**VLLM, "fenced": (True, False)}
    by_id = {c["id"]: c for c in data["cases"]}
    assert by_id["tags"]["text"] == REPLIES["tags"]
    assert "503" in by_id["error"]["error"]


def test_table_category_limit_and_progress(files: tuple[str, str]) -> None:
    result = run(*files, "--category", "weather", "--limit", "2", "--concurrency", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "qwenrun eval: 2 cases via agent, model scripted"
    header, row = lines[1].split(), lines[2].split()
    assert header[:4] == ["category", "cases", "qwenrun", "format"]
    assert row[:8] == ["weather", "2", "2/2", "(100.0%)", "0", "1/2", "(50.0%)", "1"]
    assert "[2/2] " in result.stderr and "tags: qwenrun pass vllm-hermes pass" in result.stderr
    quiet = run(*files, "--limit", "1", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_strict_reading_is_one_switch(files: tuple[str, str]) -> None:
    """With agent.lenient_tool_calls off, qwenrun reads tags only, like vLLM (but still repairs)."""
    data = report(files, "--set", "agent.lenient_tool_calls=false", "--category", "weather")
    strict = {
        "tags": (True, False),
        "fenced": (False, True),
        "wrong": (False, False),
        "broken": (True, False),
    }
    assert outcomes(data, "qwenrun") == strict


@pytest.mark.parametrize("via", ["agent", "server"])
def test_the_agents_tool_choice_rules_apply_to_each_case(
    via: str, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A case whose question matches a rule of agent.tool_choice_rules gets that tool_choice (a
    forced call: the scripted model would have chatted), the others the file's; both paths."""
    agent = tmp_path / "agent.yaml"
    agent.write_text(
        f"model: {{path: {tiny_model_dir}, served_model_name: scripted}}\n"
        "agent: {tool_choice_rules: [{when: weather, tool_choice: get_current_weather}]}\n"
        "tools: [get_current_weather]\n"
    )
    cases = tmp_path / "cases.jsonl"
    rows = [case("asked", "Paris weather?"), case("chat", "chat", "irrelevance", [])]
    cases.write_text("".join(json.dumps(row) + "\n" for row in rows))
    engine = ScriptedEngine(lambda request: "<tool_call>\n" + CALL if request.constraint else REPLIES["chat"])
    monkeypatch.setattr(eval_cli, "make_engine", lambda spec: engine)
    data = report((str(agent), str(cases)), "--via", via)
    assert outcomes(data, "qwenrun") == {"asked": (True, False), "chat": (True, False)}
    assert sorted(call.tool_choice for call in engine.calls) == ["auto", "get_current_weather"]
    assert data["meta"]["tool_choice_rules"] == [{"when": "weather", "tool_choice": "get_current_weather"}]


def test_bad_inputs_exit_2(files: tuple[str, str], tmp_path: Path) -> None:
    agent, cases = files
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CASES[0]) + "\n{oops\n")
    result = run(agent, str(bad))
    assert result.exit_code == 2
    assert f"{bad}:2: not a JSON object" in result.output
    result = run(agent, cases, "--category", "nope")
    assert result.exit_code == 2 and "no case has category nope" in result.output
    result = run(agent, cases, "--set", "engine.max_num_seqs=0")
    assert result.exit_code == 2 and "engine.max_num_seqs" in result.output


def test_meant_a_call() -> None:
    names = ["get_current_weather"]
    assert meant_a_call("<tool_call>garbage", names)
    assert meant_a_call(REPLIES["fenced"], names)
    assert meant_a_call("Sure: {'name': 'get_current_weather', 'parameters': {", names)
    assert not meant_a_call('{"name": "other_tool", "arguments": {}}', names)
    assert not meant_a_call(REPLIES["chat"], names)

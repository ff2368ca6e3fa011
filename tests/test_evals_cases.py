"""The JSONL case format of qwenrun eval (qwenrun/evals/cases.py): loading, errors, selection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qwenrun.errors import EvalError
from qwenrun.evals.cases import Case, dump_cases, load_cases, select

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def line(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": "w1",
        "category": "weather",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [TOOL],
        "expected": [{"get_weather": {"city": ["Paris"]}}],
    }
    data.update(changes)
    return data


def write(tmp_path: Path, *lines: Any) -> Path:
    path = tmp_path / "cases.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(EvalError) as info:
        load_cases(path)
    return str(info.value)


def test_a_valid_file_loads_and_round_trips(tmp_path: Path) -> None:
    path = write(tmp_path, line(), "", line(id="w2", expected=[]))
    cases = load_cases(path)
    assert [c.id for c in cases] == ["w1", "w2"]
    assert cases[1].expected == []  # no call expected
    assert cases[0].tool_names == ["get_weather"]
    assert cases[0].openai_tools() == [TOOL]
    again = write(tmp_path, *dump_cases(cases).splitlines())
    assert load_cases(again) == cases


def test_category_defaults(tmp_path: Path) -> None:
    data = line()
    del data["category"]
    assert load_cases(write(tmp_path, data))[0].category == "default"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"id": "w1", ', "cases.jsonl:2: not a JSON object: "),
        ("[1, 2]", "cases.jsonl:2: expected a JSON object, got list"),
        (line(id="x", expected=None), "cases.jsonl:2 (case 'x'): expected: Input should be a valid list"),
        ({k: v for k, v in line(id="x").items() if k != "messages"}, "cases.jsonl:2 (case 'x'): messages: Field required"),
        (line(id="x", expected=[{"get_forecast": {"city": ["Paris"]}}]), "expected[0] calls 'get_forecast', which is not in tools"),
        (line(id="x", expected=[{"get_weather": {"town": ["Paris"]}}]), "expected[0].get_weather.town: not a parameter of 'get_weather'"),
        (line(id="x", expected=[{"get_weather": {"city": []}}]), "expected[0].get_weather.city: no acceptable value"),
        (line(id="x", expected=[{"get_weather": {}, "other": {}}]), "expected[0] must name exactly one function, got 2"),
        (line(id="x", messages=[{"role": "assistant", "content": "hi"}]), "the last message must be the user's"),
        (line(id="x", messages=[{"role": "robot", "content": "hi"}]), "messages.0.role: Input should be"),
        (line(id="x", tools=[TOOL, TOOL]), "tools: get_weather declared twice"),
        (line(id="x", extra=1), "extra: Extra inputs are not permitted"),
        (line(id="x", tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], expected=[]),
         "parameters of 'f' must be an object schema, not 'array'"),
        (line(id="x", tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}, "required": ["a"]}}}], expected=[]),
         "parameters.required of 'f' names undeclared a"),
        (line(), "cases.jsonl:2: id 'w1' is already used on line 1"),
    ],
)  # fmt: skip
def test_a_bad_line_names_file_line_and_problem(tmp_path: Path, bad: Any, message: str) -> None:
    problem = error_of(write(tmp_path, line(), bad))
    assert str(tmp_path / "cases.jsonl") in problem
    assert message in problem


def test_empty_and_missing_files(tmp_path: Path) -> None:
    assert "no cases" in error_of(write(tmp_path, "", "  "))
    assert "cannot read the cases file" in error_of(tmp_path / "absent.jsonl")


def test_select_by_category_and_limit() -> None:
    cases = [
        Case.model_validate(line(id=f"{category}{n}", category=category))
        for category in ("a", "b")
        for n in range(3)
    ]
    assert [c.id for c in select(cases, limit=2)] == ["a0", "a1", "b0", "b1"]
    assert [c.id for c in select(cases, ["b"])] == ["b0", "b1", "b2"]
    with pytest.raises(EvalError, match="no case has category c \\(categories: a, b\\)"):
        select(cases, ["c"])

"""The BFCL v4 importer (qwenrun/evals/bfcl.py) on the committed sample (tests/data/bfcl, see its
NOTICE.md) and on small hand-written function docs; `qwenrun import-bfcl` through CliRunner."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qwenrun import cli
from qwenrun.errors import EvalError
from qwenrun.evals.bfcl import PYTHON_HINT, convert_function, import_bfcl
from qwenrun.evals.cases import load_cases
from qwenrun.evals.checker import check

DATA = Path(__file__).parent / "data" / "bfcl"
SIMPLE = DATA / "BFCL_v4_simple_python.json"


def test_question_file_with_answers_beside_it() -> None:
    cases = import_bfcl(SIMPLE, [])
    assert [c.id for c in cases] == [f"simple_python_{n}" for n in range(5)]
    assert {c.category for c in cases} == {"simple_python"}
    factorial = cases[1]
    assert factorial.messages[0].content == "Calculate the factorial of 5 using math functions."
    function = factorial.tools[0].function
    assert function.name == "math_factorial"  # "." is not allowed in OpenAI tool names
    assert function.description == "Calculate the factorial of a given number." + PYTHON_HINT
    assert function.parameters == {
        "type": "object",
        "properties": {
            "number": {
                "type": "integer",
                "description": "The number for which factorial needs to be calculated.",
            }
        },
        "required": ["number"],
    }
    assert factorial.expected == [{"math_factorial": {"number": [5]}}]


def test_every_ground_truth_passes_its_own_check() -> None:
    cases = import_bfcl(DATA, ["simple_python", "multiple"])
    assert len(cases) == 8
    for case in cases:
        ((name, possible),) = case.expected[0].items()
        arguments = {key: values[0] for key, values in possible.items() if values[0] != ""}
        assert check(case, [(name, arguments)]).passed, case.id
    multiple = [c for c in cases if c.category == "multiple"]
    assert [len(c.tools) for c in multiple] == [2, 3, 3]


def test_types_become_json_schema_as_bfcl_does_for_openai_models() -> None:
    doc = {
        "name": "geo.route",
        "description": "Plan a route.",
        "parameters": {
            "type": "dict",
            "properties": {
                "speed": {"type": "float", "description": "km/h."},
                "origin": {"type": "tuple", "items": {"type": "float"}, "description": "lat, lon"},
                "options": {"type": "dict", "properties": {"avoid": {"type": "any", "description": "x"}}},
                "stops": {
                    "type": "array",
                    "items": {"type": "dict", "properties": {"n": {"type": "integer"}}},
                },
                "grid": {"type": "array", "items": {"type": "array", "items": {"type": "float"}}},
                "note": {"description": "no type"},
                "odd": {"type": "Bigint"},
            },
            "required": ["speed"],
        },
    }
    converted = convert_function(doc)
    assert converted["type"] == "function"
    function = converted["function"]
    assert function["name"] == "geo_route"
    assert function["description"] == "Plan a route." + PYTHON_HINT
    properties = function["parameters"]["properties"]
    assert function["parameters"]["type"] == "object"
    assert properties["speed"] == {
        "type": "number",
        "format": "float",
        "description": "km/h. This is a float type value.",
    }
    assert properties["origin"] == {"type": "array", "items": {"type": "number"}, "description": "lat, lon"}
    assert properties["options"]["type"] == "object"
    assert properties["options"]["properties"]["avoid"]["type"] == "string"  # BFCL: "any" -> "string"
    assert properties["stops"]["items"] == {"type": "object", "properties": {"n": {"type": "integer"}}}
    assert properties["grid"]["items"] == {"type": "array", "items": {"type": "number"}}
    assert properties["note"]["type"] == "string"
    assert properties["odd"]["type"] == "integer"
    assert doc["parameters"]["type"] == "dict"  # the input is not changed


def make_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        for file in DATA.rglob("*.json"):
            wheel.write(file, f"bfcl_eval/data/{file.relative_to(DATA).as_posix()}")
    return path


def test_from_a_wheel(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "bfcl_eval-0-py3-none-any.whl")
    cases = import_bfcl(wheel, ["multiple", "simple_python"])
    assert [c.category for c in cases] == ["multiple"] * 3 + ["simple_python"] * 5
    assert cases == import_bfcl(DATA, ["multiple", "simple_python"])


def bfcl_file(folder: Path, name: str, entries: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return path


ENTRY = {
    "question": [[{"role": "user", "content": "Hi"}]],
    "function": [json.loads(SIMPLE.read_text().splitlines()[1])["function"][0]],
}


def test_irrelevance_expects_no_call(tmp_path: Path) -> None:
    path = bfcl_file(tmp_path, "BFCL_v4_irrelevance.json", [{"id": "irrelevance_0", **ENTRY}])
    (case,) = import_bfcl(path, [])
    assert (case.category, case.expected) == ("irrelevance", [])


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"id": "simple_python_8", **ENTRY}, "simple_python_8 has no ground truth"),
        ({"id": "multi_turn_base_0", **ENTRY}, "'multi_turn_base' cannot be imported: multi-turn"),
        ({"id": "simple_java_0", **ENTRY}, "'simple_java' cannot be imported: Java"),
        ({"id": "live_relevance_0", **ENTRY}, "'live_relevance' cannot be imported: relevance"),
        (
            {"id": "simple_python_9", **ENTRY, "question": [[], []]},
            "2 turns; only single-turn questions import",
        ),
        ({"id": "simple_python_9", **ENTRY, "function": {}}, '"function" must be a list'),
    ],
)
def test_what_cannot_be_imported_is_named(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    path = bfcl_file(tmp_path, "BFCL_v4_x.json", [entry])
    truth = [{"math.factorial": {"number": [5]}}]
    bfcl_file(
        tmp_path / "possible_answer", "BFCL_v4_x.json", [{"id": "simple_python_9", "ground_truth": truth}]
    )
    with pytest.raises(EvalError, match=r"BFCL_v4_x\.json") as info:
        import_bfcl(path, [])
    assert message in str(info.value)


def test_missing_category_and_bad_source(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match=r"has no bfcl_eval/data/BFCL_v4_parallel_python\.json"):
        import_bfcl(DATA, ["parallel_python"])
    with pytest.raises(EvalError, match="name the categories to import"):
        import_bfcl(DATA, [])
    bad = tmp_path / "x.whl"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(EvalError, match="not a bfcl-eval wheel or data folder"):
        import_bfcl(bad, ["simple_python"])
    with pytest.raises(EvalError, match="no such file"):
        import_bfcl(tmp_path / "absent", ["simple_python"])


def test_cli_writes_cases_that_load(tmp_path: Path) -> None:
    out = tmp_path / "cases.jsonl"
    wheel = make_wheel(tmp_path / "bfcl_eval-0-py3-none-any.whl")
    result = CliRunner().invoke(
        cli.main,
        ["import-bfcl", str(wheel), "--category", "simple_python", "--category", "multiple", "-o", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert f"wrote 8 cases (5 simple_python, 3 multiple) to {out}" in result.output
    assert [c.id for c in load_cases(out)][:2] == ["simple_python_0", "simple_python_1"]
    printed = CliRunner().invoke(cli.main, ["import-bfcl", str(SIMPLE)])
    assert printed.exit_code == 0
    assert printed.output.splitlines() == out.read_text().splitlines()[:5]  # the question file's 5 cases


def test_cli_error_is_exit_2() -> None:
    result = CliRunner().invoke(cli.main, ["import-bfcl", str(DATA), "--category", "nope"])
    assert result.exit_code == 2
    assert "has no bfcl_eval/data/BFCL_v4_nope.json" in result.output

"""Import BFCL v4 data (the ``bfcl-eval`` package's ``bfcl_eval/data/``) as ``qwenrun eval`` cases.

BFCL keeps each category in two JSON-lines files: ``BFCL_v4_<category>.json`` (id, question =
a list of turns of messages, function = BFCL's function docs) and
``possible_answer/BFCL_v4_<category>.json`` (id, ground_truth). The functions become OpenAI tools
as BFCL itself prepares them for OpenAI-style function-calling models (``convert_to_tool`` with
``GORILLA_TO_OPENAPI``): the Python hint is added to each description, "." in names becomes "_",
"dict" becomes "object", "float" "number" (with ``format: float`` and a note in the description),
"tuple" "array", "any" and unknown types "string". The ground truth keeps its shape, with the same
renaming. Categories without an answers file whose name says "irrelevance" expect no call.

Read from a downloaded wheel (``pip download --no-deps bfcl-eval``), never installed: the wheel
is a zip and only its JSON is read.
"""

from __future__ import annotations

import copy
import json
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from qwenrun.errors import EvalError
from qwenrun.evals.cases import Case, problem_text

__all__ = ["PYTHON_HINT", "convert_function", "import_bfcl"]

PYTHON_HINT = " Note that the provided function is in Python 3 syntax."
DATA = "bfcl_eval/data"
# bfcl_eval/constants/type_mappings.py
GORILLA_TO_OPENAPI = {
    "integer": "integer", "number": "number", "float": "number", "string": "string",
    "boolean": "boolean", "bool": "boolean", "array": "array", "list": "array", "dict": "object",
    "object": "object", "tuple": "array", "any": "string", "byte": "integer", "short": "integer",
    "long": "integer", "double": "number", "char": "string", "ArrayList": "array", "Array": "array",
    "HashMap": "object", "Hashtable": "object", "Queue": "array", "Stack": "array", "Any": "string",
    "String": "string", "Bigint": "integer",
}  # fmt: skip
_UNSUPPORTED = {
    "multi_turn": "multi-turn categories need BFCL's stateful executor",
    "memory": "memory categories need BFCL's stateful executor",
    "web_search": "web search categories need BFCL's stateful executor",
    "format_sensitivity": "format sensitivity categories use BFCL's prompting formats",
    "java": "Java categories need BFCL's Java value converters",
    "javascript": "JavaScript categories need BFCL's JavaScript value converters",
    "relevance": "relevance categories expect any call, which the case format cannot say",
}


def _openai_name(name: str) -> str:
    return re.sub(r"\.", "_", name)


def _cast_types(properties: dict[str, Any]) -> dict[str, Any]:
    """BFCL's ``_cast_to_openai_type`` with ``GORILLA_TO_OPENAPI``."""
    for value in properties.values():
        kind = value.get("type")
        if kind is None:
            value["type"] = "string"
        else:
            if kind == "float":
                value["format"] = "float"
                value["description"] = value.get("description", "") + " This is a float type value."
            value["type"] = GORILLA_TO_OPENAPI.get(kind, "string")
        if value["type"] in ("array", "object"):
            if "properties" in value:
                value["properties"] = _cast_types(value["properties"])
            elif "items" in value:
                items = value["items"]
                items["type"] = GORILLA_TO_OPENAPI.get(items.get("type", ""), "string")
                if items["type"] == "array" and "items" in items:
                    items["items"]["type"] = GORILLA_TO_OPENAPI.get(items["items"].get("type", ""), "string")
                elif items["type"] == "object" and "properties" in items:
                    items["properties"] = _cast_types(items["properties"])
    return properties


def convert_function(function: dict[str, Any], *, hint: str = PYTHON_HINT) -> dict[str, Any]:
    """One BFCL function doc as an OpenAI tool (``{"type": "function", "function": ...}``)."""
    item = copy.deepcopy(function)
    item["description"] = item.get("description", "") + hint
    item["name"] = _openai_name(item["name"])
    parameters = item.setdefault("parameters", {})
    parameters["type"] = "object"
    parameters["properties"] = _cast_types(parameters.get("properties", {}))
    return {"type": "function", "function": item}


def _category_of(case_id: str) -> str:
    """``simple_python_12`` -> ``simple_python``; ``live_multiple_3-1-0`` -> ``live_multiple``."""
    return re.sub(r"_\d+(-\d+)*$", "", case_id)


def _lines(text: str, where: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise EvalError(f"{where}:{number}: not a JSON object: {exc}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise EvalError(f'{where}:{number}: expected a JSON object with an "id"')
        yield number, entry


def _convert(entry: dict[str, Any], answer: list[Any] | None, where: str) -> Case:
    case_id = entry["id"]
    category = _category_of(case_id)
    question = entry.get("question")
    if not isinstance(question, list) or not question:
        raise EvalError(f'{where}: {case_id}: "question" must be a non-empty list of turns')
    if len(question) != 1:
        raise EvalError(f"{where}: {case_id}: {len(question)} turns; only single-turn questions import")
    functions = entry.get("function")
    if not isinstance(functions, list):
        raise EvalError(f'{where}: {case_id}: "function" must be a list of function docs')
    try:
        tools = [convert_function(function) for function in functions]
    except (AttributeError, KeyError, TypeError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
        raise EvalError(f"{where}: {case_id}: unexpected function doc ({problem})") from None
    expected = []
    for call in answer or []:
        if not isinstance(call, dict):
            raise EvalError(f"{where}: {case_id}: a ground-truth call must be an object, got {call!r}")
        expected.append({_openai_name(name): arguments for name, arguments in call.items()})
    data = {"id": case_id, "category": category, "messages": question[0], "tools": tools}
    try:
        return Case.model_validate({**data, "expected": expected})
    except ValidationError as exc:
        problems = problem_text(exc)
        raise EvalError(f"{where}: {case_id}: does not make a valid case: {problems}") from None


def _refuse(category: str, where: str = "") -> None:
    for marker, reason in _UNSUPPORTED.items():
        if marker in category and not (marker == "relevance" and "irrelevance" in category):
            prefix = f"{where}: " if where else ""
            raise EvalError(f"{prefix}BFCL category {category!r} cannot be imported: {reason}")


def read_category(questions: str, answers: str | None, *, where: str, answers_where: str = "") -> list[Case]:
    """Cases from the text of a question file and of its possible-answer file (None: no answers)."""
    truth: dict[str, list[Any]] = {}
    if answers is not None:
        for number, entry in _lines(answers, answers_where):
            ground = entry.get("ground_truth")
            if not isinstance(ground, list):
                raise EvalError(f'{answers_where}:{number}: "ground_truth" must be a list')
            truth[entry["id"]] = ground
    cases = []
    for number, entry in _lines(questions, where):
        _refuse(_category_of(entry["id"]), f"{where}:{number}")
        answer = truth.get(entry["id"])
        if answer is None and "irrelevance" not in _category_of(entry["id"]):
            source = answers_where or "no possible-answer file"
            raise EvalError(f"{where}:{number}: {entry['id']} has no ground truth ({source})")
        cases.append(_convert(entry, answer, f"{where}:{number}"))
    return cases


def _read_text(source: Path, member: str) -> str | None:
    """A file of the data folder: from the wheel (zip) or a directory; None if it is not there."""
    if source.is_dir():
        for base in (source, source / DATA, source / "data"):
            path = base / member
            if path.is_file():
                return path.read_text(encoding="utf-8")
        return None
    try:
        with zipfile.ZipFile(source) as wheel:
            try:
                return wheel.read(f"{DATA}/{member}").decode("utf-8")
            except KeyError:
                return None
    except (zipfile.BadZipFile, OSError) as exc:
        raise EvalError(f"{source}: not a bfcl-eval wheel or data folder: {exc}") from None


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalError(f"{path}: cannot read it: {exc}") from None


def import_bfcl(source: str | os.PathLike[str], categories: list[str]) -> list[Case]:
    """The cases of ``categories`` from a bfcl-eval wheel, its ``bfcl_eval/data`` folder, or, with
    one category, a question file (its answers are ``possible_answer/<same name>`` beside it)."""
    path = Path(source)
    if not path.exists():
        raise EvalError(f"{source}: no such file or folder")
    if path.is_file() and path.suffix in (".whl", ".zip") and not zipfile.is_zipfile(path):
        raise EvalError(f"{source}: not a bfcl-eval wheel or data folder (not a zip file)")
    if path.is_file() and not zipfile.is_zipfile(path):
        answer_file = path.parent / "possible_answer" / path.name
        text = _read_file(path)
        answer_text = _read_file(answer_file) if answer_file.is_file() else None
        cases = read_category(text, answer_text, where=str(path), answers_where=str(answer_file))
        chosen = [case for case in cases if not categories or case.category in categories]
        if not chosen:
            raise EvalError(f"{source}: no case of category {', '.join(categories)}")
        return chosen
    if not categories:
        raise EvalError(f"{source}: name the categories to import (e.g. --category simple_python)")
    cases = []
    for category in categories:
        _refuse(category)
        name = f"BFCL_v4_{category}.json"
        questions = _read_text(path, name)
        if questions is None:
            raise EvalError(f"{source}: has no {DATA}/{name} (is {category!r} a BFCL v4 category?)")
        answers = _read_text(path, f"possible_answer/{name}")
        cases += read_category(
            questions, answers, where=f"{source}:{name}", answers_where=f"{source}:possible_answer/{name}"
        )
    return cases

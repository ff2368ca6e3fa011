"""Scoring of tool calls against a case, with the rules of BFCL's AST checker (Python cases).

Ported from ``bfcl_eval/eval_checker/ast_eval/ast_checker.py`` (bfcl-eval 2026.3.23, Apache-2.0),
reading the JSON Schema types of the case's tools where BFCL reads its own ("number" for "float",
"array" for "tuple", "object" for "dict"). One call passes when:

* its name is the expected function's;
* every ``required`` parameter is present, and no argument is unknown to the schema or to the
  expected call;
* every value has the declared type (an int is accepted for a ``number``; arrays are checked one
  level deep) and is among the acceptable values: strings compared without case, spaces and
  ``,./-_*^``; lists element-wise with the same string rule; objects key by key; a value of
  another type than the declared one is compared exactly, as BFCL does for "variables";
* every expected argument that was left out has ``""`` among its acceptable values.

A case passes when the number of calls equals the number of expected calls and each call matches
a different expected one, in any order (BFCL matches greedily; here a full matching is searched,
which differs only when one call could match two expectations). ``expected: []`` passes when no
call is made.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from qwenrun.evals.cases import Case, Function

__all__ = ["CheckedCall", "check", "standardize"]

CheckedCall = tuple[str, Mapping[str, Any]]
"""A call as read from the model: (function name, arguments)."""

_TYPES: dict[str, type] = {
    "string": str,
    "integer": int,
    "number": float,
    "boolean": bool,
    "array": list,
    "object": dict,
}
_PUNCTUATION = re.compile(r"[ ,./\-_*^]")


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a case passed, and if not, why (BFCL's error type and a message)."""

    passed: bool
    error: str = ""
    error_type: str = ""


_OK = Verdict(True)


def _fail(error_type: str, error: str) -> Verdict:
    return Verdict(False, error, error_type)


def standardize(text: str) -> str:
    """BFCL's string normalisation: drop spaces and ``,./-_*^``, lower-case, ``'`` -> ``"``."""
    return _PUNCTUATION.sub("", text).lower().replace("'", '"')


def check(case: Case, calls: Sequence[CheckedCall]) -> Verdict:
    """Score the calls the model made (in the order it made them) against ``case.expected``."""
    if not case.expected:
        if calls:
            names = ", ".join(name for name, _ in calls)
            return _fail("irrelevance:called", f"no call was expected, the model called {names}")
        return _OK
    if len(calls) != len(case.expected):
        return _fail("wrong_count", f"expected {len(case.expected)} call(s), got {len(calls)}")
    verdicts = [[_check_expected(case, expected, call) for call in calls] for expected in case.expected]
    if _matching(verdicts, 0, set()):
        return _OK
    if len(calls) == 1:
        return verdicts[0][0]
    for index, row in enumerate(verdicts):
        if not any(verdict.passed for verdict in row):
            first = row[0]
            return _fail("no_match", f"no call matches expected[{index}]: {first.error}")
    return _fail("no_match", "the calls cannot be paired with the expected calls one to one")


def _matching(verdicts: list[list[Verdict]], row: int, used: set[int]) -> bool:
    if row == len(verdicts):
        return True
    for column, verdict in enumerate(verdicts[row]):
        if verdict.passed and column not in used and _matching(verdicts, row + 1, used | {column}):
            return True
    return False


def _check_expected(
    case: Case, expected: Mapping[str, Mapping[str, list[Any]]], call: CheckedCall
) -> Verdict:
    ((name, possible),) = expected.items()
    function = case.function(name)
    assert function is not None  # Case validation guarantees it
    return check_call(function, possible, call)


def check_call(function: Function, possible: Mapping[str, list[Any]], call: CheckedCall) -> Verdict:
    """BFCL's ``simple_function_checker``: one call against one expected call of ``function``."""
    name, arguments = call
    if name != function.name:
        return _fail("wrong_func_name", f"expected a call of {function.name!r}, got {name!r}")
    for param in function.required:
        if param not in arguments:
            return _fail("missing_required", f"missing required parameter {param!r}")
    properties = function.properties
    for param, value in arguments.items():
        if param not in properties or param not in possible:
            return _fail("unexpected_param", f"unexpected parameter {param!r}")
        verdict = _check_value(param, value, properties[param], possible[param])
        if not verdict.passed:
            return verdict
    for param, values in possible.items():
        if param not in arguments and "" not in values:
            return _fail("missing_optional", f"parameter {param!r} left out but it is not optional")
    return _OK


def _schema_type(schema: Any) -> str | None:
    kind = schema.get("type") if isinstance(schema, Mapping) else None
    return kind if isinstance(kind, str) and kind in _TYPES else None


def _check_value(param: str, value: Any, schema: Mapping[str, Any], possible: list[Any]) -> Verdict:
    kind = _schema_type(schema)
    if kind is None:  # no (or an unknown) declared type: compare as BFCL compares "any" values
        if isinstance(value, str):
            return _string(param, value, possible)
        return _among(param, value, possible)
    expected_type = _TYPES[kind]
    items = schema.get("items")
    nested = _TYPES[items_kind] if kind == "array" and (items_kind := _schema_type(items)) else None
    if kind == "number" and type(value) is int:  # Python's int -> float, as BFCL allows
        value = float(value)
    verdict, is_variable = _type_check(param, value, possible, kind, expected_type, nested)
    if not verdict.passed:
        return verdict
    if not is_variable:
        if expected_type is dict:
            return _dict(param, value, possible)
        if expected_type is list and nested is dict:
            return _list_of_dicts(param, value, possible)
        if expected_type is str:
            return _string(param, value, possible)
        if expected_type is list:
            return _list(param, value, possible)
    return _among(param, value, possible)


def _answer_type(possible: list[Any]) -> type | None:
    """The type of the first acceptable value that is not the "may be omitted" marker."""
    return next((type(answer) for answer in possible if answer != ""), None)


def _type_check(
    param: str, value: Any, possible: list[Any], kind: str, expected: type, nested: type | None
) -> tuple[Verdict, bool]:
    """BFCL's ``type_checker``: (verdict, whether the value is a "variable" of the answers' type)."""
    answer_type = _answer_type(possible)
    is_variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if nested is None:
            return _OK, is_variable
        items = cast(list[Any], value)
        for answer in possible:  # each element must have the item type, against some answer
            if not isinstance(answer, list) or all(
                _type_check(param, item, answer, "", nested, None)[0].passed for item in items
            ):
                return _OK, is_variable
        return _fail(
            "type_error:nested",
            f"parameter {param!r}: expected {kind} of {nested.__name__}, got {value!r}",
        ), is_variable
    if answer_type is not None and type(value) is answer_type:
        return _OK, True
    return _fail(
        "type_error:simple",
        f"parameter {param!r}: expected {kind or expected.__name__}, got {type(value).__name__} {value!r}",
    ), is_variable


def _among(param: str, value: Any, possible: list[Any]) -> Verdict:
    if value in possible:
        return _OK
    return _fail("value_error:others", f"parameter {param!r}: {value!r} is not one of {possible!r}")


def _string(param: str, value: str, possible: list[Any]) -> Verdict:
    answers = [standardize(answer) for answer in possible if isinstance(answer, str)]
    if standardize(value) in answers:
        return _OK
    return _fail("value_error:string", f"parameter {param!r}: {value!r} is not one of {possible!r}")


def _standard_list(values: Any) -> list[Any]:
    if not isinstance(values, list):  # BFCL iterates the marker "" as an empty list
        return [] if values == "" else [object()]
    return [standardize(item) if isinstance(item, str) else item for item in values]


def _list(param: str, value: list[Any], possible: list[Any]) -> Verdict:
    if _standard_list(value) in [_standard_list(answer) for answer in possible]:
        return _OK
    return _fail("value_error:list", f"parameter {param!r}: {value!r} is not one of {possible!r}")


def _dict(param: str, value: dict[str, Any], possible: list[Any]) -> Verdict:
    """BFCL's ``dict_checker``: some acceptable dict has every key given, values among its own."""
    verdict = _fail("value_error:dict", f"parameter {param!r}: no acceptable object")
    for answer in possible:
        if answer == "":
            continue
        if not isinstance(answer, dict):
            continue
        verdict = _dict_against(param, value, answer)
        if verdict.passed:
            return verdict
    return verdict


def _dict_against(param: str, value: dict[str, Any], answer: dict[str, Any]) -> Verdict:
    for key, item in value.items():
        if key not in answer:
            return _fail("value_error:dict_key", f"parameter {param!r}: unexpected key {key!r}")
        given = standardize(item) if isinstance(item, str) else item
        accepted = answer[key] if isinstance(answer[key], list) else [answer[key]]
        allowed = [standardize(option) if isinstance(option, str) else option for option in accepted]
        if given not in allowed:
            problem = f"parameter {param!r}: {key}={item!r} is not one of {accepted!r}"
            return _fail("value_error:dict_value", problem)
    for key, accepted in answer.items():
        if key not in value and "" not in (accepted if isinstance(accepted, list) else [accepted]):
            return _fail("value_error:dict_key", f"parameter {param!r}: missing key {key!r}")
    return _OK


def _list_of_dicts(param: str, value: list[Any], possible: list[Any]) -> Verdict:
    """BFCL's ``list_dict_checker``: element i against element i of some acceptable list."""
    verdict = _fail("value_error:list_dict", f"parameter {param!r}: no acceptable list")
    for answer in possible:
        if not isinstance(answer, list) or len(answer) != len(value):
            verdict = _fail("value_error:list_dict_count", f"parameter {param!r}: wrong number of objects")
            continue
        for item, expected in zip(value, answer, strict=True):
            verdict = (
                _dict(param, item, [expected])
                if isinstance(item, dict)
                else _fail("value_error:list_dict", f"parameter {param!r}: {item!r} is not an object")
            )
            if not verdict.passed:
                break
        else:
            return _OK
    return verdict

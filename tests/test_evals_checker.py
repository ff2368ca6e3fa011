"""The BFCL AST checker rules of qwenrun/evals/checker.py, one rule a test (the port agreed with
bfcl-eval 2026.3.23's own ast_checker on 13,511 mutated calls of simple_python and multiple)."""

from __future__ import annotations

from typing import Any

import pytest

from qwenrun.evals.cases import Case
from qwenrun.evals.checker import check, standardize


def tool(name: str, properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": required or []}
    return {"type": "function", "function": {"name": name, "description": "", "parameters": parameters}}


def case(tools: list[dict[str, Any]], expected: list[dict[str, Any]]) -> Case:
    return Case.model_validate(
        {"id": "c", "messages": [{"role": "user", "content": "q"}], "tools": tools, "expected": expected}
    )


AREA = tool(
    "area",
    {
        "base": {"type": "integer"},
        "height": {"type": "number"},
        "unit": {"type": "string"},
        "exact": {"type": "boolean"},
    },
    ["base", "height"],
)
AREA_CASE = case(
    [AREA], [{"area": {"base": [10], "height": [5.0], "unit": ["units", ""], "exact": ["", True]}}]
)


def passes(c: Case, *calls: tuple[str, dict[str, Any]]) -> bool:
    return check(c, list(calls)).passed


def test_exact_call_passes() -> None:
    assert passes(AREA_CASE, ("area", {"base": 10, "height": 5.0, "unit": "units", "exact": True}))


def test_int_is_accepted_for_a_number_but_not_a_float_for_an_integer() -> None:
    assert passes(AREA_CASE, ("area", {"base": 10, "height": 5}))
    verdict = check(AREA_CASE, [("area", {"base": 10.0, "height": 5})])
    assert (verdict.passed, verdict.error_type) == (False, "type_error:simple")


def test_bool_is_not_an_integer() -> None:
    c = case([tool("f", {"n": {"type": "integer"}})], [{"f": {"n": [1]}}])
    assert passes(c, ("f", {"n": 1}))
    assert not passes(c, ("f", {"n": True}))


def test_optional_marker_lets_an_argument_be_left_out() -> None:
    assert passes(AREA_CASE, ("area", {"base": 10, "height": 5.0}))
    strict = case([AREA], [{"area": {"base": [10], "height": [5.0], "unit": ["units"]}}])
    verdict = check(strict, [("area", {"base": 10, "height": 5.0})])
    assert (verdict.passed, verdict.error_type) == (False, "missing_optional")


def test_required_and_unknown_arguments() -> None:
    assert check(AREA_CASE, [("area", {"base": 10})]).error_type == "missing_required"
    assert (
        check(AREA_CASE, [("area", {"base": 10, "height": 5, "color": "red"})]).error_type
        == "unexpected_param"
    )
    # declared in the schema but absent from the expected call: unexpected too (BFCL)
    narrow = case([AREA], [{"area": {"base": [10], "height": [5.0]}}])
    assert check(narrow, [("area", {"base": 10, "height": 5, "unit": "cm"})]).error_type == "unexpected_param"


def test_wrong_function_name() -> None:
    verdict = check(AREA_CASE, [("volume", {"base": 10, "height": 5})])
    assert (verdict.passed, verdict.error_type) == (False, "wrong_func_name")


@pytest.mark.parametrize(
    ("given", "ok"),
    [("New York, NY", True), ("new york ny", True), ("NEW-YORK_NY.", True), ("New York NY*^/", True),
     ("NYC", False), ("New Yorker NY", False)],
)  # fmt: skip
def test_strings_ignore_case_spaces_and_punctuation(given: str, ok: bool) -> None:
    c = case([tool("weather", {"city": {"type": "string"}})], [{"weather": {"city": ["New York, NY"]}}])
    assert passes(c, ("weather", {"city": given})) is ok


def test_standardize_is_bfcls() -> None:
    assert standardize("It's  A-B_C.d/e,f*g^h") == 'it"sabcdefgh'


def test_lists_compare_element_wise_in_order_with_the_string_rule() -> None:
    c = case(
        [tool("pick", {"items": {"type": "array", "items": {"type": "string"}}})],
        [{"pick": {"items": [["Apple pie", "kiwi"], ["kiwi"]]}}],
    )
    assert passes(c, ("pick", {"items": ["apple-pie", "KIWI"]}))
    assert passes(c, ("pick", {"items": ["kiwi"]}))
    assert not passes(c, ("pick", {"items": ["kiwi", "apple pie"]}))  # order matters
    assert check(c, [("pick", {"items": ["kiwi", 3]})]).error_type == "type_error:nested"


def test_number_arrays_are_type_checked_one_level_deep_as_bfcl_does() -> None:
    c = case(
        [tool("mean", {"xs": {"type": "array", "items": {"type": "number"}}})],
        [{"mean": {"xs": [[1.5, 2.0]]}}],
    )
    assert passes(c, ("mean", {"xs": [1.5, 2.0]}))
    assert not passes(c, ("mean", {"xs": [1.5, 2]}))  # BFCL converts top-level ints only


def test_objects_compare_key_by_key() -> None:
    c = case(
        [tool("book", {"options": {"type": "object"}})],
        [{"book": {"options": [{"room": ["Double"], "breakfast": ["", True]}]}}],
    )
    assert passes(c, ("book", {"options": {"room": "double"}}))
    assert passes(c, ("book", {"options": {"room": "Double", "breakfast": True}}))
    assert (
        check(c, [("book", {"options": {"room": "Double", "spa": True}})]).error_type
        == "value_error:dict_key"
    )
    assert check(c, [("book", {"options": {"room": "Single"}})]).error_type == "value_error:dict_value"
    assert check(c, [("book", {"options": {}})]).error_type == "value_error:dict_key"  # room is missing


def test_lists_of_objects() -> None:
    c = case(
        [tool("order", {"lines": {"type": "array", "items": {"type": "object"}}})],
        [{"order": {"lines": [[{"sku": ["A1"], "qty": [2]}, {"sku": ["B2"], "qty": [1, ""]}]]}}],
    )
    assert passes(c, ("order", {"lines": [{"sku": "a1", "qty": 2}, {"sku": "B2"}]}))
    assert not passes(c, ("order", {"lines": [{"sku": "B2"}, {"sku": "a1", "qty": 2}]}))
    assert (
        check(c, [("order", {"lines": [{"sku": "a1", "qty": 2}]})]).error_type
        == "value_error:list_dict_count"
    )


def test_a_value_of_the_answers_type_is_a_variable_compared_exactly() -> None:
    c = case([tool("f", {"n": {"type": "integer"}})], [{"f": {"n": ["count"]}}])
    assert passes(c, ("f", {"n": "count"}))
    assert not passes(c, ("f", {"n": "Count"}))  # no string normalisation for variables


def test_untyped_parameters_compare_by_value() -> None:
    c = case([tool("f", {"x": {}})], [{"f": {"x": ["Hello World", 3]}}])
    assert passes(c, ("f", {"x": "hello-world"}))
    assert passes(c, ("f", {"x": 3}))
    assert not passes(c, ("f", {"x": 4}))


def test_parallel_calls_match_in_any_order_one_to_one() -> None:
    city = tool("weather", {"city": {"type": "string"}, "unit": {"type": "string"}}, ["city"])
    c = case([city], [{"weather": {"city": ["Paris"], "unit": ["", "c"]}}, {"weather": {"city": ["Rome"]}}])
    assert passes(c, ("weather", {"city": "Rome"}), ("weather", {"city": "Paris", "unit": "c"}))
    assert not passes(c, ("weather", {"city": "Rome"}), ("weather", {"city": "Rome"}))
    assert check(c, [("weather", {"city": "Rome"})]).error_type == "wrong_count"


def test_matching_is_a_full_search_not_greedy() -> None:
    """The first call could match either expectation; a greedy match would give it to the first."""
    f = tool("f", {"x": {"type": "integer"}})
    c = case([f], [{"f": {"x": [1, 2]}}, {"f": {"x": [1]}}])
    assert passes(c, ("f", {"x": 1}), ("f", {"x": 2}))


def test_several_functions_the_right_one_must_be_called() -> None:
    c = case([AREA, tool("volume", {"side": {"type": "number"}})], [{"volume": {"side": [2.0]}}])
    assert passes(c, ("volume", {"side": 2}))
    assert check(c, [("area", {"base": 1, "height": 2})]).error_type == "wrong_func_name"


def test_no_call_expected() -> None:
    c = case([AREA], [])
    assert passes(c)
    verdict = check(c, [("area", {"base": 1, "height": 2})])
    assert (verdict.passed, verdict.error_type) == (False, "irrelevance:called")
    assert "area" in verdict.error

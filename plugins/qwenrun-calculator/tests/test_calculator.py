"""Tests of qwenrun-calculator: results, and one CalculatorError per kind of problem."""

import inspect
import tracemalloc
from importlib.metadata import entry_points

import pytest
from qwenrun_calculator import MAX_EXPRESSION_LENGTH, CalculatorError, calculate


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2", "3"),
        ("7 - 10", "-3"),
        ("6 * 7", "42"),
        ("7 / 2", "3.5"),
        ("8 / 2", "4"),
        ("7 // 2", "3"),
        ("-7 // 2", "-4"),
        ("7 % 3", "1"),
        ("-7 % 3", "2"),
        ("2 ** 10", "1024"),
        ("2 ** -1", "0.5"),
        ("2 ** 0.5", "1.4142135623731"),
        ("-2 ** 2", "-4"),  # ** binds tighter than unary minus, as in Python and math
        ("(-2) ** 2", "4"),
        ("2 * (3 + 4) ** 2", "98"),
        ("-(3)", "-3"),
        ("--3", "3"),
        ("+4", "4"),
        ("1e3", "1000"),
        ("1.5e-3 * 2", "0.003"),
        ("2.5E2", "250"),
        ("6.02e23 * 2", "1.204e+24"),
        ("0.1 + 0.2", "0.3"),
        ("1_000 + 1", "1001"),
        ("  1 + 1  ", "2"),
        ("2 × 3 ÷ 4 − 1", "0.5"),
        ("sqrt(16)", "4"),
        ("sqrt(2) / 2", "0.707106781186548"),
        ("sin(pi / 2)", "1"),
        ("cos(0)", "1"),
        ("tan(0)", "0"),
        ("log(e)", "1"),
        ("log(8, 2)", "3"),
        ("log10(1000)", "3"),
        ("exp(0)", "1"),
        ("abs(-3.5)", "3.5"),
        ("round(3.14159, 2)", "3.14"),
        ("round(2.5)", "2"),
        ("min(3, 1, 2)", "1"),
        ("max(3, 1.5)", "3"),
        ("max(-1)", "-1"),
        ("pi", "3.14159265358979"),
        ("e", "2.71828182845905"),
        ("2 ** 100", "1267650600228229401496703205376"),
        ("(" * 100 + "1" + ")" * 100, "1"),
    ],
)
def test_results(expression: str, expected: str) -> None:
    assert calculate(expression) == expected


def test_big_integers_stay_exact_up_to_the_cap() -> None:
    assert calculate("2 ** 3321") == str(2**3321)  # 1000 digits: the most allowed
    assert len(calculate("10 ** 999")) == 1000


@pytest.mark.parametrize("expression", ["1 / 0", "1 // 0", "5 % 0", "0 ** -1", "1 / (2 - 2)", "log(5, 1)"])
def test_division_by_zero(expression: str) -> None:
    with pytest.raises(CalculatorError, match="division by zero"):
        calculate(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "10 ** 100000",
        "9 ** 9 ** 9",
        "2 ** 3322",
        "10 ** 999 * 10",
        "10.0 ** 400",
        "exp(1000)",
        "1e308 * 10",
        "1e999",
        "10 ** 999 / 3",
        "2**" * 160 + "2",
    ],
)
def test_huge_results_are_refused_before_they_are_built(expression: str) -> None:
    """No huge number is ever built: the calculation's peak memory stays far below the result's
    size (9 ** 9 ** 9 alone would take 160 MB and minutes)."""
    tracemalloc.start()
    try:
        with pytest.raises(CalculatorError, match="the result is too large"):
            calculate(expression)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{expression}: {peak} bytes at the peak"


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("foo + 1", r"unknown name 'foo' \(the known constants are pi, e\): 'foo' at column 1"),
        ("2 * x", "unknown name 'x' .*: 'x' at column 5"),
        ("bar(2)", "unknown function 'bar' .*sqrt, sin, cos"),
        ("__import__('os').system('ls')", "only calls of the built-in functions are supported"),
        ("__import__('os')", "unknown function '__import__'"),
        ("sqrt.__class__", "attribute access not supported"),
        ("(1).real", "attribute access not supported"),
        ("sqrt", "sqrt is a function; call it like sqrt\\(x\\)"),
    ],
)
def test_unknown_names_and_attributes(expression: str, message: str) -> None:
    with pytest.raises(CalculatorError, match=message):
        calculate(expression)


@pytest.mark.parametrize(
    ("expression", "column"),
    [
        ("2 * (3 + 4", 5),  # the unclosed parenthesis
        ("1 +* 2", 4),
        ("1 2", 3),
        ("x = 1", 3),
        ("2 +", 4),  # past the end
        ("  1 +", 6),  # leading blanks count
        ("sqrt(2))", 8),
    ],
)
def test_syntax_errors_name_the_column(expression: str, column: int) -> None:
    with pytest.raises(CalculatorError, match=rf"^syntax error at column {column}\b"):
        calculate(expression)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("2 ^ 3", r"'\^' is not supported \(use \*\* for powers\)"),
        ("1 << 3", "'<<' is not supported"),
        ("~1", "not supported"),
        ("1 < 2", "comparisons not supported"),
        ("1 and 2", "'and'/'or' not supported"),
        ("[1, 2]", "lists not supported"),
        ("(1, 2)", "tuples .* not supported"),
        ("'a'", "the constant 'a' is not supported"),
        ("True + 1", "the constant True is not supported"),
        ("1j", "complex numbers are not supported"),
        ("lambda: 1", "lambda not supported"),
        ("1 if 2 else 3", "conditional expressions not supported"),
        ("sqrt(x=4)", r"sqrt\(\) takes no keyword arguments"),
        ("sqrt(1, 2)", r"sqrt\(\) takes 1 argument\(s\), got 2"),
        ("log(1, 2, 3)", r"log\(\) takes 1-2 argument\(s\), got 3"),
        ("min()", r"min\(\) takes 1 or more argument\(s\), got 0"),
        ("max(*[1])", "'\\*' unpacking not supported"),
        ("round(2.5, 1.5)", "number of digits must be an integer"),
        ("sqrt(-1)", "math domain error: 'sqrt\\(-1\\)' at column 1"),
        ("log(0)", "math domain error"),
        ("(-8) ** (1 / 3)", "the result is not a real number"),
    ],
)
def test_unsupported_syntax_and_bad_arguments(expression: str, message: str) -> None:
    with pytest.raises(CalculatorError, match=message):
        calculate(expression)


def test_empty_and_too_long() -> None:
    with pytest.raises(CalculatorError, match="the expression is empty"):
        calculate("   ")
    with pytest.raises(
        CalculatorError, match=rf"too long \(501 characters; the limit is {MAX_EXPRESSION_LENGTH}\)"
    ):
        calculate("1" * 501)


def test_signature_and_docstring_follow_the_tool_contract() -> None:
    signature = inspect.signature(calculate)
    assert list(signature.parameters) == ["expression"]
    doc = inspect.getdoc(calculate) or ""
    assert doc.split("\n\n")[0].startswith("Evaluate an arithmetic expression")
    assert "Args:\n    expression:" in doc


def test_entry_point_is_registered() -> None:
    (ep,) = [ep for ep in entry_points(group="qwenrun.tools") if ep.name == "calculate"]
    assert ep.value == "qwenrun_calculator:calculate"
    assert ep.load() is calculate

"""qwenrun tool plugin: a safe arithmetic calculator.

One tool, :func:`calculate`, registered in the ``qwenrun.tools`` entry-point group.
The expression is parsed with :func:`ast.parse` and evaluated by a walker that accepts only
a whitelist of nodes: numbers, + - * / // % **, unary minus/plus, parentheses, the constants
``pi`` and ``e`` and calls of a fixed set of math functions. Nothing is ever ``eval``-ed.

Guards: the expression length, the size of every integer (at most :data:`MAX_INT_DIGITS`
digits, checked *before* a power is computed), infinities and NaNs. Every problem raises
:class:`CalculatorError` with a message naming it (and the column, for syntax errors).
This package does not import qwenrun.
"""

import ast
import math
import operator
from collections.abc import Callable
from typing import Annotated

from pydantic import Field

__all__ = ["MAX_EXPRESSION_LENGTH", "MAX_INT_DIGITS", "CalculatorError", "calculate"]
__version__ = "0.1.0"

MAX_EXPRESSION_LENGTH = 500
MAX_INT_DIGITS = 1000
_MAX_INT_BITS = math.ceil(MAX_INT_DIGITS * math.log2(10))

Number = int | float


class CalculatorError(Exception):
    """The expression could not be evaluated; the message says why, for the model to read."""


def _power(base: Number, exponent: Number) -> Number:
    # 2**k has k+1 bits, so (bits(base) - 1) * exponent is a lower bound of the result's bits:
    # refuse before computing a number that could take minutes and gigabytes.
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and exponent > 0
        and (base.bit_length() - 1) * exponent > _MAX_INT_BITS
    ):
        raise OverflowError
    return base**exponent


def _round(value: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(value)
    if not isinstance(ndigits, int):
        raise TypeError("round(): the number of digits must be an integer")
    return round(value, ndigits)


def _minimum(*values: Number) -> Number:
    return min(values)


def _maximum(*values: Number) -> Number:
    return max(values)


_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _power,
}
_UNSUPPORTED_OPERATORS: dict[type[ast.operator], str] = {
    ast.BitXor: "'^' is not supported (use ** for powers)",
    ast.BitAnd: "'&' is not supported",
    ast.BitOr: "'|' is not supported",
    ast.LShift: "'<<' is not supported",
    ast.RShift: "'>>' is not supported",
    ast.MatMult: "'@' is not supported",
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# name -> (function, least and most number of arguments; None: no upper limit)
_FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int | None]] = {
    "sqrt": (math.sqrt, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "log": (math.log, 1, 2),
    "log10": (math.log10, 1, 1),
    "exp": (math.exp, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (_minimum, 1, None),
    "max": (_maximum, 1, None),
}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}
_NODE_NAMES: dict[type[ast.AST], str] = {
    ast.Compare: "comparisons",
    ast.BoolOp: "'and'/'or'",
    ast.Attribute: "attribute access",
    ast.Subscript: "indexing",
    ast.Tuple: "tuples (a comma outside a function call)",
    ast.List: "lists",
    ast.Dict: "dicts",
    ast.Set: "sets",
    ast.Lambda: "lambda",
    ast.IfExp: "conditional expressions",
    ast.Starred: "'*' unpacking",
    ast.JoinedStr: "f-strings",
    ast.NamedExpr: "assignments",
}
# Typographic operators a model may copy from text; one character for one, so columns hold.
_NORMALISE = str.maketrans({"×": "*", "÷": "/", "−": "-", "\n": " ", "\r": " ", "\t": " "})


def calculate(
    expression: Annotated[str, Field(min_length=1, max_length=MAX_EXPRESSION_LENGTH)],
) -> str:
    """Evaluate an arithmetic expression and return the result; use it for any non-trivial math.

    Supports + - * / // % ** and parentheses, numbers like 42, 3.5 or 1.2e-3, the functions
    sqrt, sin, cos, tan (radians), log (natural; log(x, base) for another base), log10, exp, abs,
    round, min and max, and the constants pi and e.

    Args:
        expression: The expression to evaluate, e.g. "2 * (3 + 4) ** 2" or "sqrt(2) / 2".
    """
    text = expression.translate(_NORMALISE).rstrip()
    indent = len(text) - len(text.lstrip())
    text = text.lstrip()
    if not text:
        raise CalculatorError("the expression is empty")
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise CalculatorError(
            f"the expression is too long ({len(text)} characters; the limit is {MAX_EXPRESSION_LENGTH})"
        )
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        column = exc.offset + indent if exc.offset else len(text) + indent + 1
        where = " (the end of the expression)" if column > len(text) + indent else ""
        raise CalculatorError(f"syntax error at column {column}{where}: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise CalculatorError(f"cannot parse the expression: {exc or 'it is nested too deeply'}") from None
    try:
        result = _Evaluator(text, indent).eval(tree.body)
    except RecursionError:
        raise CalculatorError("the expression is nested too deeply") from None
    return _format(result)


def _format(value: Number) -> str:
    if isinstance(value, int):
        return str(value)
    text = f"{value:.15g}"
    return "0" if text == "-0" else text


class _Evaluator:
    def __init__(self, text: str, indent: int) -> None:
        self.text = text
        self.indent = indent

    def where(self, node: ast.expr) -> str:
        segment = ast.get_source_segment(self.text, node) or ""
        return f"'{segment}' at column {node.col_offset + self.indent + 1}"

    def fail(self, node: ast.expr, problem: str) -> CalculatorError:
        return CalculatorError(f"{problem}: {self.where(node)}")

    def eval(self, node: ast.expr) -> Number:
        if isinstance(node, ast.Constant):
            return self.constant(node)
        if isinstance(node, ast.Name):
            if node.id in _CONSTANTS:
                return _CONSTANTS[node.id]
            if node.id in _FUNCTIONS:
                raise self.fail(node, f"{node.id} is a function; call it like {node.id}(x)")
            names = ", ".join(_CONSTANTS)
            raise self.fail(node, f"unknown name '{node.id}' (the known constants are {names})")
        if isinstance(node, ast.UnaryOp):
            unary = _UNARY.get(type(node.op))
            if unary is None:
                raise self.fail(node, f"the operator {type(node.op).__name__} is not supported")
            return self.checked(node, unary, self.eval(node.operand))
        if isinstance(node, ast.BinOp):
            binary = _BINARY.get(type(node.op))
            if binary is None:
                raise self.fail(node, _UNSUPPORTED_OPERATORS.get(type(node.op), "unsupported operator"))
            return self.checked(node, binary, self.eval(node.left), self.eval(node.right))
        if isinstance(node, ast.Call):
            return self.call(node)
        raise self.fail(node, f"{_NODE_NAMES.get(type(node), type(node).__name__)} not supported")

    def constant(self, node: ast.Constant) -> Number:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            kind = "complex numbers are" if isinstance(value, complex) else f"the constant {value!r} is"
            raise self.fail(node, f"{kind} not supported")
        return self.checked(node, lambda x: x, value)

    def call(self, node: ast.Call) -> Number:
        if not isinstance(node.func, ast.Name):
            raise self.fail(node, "only calls of the built-in functions are supported")
        name = node.func.id
        if name not in _FUNCTIONS:
            known = ", ".join(_FUNCTIONS)
            raise self.fail(node, f"unknown function '{name}' (the known functions are {known})")
        if node.keywords:
            raise self.fail(node, f"{name}() takes no keyword arguments")
        function, least, most = _FUNCTIONS[name]
        if len(node.args) < least or (most is not None and len(node.args) > most):
            wanted = (
                str(least) if least == most else f"{least} or more" if most is None else f"{least}-{most}"
            )
            raise self.fail(node, f"{name}() takes {wanted} argument(s), got {len(node.args)}")
        args = [self.eval(arg) for arg in node.args]
        return self.checked(node, function, *args)

    def checked(self, node: ast.expr, function: Callable[..., Number], *args: Number) -> Number:
        """Apply ``function`` and vet the result; turn Python's arithmetic errors into ours."""
        try:
            result: object = function(*args)
        except ZeroDivisionError:
            raise self.fail(node, "division by zero") from None
        except OverflowError:
            raise self.fail(node, "the result is too large") from None
        except ValueError as exc:
            detail = "" if str(exc) == "math domain error" else f" ({exc})"
            raise self.fail(node, f"math domain error{detail}") from None
        except TypeError as exc:
            raise self.fail(node, str(exc)) from None
        if isinstance(result, complex):
            raise self.fail(node, "the result is not a real number")
        if isinstance(result, bool) or not isinstance(result, int | float):
            raise self.fail(node, "the result is not a number")
        if isinstance(result, int) and result.bit_length() > _MAX_INT_BITS - 4:
            if abs(result) >= 10**MAX_INT_DIGITS:
                raise self.fail(node, f"the result is too large (more than {MAX_INT_DIGITS} digits)")
        elif isinstance(result, float) and not math.isfinite(result):
            problem = "the result is not a number" if math.isnan(result) else "the result is too large"
            raise self.fail(node, problem)
        return result

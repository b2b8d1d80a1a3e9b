"""The calculator tool: arithmetic over a whitelisted subset of Python's expression grammar.

The model's text is untrusted, so nothing is ever `eval`ed: the expression is parsed with
`ast` and walked by `_Evaluator`, which knows only numeric literals, `+ - * / // % **`,
unary `+ -`, parentheses (implicit in the tree) and calls to a few named functions
(`FUNCTIONS`). Names, attributes, subscripts, comprehensions, lambdas, strings, booleans and
complex numbers are all rejected before anything is computed.

Cost is bounded too, since a policy under RL will find every way to make a tool slow:
the source is at most `MAX_CHARS` long with at most `MAX_NODES` syntax nodes, every literal
and intermediate result must stay within `MAX_MAGNITUDE`, and a power's exponent within
`MAX_EXPONENT` (so `9**9**9` is refused instead of computing a 370-million-digit integer).

`calculator(expression)` is what the agent calls: it never raises, and returns either the
result or `"error: ..."`, which goes back to the model as the tool's answer.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Callable, Union

Number = Union[int, float]

MAX_CHARS = 256
MAX_NODES = 128
MAX_EXPONENT = 64
MAX_MAGNITUDE = 1e15
MAX_ROUND_DIGITS = 12

_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
# Hints for operators people mean as something else; a plain "not allowed" teaches nothing.
_HINTS: dict[type[ast.AST], str] = {
    ast.BitXor: "'^' is not a power here: write 2**3",
    ast.Tuple: "commas are not allowed in numbers or between expressions: write 1250, not 1,250",
}


class CalcError(ValueError):
    """The expression is not allowed or cannot be evaluated; the message is shown to the model."""


def _round(x: Number, ndigits: Number = 0) -> Number:
    if not isinstance(ndigits, int) or abs(ndigits) > MAX_ROUND_DIGITS:
        raise CalcError(f"round's digits must be an integer within +-{MAX_ROUND_DIGITS}")
    return round(x, ndigits) if ndigits else round(x)


def _sqrt(x: Number) -> float:
    if x < 0:
        raise CalcError("sqrt of a negative number")
    return math.sqrt(x)


def _min(*args: Number) -> Number:
    if not args:
        raise CalcError("min needs at least one argument")
    return min(args)


def _max(*args: Number) -> Number:
    if not args:
        raise CalcError("max needs at least one argument")
    return max(args)


def _abs(x: Number) -> Number:
    return abs(x)


def _floor(x: Number) -> int:
    return math.floor(x)


def _ceil(x: Number) -> int:
    return math.ceil(x)


FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {
    # name: (implementation, min args, max args)
    "round": (_round, 1, 2),
    "abs": (_abs, 1, 1),
    "min": (_min, 1, 16),
    "max": (_max, 1, 16),
    "sqrt": (_sqrt, 1, 1),
    "floor": (_floor, 1, 1),
    "ceil": (_ceil, 1, 1),
}


def _checked(value: Number) -> Number:
    """Every literal and intermediate result goes through here: finite and within bounds."""
    if isinstance(value, float) and not math.isfinite(value):
        raise CalcError("result is not a finite number")
    if abs(value) > MAX_MAGNITUDE:
        raise CalcError(f"number too large (limit {MAX_MAGNITUDE:.0e})")
    return value


class _Evaluator:
    """Evaluates a parsed expression node by node; anything without a visit method is refused."""

    def visit(self, node: ast.AST) -> Number:
        method = getattr(self, f"visit_{type(node).__name__}", None)
        if method is None:
            what = f"{type(node).__name__} is not allowed; use numbers, + - * / // % ** and ( )"
            raise CalcError(_HINTS.get(type(node), what))
        return method(node)  # type: ignore[no-any-return]

    def visit_Expression(self, node: ast.Expression) -> Number:
        return self.visit(node.body)

    def visit_Constant(self, node: ast.Constant) -> Number:
        # bool is an int subclass, and `True + 1` is not arithmetic anyone meant.
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalcError(f"only numbers are allowed, got {type(node.value).__name__} {node.value!r}")
        return _checked(node.value)

    def visit_Name(self, node: ast.Name) -> Number:
        # Variables, constants such as pi, builtins: the tool knows numbers only.
        raise CalcError(f"names like {node.id!r} are not allowed; write the numbers themselves")

    def visit_UnaryOp(self, node: ast.UnaryOp) -> Number:
        fn = _UNARY.get(type(node.op))
        if fn is None:
            raise CalcError(f"unary {type(node.op).__name__} is not allowed")
        return _checked(fn(self.visit(node.operand)))

    def visit_BinOp(self, node: ast.BinOp) -> Number:
        fn = _BINARY.get(type(node.op))
        if fn is None:
            raise CalcError(_HINTS.get(type(node.op), f"operator {type(node.op).__name__} is not allowed"))
        left, right = self.visit(node.left), self.visit(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            # Checked before computing: the bound on results alone would come too late.
            raise CalcError(f"exponent too large (limit {MAX_EXPONENT})")
        if isinstance(node.op, ast.Pow) and left == 0 and right < 0:
            raise CalcError("division by zero")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise CalcError("division by zero")
        try:
            value = fn(left, right)
        except OverflowError:
            raise CalcError(f"number too large (limit {MAX_MAGNITUDE:.0e})") from None
        if isinstance(value, complex):  # (-8) ** 0.5
            raise CalcError("result is not a real number")
        return _checked(value)

    def visit_Call(self, node: ast.Call) -> Number:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise CalcError(f"unknown function; allowed: {', '.join(FUNCTIONS)}")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise CalcError("functions take positional arguments only")
        fn, lo, hi = FUNCTIONS[node.func.id]
        if not lo <= len(node.args) <= hi:
            raise CalcError(f"{node.func.id} takes {lo}{'' if lo == hi else f' to {hi}'} argument(s)")
        args = [self.visit(a) for a in node.args]
        try:
            return _checked(fn(*args))
        except (OverflowError, ValueError) as exc:
            if isinstance(exc, CalcError):
                raise
            raise CalcError(f"{node.func.id}: {exc}") from None


def _normalise(expression: str) -> str:
    # Symbols models copy from word problems; everything else is left for the parser to judge.
    return expression.replace("×", "*").replace("÷", "/").replace("−", "-").strip()


def evaluate(expression: str) -> Number:
    """The value of `expression`; raises `CalcError` (with a message for the model) otherwise."""
    if not isinstance(expression, str):
        raise CalcError("expression must be a string")
    source = _normalise(expression)
    if not source:
        raise CalcError("empty expression")
    if len(source) > MAX_CHARS:
        raise CalcError(f"expression too long (limit {MAX_CHARS} characters)")
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalcError(f"cannot parse {source!r}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalcError(f"expression too complex (limit {MAX_NODES} syntax nodes)")
    try:
        return _Evaluator().visit(tree)
    except RecursionError:
        raise CalcError("expression nested too deeply") from None


def format_number(value: Number) -> str:
    """How a result is shown to the model: integers exactly, floats to 10 decimals without noise
    (`0.1 + 0.2` reads `0.3`, `12 / 4` reads `3`)."""
    if isinstance(value, int):
        return str(value)
    rounded = round(value, 10)
    if rounded == int(rounded):
        return str(int(rounded))
    return repr(rounded)


def calculator(expression: str) -> str:
    """The tool: the result as text, or `"error: <why>"`. Never raises."""
    try:
        return format_number(evaluate(expression))
    except CalcError as exc:
        return f"error: {exc}"

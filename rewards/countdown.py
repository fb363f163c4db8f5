"""The ``countdown`` reward: an arithmetic expression that reaches ``target`` using each of ``numbers`` once.

Why score this: Countdown (TinyZero) is the cheapest task where R1-Zero-style search and self-checking
emerge, and its answer is checkable exactly: 1.0 only when the expression in the last
``<answer>...</answer>`` uses every given number exactly once, only ``+ - * /`` and parentheses, and
equals the target exactly (rational arithmetic, so ``1/3*3`` is 1). Anything else, including a missing
answer or division by zero, is 0.0: a near miss is still a miss. A trailing ``= <number>`` after the
expression is ignored (models often write ``(3+5)*2 = 16``); only the expression is judged.

The expression is parsed with ``ast`` and evaluated by a walker that accepts integer literals, the four
binary operators and parentheses, nothing else: model text never reaches ``eval``.

Example: ``countdown_reward(["Q"], ["<answer>(6 - 2) * 5</answer>"], target=[20], numbers=[[2, 5, 6]])``
-> ``[1.0]``.
"""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction

from rewards.registry import RewardError, register_reward
from rewards.text import as_text, last_tag_content

MAX_EXPRESSION_CHARS = 256
MAX_DEPTH = 64
_ALLOWED_CHARS = re.compile(r"[0-9+\-*/() \t\n]+")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def safe_eval(expression: str) -> tuple[Fraction, list[int]]:
    """Evaluate an arithmetic expression exactly; return its value and the integer literals it used.

    Raises ValueError for anything but integer literals, ``+ - * /`` and parentheses (no unary minus, no
    powers, no names), for expressions over MAX_EXPRESSION_CHARS, and for division by zero.

    Example: ``safe_eval("(6 - 2) * 5")`` -> ``(Fraction(20, 1), [6, 2, 5])``.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    if not _ALLOWED_CHARS.fullmatch(expression):
        raise ValueError("only digits, + - * /, parentheses and spaces are allowed")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as e:
        raise ValueError(f"not an expression: {e}") from e
    literals: list[int] = []
    return _eval(tree.body, literals, 0), literals


def _eval(node: ast.AST, literals: list[int], depth: int) -> Fraction:
    if depth > MAX_DEPTH:
        raise ValueError("expression nested too deeply")
    if isinstance(node, ast.Constant) and type(node.value) is int:
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left = _eval(node.left, literals, depth + 1)
        right = _eval(node.right, literals, depth + 1)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return _OPS[type(node.op)](left, right)
    raise ValueError(f"{type(node).__name__} is not allowed")


def score_countdown(completion: str, target: int | str, numbers: list) -> float:
    """1.0 if the last ``<answer>`` reaches ``target`` using each of ``numbers`` exactly once, else 0.0."""
    answer = last_tag_content(completion, "answer")
    if answer is None:
        return 0.0
    expression = answer.split("=")[0]
    try:
        value, used = safe_eval(expression)
    except ValueError:
        return 0.0
    if sorted(used) != sorted(int(n) for n in numbers):
        return 0.0
    return 1.0 if value == Fraction(str(target)) else 0.0


@register_reward("countdown", accuracy=True)
def countdown_reward(
    prompts: list, completions: list, target: list | None = None, numbers: list | None = None, **columns
) -> list[float | None]:
    """Score each completion with ``score_countdown``; needs the ``target`` and ``numbers`` columns. A row
    whose target or numbers is None gets None (no score)."""
    if target is None or numbers is None:
        raise RewardError(
            "the countdown reward needs 'target' and 'numbers' columns in the dataset; "
            f"got columns: {sorted(columns)}"
        )
    return [
        None if t is None or ns is None else score_countdown(as_text(c), t, ns)
        for c, t, ns in zip(completions, target, numbers, strict=True)
    ]

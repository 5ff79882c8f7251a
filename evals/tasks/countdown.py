"""Countdown: combine the given numbers with + - * / and parentheses to reach a target.

Problems are generated offline and are solvable by construction: the target is the value of a random
expression over the numbers (exact, integer at every step). Which split a problem belongs to is fixed
by a hash of (numbers, target), so train and test never overlap.

The validator parses the answer with Python's `ast` and walks a whitelist of node types (integer
literals, + - * /, parentheses are implicit in the tree); model text is never `eval`-ed. Arithmetic is
exact (`Fraction`), so 7 / 2 * 2 is 7, and a division by zero is a failure with its reason.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from collections import Counter
from fractions import Fraction
from functools import partial

from selfsteer.tools.tasks import Problem, Verdict, check_split, split_of

TASK = "countdown"
MIN_NUMBERS, MAX_NUMBERS = 3, 5
MAX_NUMBER = 25
MAX_TARGET = 500
MAX_ANSWER_CHARS = 200
LEVELS = (2, 3, 4, 5)  # countdown:N
_EXHAUSTED = 20_000

SYSTEM = (
    "You solve Countdown puzzles. Reply with one arithmetic expression and nothing else: no words, no "
    "'=' sign."
)
PROMPT = (
    "Using the numbers {numbers}, write an expression that equals {target}. Use every number exactly "
    "once. Allowed: + - * / and parentheses."
)

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_SYMBOLS = {"×": "*", "·": "*", "÷": "/", "−": "-", "–": "-", "\\times": "*", "\\div": "/"}


# -----------------------------------------------------------------------------
# generation


def _random_solution(rng: random.Random, count: int | None = None) -> tuple[list[int], int] | None:
    """`count` numbers (None: 3 to 5) and the value of a random expression over all of them; None if it
    went negative, was not an integer at some step, or the target is out of range."""
    count = rng.randint(MIN_NUMBERS, MAX_NUMBERS) if count is None else count
    numbers = [rng.randint(1, MAX_NUMBER) for _ in range(count)]
    pool = list(numbers)
    while len(pool) > 1:
        a = pool.pop(rng.randrange(len(pool)))
        b = pool.pop(rng.randrange(len(pool)))
        op = rng.choice("+-*/")
        if op == "+":
            value = a + b
        elif op == "-":
            value = a - b
        elif op == "*":
            value = a * b
        else:
            if b == 0 or a % b:
                return None
            value = a // b
        if value <= 0:
            return None
        pool.append(value)
    target = pool[0]
    if not 1 <= target <= MAX_TARGET or target in numbers:
        return None
    return numbers, target


def load(
    split: str = "train", n: int | None = None, seed: int = 0, count: int | None = None
) -> list[Problem]:
    """`n` Countdown problems of `split` (default 200), the same for the same seed. `count`: how many
    numbers each problem has (the task `countdown:N`); None mixes 3 to 5 (the task `countdown`).

    A level has finitely many problems (`countdown:2` has 959, 186 of them in the test split): asking
    for more returns them all."""
    check_split(split)
    if count is not None and not 2 <= count <= MAX_NUMBERS:
        raise ValueError(f"countdown:N takes 2 to {MAX_NUMBERS} numbers, not {count}")
    n = 200 if n is None else n
    rng = random.Random(f"countdown-{seed}" if count is None else f"countdown{count}-{seed}")
    problems: list[Problem] = []
    seen: set[str] = set()
    misses = 0  # draws in a row that found nothing new: the level is exhausted
    while len(problems) < n and misses < _EXHAUSTED:
        solution = _random_solution(rng, count)
        key = solution and f"{','.join(map(str, sorted(solution[0])))}->{solution[1]}"
        if solution is None or key in seen or split_of(key) != split:
            misses += 1
            continue
        misses = 0
        seen.add(key)
        problems.append(make_problem(*solution, key, task=TASK if count is None else f"{TASK}:{count}"))
    return problems


def loader(count: int):
    """The loader of the level `countdown:COUNT`."""
    return partial(load, count=count)


def make_problem(numbers: list[int], target: int, id: str | None = None, task: str = TASK) -> Problem:
    return Problem(
        id=id or f"{','.join(map(str, sorted(numbers)))}->{target}",
        prompt=PROMPT.format(numbers=", ".join(map(str, numbers)), target=target),
        validate=partial(validate, numbers=tuple(numbers), target=target),
        system=SYSTEM,
        task=task,
    )


# -----------------------------------------------------------------------------
# validation


def extract_expression(answer: str) -> str:
    """The expression in a model's answer: inside <answer> tags or a code fence if there are any, else
    the last line with an operator; of `lhs = rhs` the side that has an operator."""
    text = answer.strip()
    match = re.search(r"<answer>(.*?)</answer>", text, re.S) or re.search(
        r"```(?:\w+)?\n?(.*?)```", text, re.S
    )
    if match:
        text = match.group(1)
    for symbol, replacement in _SYMBOLS.items():
        text = text.replace(symbol, replacement)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = next((x for x in reversed(lines) if re.search(r"\d", x) and re.search(r"[-+*/]", x)), "")
    line = line or (lines[-1] if lines else "")
    sides = [side.strip() for side in line.split("=")]
    expression = next((side for side in sides if re.search(r"[-+*/]", side)), sides[0])
    return expression.strip().strip("`$").rstrip(".").strip()


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """The exact value of an expression and the integer literals it uses. Raises ValueError for
    anything outside the whitelist and ZeroDivisionError for a division by zero."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as error:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from error
    used: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ZeroDivisionError("division by zero")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.Constant):
            raise ValueError(f"only whole numbers are allowed, not {node.value!r}")
        if isinstance(node, ast.BinOp):
            raise ValueError(f"operator {type(node.op).__name__} is not allowed (only + - * /)")
        if isinstance(node, ast.UnaryOp):
            raise ValueError("unary signs are not allowed (only + - * / between numbers)")
        raise ValueError(f"{type(node).__name__} is not allowed in an expression")

    return walk(tree), used


def validate(answer: str, numbers: tuple[int, ...], target: int) -> Verdict:
    expression = extract_expression(answer)
    if not expression:
        return Verdict.fail("no expression in the answer")
    if len(expression) > MAX_ANSWER_CHARS:
        return Verdict.fail(f"the expression is longer than {MAX_ANSWER_CHARS} characters")
    try:
        value, used = evaluate(expression)
    except ZeroDivisionError:
        return Verdict.fail(f"division by zero in {expression!r}")
    except ValueError as error:
        return Verdict.fail(str(error))
    if Counter(used) != Counter(numbers):
        missing = sorted((Counter(numbers) - Counter(used)).elements())
        extra = sorted((Counter(used) - Counter(numbers)).elements())
        parts = ([f"unused: {missing}"] if missing else []) + (
            [f"not allowed or used twice: {extra}"] if extra else []
        )
        return Verdict.fail(f"must use each of {list(numbers)} exactly once ({'; '.join(parts)})")
    if value != target:
        return Verdict.fail(f"{expression} = {value}, not {target}")
    return Verdict.ok()

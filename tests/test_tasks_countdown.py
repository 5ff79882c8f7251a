"""Countdown: generation (solvable, seeded, disjoint splits) and the validator on hand-written right
and wrong answers. No model, no mocks."""

from __future__ import annotations

import itertools
from collections import Counter
from fractions import Fraction

import pytest

from selfsteer.evals.tasks import countdown, load_task
from selfsteer.evals.tasks.countdown import evaluate, extract_expression, validate


def test_generation_is_seeded_sized_and_splits_never_overlap():
    first = load_task("countdown", "train", n=50, seed=3)
    assert [p.id for p in first] == [p.id for p in load_task("countdown", "train", n=50, seed=3)]
    assert [p.id for p in first] != [p.id for p in load_task("countdown", "train", n=50, seed=4)]
    train = {p.id for seed in range(3) for p in load_task("countdown", "train", n=200, seed=seed)}
    test = {p.id for seed in range(3) for p in load_task("countdown", "test", n=100, seed=seed)}
    assert train and test and not train & test
    for problem in first:
        numbers = [int(x) for x in problem.id.split("->")[0].split(",")]
        assert 3 <= len(numbers) <= 5
        assert problem.task == "countdown" and str(numbers[0]) in problem.prompt


def solve(numbers: list[int], target: int) -> str | None:
    """An expression over all of `numbers` equal to `target`, by brute force over every pairing and
    operator with exact fractions (written here, independent of the generator); None if none exists."""
    goal = Fraction(target)
    dead: set[tuple[Fraction, ...]] = set()  # multisets of values already known not to reach the goal

    def search(items: tuple[tuple[Fraction, str], ...]) -> str | None:
        if len(items) == 1:
            return items[0][1] if items[0][0] == goal else None
        key = tuple(sorted(value for value, _ in items))
        if key in dead:
            return None
        for i, j in itertools.combinations(range(len(items)), 2):
            (a, x), (b, y) = items[i], items[j]
            rest = tuple(item for k, item in enumerate(items) if k not in (i, j))
            options = [
                (a + b, f"({x} + {y})"),
                (a * b, f"({x} * {y})"),
                (a - b, f"({x} - {y})"),
                (b - a, f"({y} - {x})"),
            ]
            options += [(a / b, f"({x} / {y})")] if b else []
            options += [(b / a, f"({y} / {x})")] if a else []
            for value, expression in options:
                if found := search((*rest, (value, expression))):
                    return found
        dead.add(key)
        return None

    return search(tuple((Fraction(n), str(n)) for n in numbers))


def test_the_brute_force_solver_finds_solutions_and_reports_none():
    assert validate(solve([3, 5, 2], 16), (3, 5, 2), 16).passed
    assert validate(solve([25, 3, 7, 1, 9], 487), (25, 3, 7, 1, 9), 487).passed
    assert solve([1, 1, 1], 100) is None and solve([2, 2, 2, 2, 2], 499) is None


def test_every_generated_problem_is_solvable():
    """Every problem of both splits, 3, 4 and 5 numbers alike: the solver finds an expression and the
    task's own validator accepts it."""
    sizes = Counter()
    for split in ("train", "test"):
        for problem in load_task("countdown", split, n=40, seed=0):
            head, target = problem.id.split("->")
            numbers = [int(x) for x in head.split(",")]
            sizes[len(numbers)] += 1
            expression = solve(numbers, int(target))
            assert expression is not None, f"{problem.id} has no solution"
            verdict = problem.validate(expression)
            assert verdict.passed, (problem.id, expression, verdict.reason)
    assert set(sizes) == {3, 4, 5} and min(sizes.values()) >= 5, sizes


NUMBERS, TARGET = (3, 5, 2), 16


@pytest.mark.parametrize(
    "answer",
    [
        "(3 + 5) * 2",
        "2 * (5 + 3)",
        "(3+5)*2 = 16",
        "16 = 2 * (3 + 5)",
        "<answer>(5 + 3) * 2</answer>",
        "Let me think.\nThe answer:\n```\n(3 + 5) × 2\n```",
        "(3 + 5) * 2.",
    ],
)
def test_right_answers_pass(answer):
    verdict = validate(answer, NUMBERS, TARGET)
    assert verdict.passed, verdict.reason


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("(3 + 5) * 2 + 0", "exactly once"),  # a number that was not given
        ("(3 + 3) * 2 + 4", "exactly once"),  # a number used twice (and one missing)
        ("3 * 5", "exactly once"),  # not every number used
        ("(3 + 5) * 2 * 1", "exactly once"),
        ("3 + 5 + 2", "not 16"),  # right numbers, wrong result
        ("(3 + 5) / (2 - 2) * 2", "division by zero"),
        ("2 ** 3 + 5 + 3", "Pow"),  # an operator outside the whitelist
        ("-3 + 5 * 2", "unary"),
        ("(3.0 + 5) * 2", "whole numbers"),
        ("__import__('os').system('true')", "not allowed"),  # never evaluated
        ("abs(3 + 5) * 2", "not allowed"),
        ("", "no expression"),
        ("I cannot solve this.", "not an arithmetic expression"),
    ],
)
def test_wrong_answers_fail_with_a_reason(answer, reason):
    verdict = validate(answer, NUMBERS, TARGET)
    assert not verdict.passed
    assert reason in verdict.reason


def test_division_by_zero_is_a_failure_with_its_reason():
    verdict = validate("3 / (5 - 5) + 2", (3, 5, 5, 2), 16)
    assert not verdict.passed and "division by zero" in verdict.reason


def test_exact_arithmetic_with_fractions():
    value, used = evaluate("7 / 2 * 2")
    assert value == 7 and used == [7, 2, 2]
    assert validate("(1 + 1 / 3) * 3", (1, 1, 3, 3), 4).passed  # 4/3 * 3 is exactly 4
    assert not validate("10 / 3 * 3", (10, 3, 3), 9).passed


def test_extract_expression_prefers_the_side_with_operators():
    assert extract_expression("16 = (3 + 5) * 2") == "(3 + 5) * 2"
    assert extract_expression("Thinking...\n(3 + 5) * 2 = 16") == "(3 + 5) * 2"


def test_make_problem_prompt_and_validator():
    problem = countdown.make_problem([4, 6, 1], 25)
    assert "4, 6, 1" in problem.prompt and "25" in problem.prompt
    assert problem.validate("4 * 6 + 1").passed
    assert not problem.validate("4 * 6 - 1").passed


@pytest.mark.parametrize("count", countdown.LEVELS)
def test_a_level_has_exactly_its_count_of_numbers(count):
    train = load_task(f"countdown:{count}", split="train", n=40, seed=1)
    test = load_task(f"countdown:{count}", split="test", n=40, seed=1)
    assert len(train) == len(test) == 40
    assert {p.id for p in train}.isdisjoint(p.id for p in test)
    for problem in train + test:
        numbers = problem.id.split("->")[0].split(",")
        assert len(numbers) == count and problem.task == f"countdown:{count}"
    assert [p.id for p in load_task(f"countdown:{count}", split="test", n=40, seed=1)] == [p.id for p in test]


def test_a_small_level_runs_out_and_returns_all_it_has():
    every = load_task("countdown:2", split="test", n=10_000)
    assert len(every) == len({p.id for p in every}) == 186  # all two-number problems with a test hash
    assert len(load_task("countdown:2", split="test", n=50)) == 50


def test_the_mix_and_unknown_levels():
    sizes = {len(p.id.split("->")[0].split(",")) for p in load_task("countdown", split="test", n=60)}
    assert sizes == {3, 4, 5}
    for name in ("countdown:7", "countdown:1", "countdown:x"):
        with pytest.raises(ValueError, match="unknown task"):
            load_task(name)
    with pytest.raises(ValueError, match="2 to 5 numbers"):
        countdown.load(count=6)

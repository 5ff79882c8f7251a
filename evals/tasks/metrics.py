"""Accuracy of the self-correction loop with confidence intervals: Wilson score intervals for the
accuracies (exact enough at 0 of n or n of n, where a bootstrap collapses to a point), a paired
bootstrap for the gain (the same episodes' first and final verdicts)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from statistics import mean, median
from typing import Any


def bootstrap_ci(
    values: Sequence[float], *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampling the episodes with replacement)."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    low = means[int((1 - level) / 2 * (n_boot - 1))]
    high = means[int((1 + level) / 2 * (n_boot - 1))]
    return (low, high)


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    z = {0.95: 1.959964, 0.9: 1.644854, 0.99: 2.575829}[level]
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, center - half), min(1.0, center + half))


def summarize(results: Sequence[Any], *, seed: int = 0) -> dict:
    """First-try and final (after retries) accuracy with 95% Wilson intervals, their difference with a
    95% paired bootstrap interval, and the mean reflection length in tokens. `results`:
    EpisodeResult-like objects."""
    first = [float(r.passed_first) for r in results]
    final = [float(r.passed_final) for r in results]
    lengths = [x["n_tokens"] for r in results for x in r.reflections]
    rewards = [v for r in results for v in r.rewards]
    gains = [b - a for a, b in zip(first, final, strict=True)]
    retried = [float(r.passed_final) for r in results if not r.passed_first]
    return {
        "n": len(results),
        "first_try_acc": mean(first) if first else 0.0,
        "first_try_ci95": list(wilson_ci(int(sum(first)), len(first))),
        "second_try_acc": mean(final) if final else 0.0,
        "second_try_ci95": list(wilson_ci(int(sum(final)), len(final))),
        "gain": mean(gains) if gains else 0.0,
        "gain_ci95": list(bootstrap_ci(gains, seed=seed)),
        "mean_reflection_tokens": mean(lengths) if lengths else 0.0,
        "n_reflections": len(lengths),
        "reflection_success_rate": mean(rewards) if rewards else 0.0,
        # the retries alone: how often a failed first try ended right (where reflections differ)
        "n_failed_first": len(retried),
        "retry_acc": mean(retried) if retried else 0.0,
        "retry_ci95": list(wilson_ci(int(sum(retried)), len(retried))),
        **_regrets(results),
    }


def _regrets(results: Sequence[Any]) -> dict:
    """Mean and median cost of the first and the final answers, for tasks whose verdicts measure one
    (the decisions task's regret); nothing for the others."""
    first = [r.attempts[0].get("cost") for r in results]
    final = [r.attempts[-1].get("cost") for r in results]
    if not results or any(c is None for c in first + final):
        return {}
    return {
        "regret_first_mean": mean(first),
        "regret_first_median": median(first),
        "regret_final_mean": mean(final),
        "regret_final_median": median(final),
    }

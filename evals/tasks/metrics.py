"""Accuracy of the self-correction loop with confidence intervals: Wilson score intervals for the
accuracies (exact enough at 0 of n or n of n, where a bootstrap collapses to a point), a paired
bootstrap for the gain (the same episodes' first and final verdicts)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from statistics import mean
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
    }

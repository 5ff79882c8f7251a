"""Accuracy of the self-correction loop with bootstrap confidence intervals."""

from __future__ import annotations

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


def summarize(results: Sequence[Any], *, seed: int = 0) -> dict:
    """First-try and final (after retries) accuracy, their difference, each with a 95% bootstrap
    interval, and the mean reflection length in tokens. `results`: EpisodeResult-like objects."""
    first = [float(r.passed_first) for r in results]
    final = [float(r.passed_final) for r in results]
    lengths = [x["n_tokens"] for r in results for x in r.reflections]
    rewards = [v for r in results for v in r.rewards]
    gains = [b - a for a, b in zip(first, final, strict=True)]
    return {
        "n": len(results),
        "first_try_acc": mean(first) if first else 0.0,
        "first_try_ci95": list(bootstrap_ci(first, seed=seed)),
        "second_try_acc": mean(final) if final else 0.0,
        "second_try_ci95": list(bootstrap_ci(final, seed=seed)),
        "gain": mean(gains) if gains else 0.0,
        "gain_ci95": list(bootstrap_ci(gains, seed=seed)),
        "mean_reflection_tokens": mean(lengths) if lengths else 0.0,
        "n_reflections": len(lengths),
        "reflection_success_rate": mean(rewards) if rewards else 0.0,
    }

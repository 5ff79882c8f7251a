"""The intervals reported for the self-correction loop's accuracies."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from selfsteer.evals.tasks.metrics import summarize, wilson_ci


def test_wilson_interval_is_not_a_point_at_zero_or_all():
    low, high = wilson_ci(0, 74)
    assert low == 0.0 and high == pytest.approx(0.0493, abs=1e-4)  # the "rule of three" region, not [0, 0]
    low, high = wilson_ci(74, 74)
    assert high == pytest.approx(1.0) and low == pytest.approx(1 - 0.0493, abs=1e-4)
    low, high = wilson_ci(29, 74)  # textbook value for 29/74: [0.289, 0.506]
    assert (round(low, 3), round(high, 3)) == (0.289, 0.506)
    assert wilson_ci(50, 100)[1] - wilson_ci(50, 100)[0] > wilson_ci(500, 1000)[1] - wilson_ci(500, 1000)[0]


def test_summary_pairs_the_gain_and_bounds_each_accuracy():
    def episode(first, final, reflection_tokens=(), costs=(None, None)):
        return SimpleNamespace(
            passed_first=first,
            passed_final=final,
            rewards=[float(final)] * len(reflection_tokens),
            reflections=[{"n_tokens": n} for n in reflection_tokens],
            attempts=[{"cost": costs[0]}] + [{"cost": costs[1]}] * len(reflection_tokens),
        )

    results = [episode(True, True)] * 3 + [episode(False, True, [10])] * 2 + [episode(False, False, [20])] * 5
    summary = summarize(results)
    assert (summary["n"], summary["first_try_acc"], summary["second_try_acc"]) == (10, 0.3, 0.5)
    assert summary["first_try_ci95"] == list(wilson_ci(3, 10))
    assert summary["gain"] == pytest.approx(0.2) and summary["gain_ci95"][0] >= 0.0
    assert summary["mean_reflection_tokens"] == pytest.approx((2 * 10 + 5 * 20) / 7)
    assert summary["reflection_success_rate"] == pytest.approx(2 / 7)
    assert (summary["n_failed_first"], summary["retry_acc"]) == (7, pytest.approx(2 / 7))
    assert "regret_first_mean" not in summary  # a task whose verdicts measure no cost

    # The decisions task's verdicts carry a cost (the regret): before and after the retry.
    results = [episode(True, True, (), (0.0, 0.0))] * 2 + [episode(False, True, [8], (0.3, 0.0))] * 3
    results += [episode(False, False, [8], (0.2, 0.5))]
    summary = summarize(results)
    assert summary["regret_first_mean"] == pytest.approx((3 * 0.3 + 0.2) / 6)
    assert summary["regret_final_mean"] == pytest.approx(0.5 / 6)
    assert (summary["regret_first_median"], summary["regret_final_median"]) == (pytest.approx(0.25), 0.0)

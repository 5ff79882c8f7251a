"""How well self-correction's check (agents/self_correct.py) tells bad decisions from good ones, on
counterfactual decision data: at each decision point the run was forked into double, halve and keep
from the same state, so for every double or halve we know whether it ended worse than keep.

For each rule (an expectation and a margin) it prints how many of the double/halve decisions the rule
fails, the precision (a failed decision did end worse than keep, by the data's noise margin), the
recall, and how much of the loss that bad decisions added the failed ones carry.

    python -m selfsteer.evals.check_calibration                 # the shipped dev data (cf-r0dev)
    python -m selfsteer.evals.check_calibration --data runs/cf  # your own `selfsteer decisions collect`
"""

from __future__ import annotations

import argparse
import math
import tarfile
import tempfile
from pathlib import Path

from selfsteer.agents.counterfactual_rows import CounterfactualRow
from selfsteer.agents.intervener_data import noise_margin, observation_of, read_rows
from selfsteer.trainer_bridge.records import ACTIONS

SHIPPED = Path(__file__).resolve().parents[1] / "agents" / "intervener" / "counterfactual.tar.gz"


def decision_points(rows: list[CounterfactualRow]) -> list[tuple[float, float, dict]]:
    """(eval loss at the decision, its change per step over the interval before, outcomes by action)
    for rows with two finite evaluations before the decision and a finite keep branch."""
    points = []
    for row in rows:
        evals = observation_of(row).eval_loss
        if len(evals) < 2:
            continue
        (s0, v0), (s1, v1) = evals[-2], evals[-1]
        outcomes = row.losses()
        if math.isfinite(v0) and math.isfinite(v1) and math.isfinite(outcomes["keep"]):
            points.append((v1, (v1 - v0) / (s1 - s0) * row.horizon, outcomes))
    return points


def score(points, trend: float, margin: float, noise: float) -> dict:
    """The rule: a decision fails when the loss after it exceeds (loss + trend * change over the last
    interval, carried over the horizon) * (1 + margin)."""
    flagged = worse = hits = 0
    harm = caught = 0.0
    for loss, change, outcomes in points:
        expected = loss + trend * change
        for action in (a for a in ACTIONS if a != "keep"):
            after = outcomes[action]
            bad = not after <= outcomes["keep"] * (1 + noise)
            fails = not after <= expected * (1 + margin)
            added = max(0.0, min(after, 10 * loss) - outcomes["keep"]) / loss  # capped: a NaN run counts 10x
            worse += bad
            flagged += fails
            hits += bad and fails
            harm += added
            caught += added if fails else 0.0
    decisions = 2 * len(points)
    return {
        "failed": flagged / decisions,
        "precision": hits / flagged if flagged else math.nan,
        "recall": hits / worse if worse else math.nan,
        "harm_caught": caught / harm if harm else math.nan,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", nargs="*", help="collected folders (default: the shipped cf-r0dev rows)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            rows = read_rows(args.data)
        else:
            with tarfile.open(SHIPPED) as tar:
                tar.extractall(tmp, filter="data")
            rows = read_rows([Path(tmp) / "cf-r0dev"])
    noise = noise_margin(rows)
    points = decision_points(rows)
    print(
        f"{len(rows)} rows, {len(points)} with an eval trend ({2 * len(points)} double/halve decisions); "
        f"noise margin {noise:.2%}"
    )
    print("| expectation | margin | failed | precision | recall | harm caught |")
    print("| --- | --- | --- | --- | --- | --- |")
    for trend, name in ((0.0, "no rise"), (0.5, "half the trend"), (1.0, "the trend")):
        for margin in (0.0, 0.01, 0.02, 0.05):
            s = score(points, trend, margin, noise)
            print(
                f"| {name} | {margin:.0%} | {s['failed']:.1%} | {s['precision']:.3f} | {s['recall']:.3f} | "
                f"{s['harm_caught']:.1%} |"
            )


if __name__ == "__main__":
    main()

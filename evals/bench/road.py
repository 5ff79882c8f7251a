"""Benchmark: what a supervisor's road into its run costs, per decision.

The same supervised run three ways, in one process, the order rotated each round: no supervisor (the
baseline), the supervisor over HTTP (`BridgeClient(url)`: the road every supervisor took before the
steering core), and in process (`LocalRunControl`: direct calls, change notices instead of polling).
The run is the tiny recipe held while deciding (`hold_for_supervisor`, `pause_while_deciding`), under
the rule supervisor (no model: the road is all that differs). Counted for each: the HTTP requests made
in the process (every `httpx.Client.send`), the SQLite transactions of the run's store, decisions, and
the wall time of the run. Per decision: requests / decisions, and the transactions above the baseline
run's / decisions.

    python -m selfsteer.evals.bench.road [--steps 120] [--eval-steps 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import httpx

from selfsteer.agents.registry import make_supervisor
from selfsteer.graphs.supervise import run_supervision
from selfsteer.trainer_bridge.recipe import load_recipe
from selfsteer.trainer_bridge.runner import RecipeRun

ROADS = ("none", "http", "local")


class RequestCounter:
    """Counts every request an httpx.Client sends in this process, while installed."""

    def __init__(self) -> None:
        self.count = 0
        self._send = httpx.Client.send

    def __enter__(self) -> RequestCounter:
        counter, original = self, self._send

        def send(client, request, **kwargs):
            counter.count += 1
            return original(client, request, **kwargs)

        httpx.Client.send = send
        return self

    def __exit__(self, *exc_info) -> None:
        httpx.Client.send = self._send


def one_run(road: str, out: Path, steps: int, eval_steps: int) -> dict:
    supervisor = make_supervisor("rule")
    db = out / "runs.sqlite"

    def supervise(control, stop):
        # The HTTP road is the same supervisor given the run's URL instead of the in-process control.
        run = control.url if road == "http" else control
        run_supervision(
            run, supervisor, db=str(out / "graph.sqlite"), stop_event=stop, pause_while_deciding=True
        )

    recipe = load_recipe("tiny", [f"training.max_steps={steps}", f"training.eval_steps={eval_steps}"])
    with RequestCounter() as requests:
        run = RecipeRun(
            recipe,
            out_dir=out / "run",
            db=db,
            port=0,
            supervisor=None if road == "none" else supervise,
            hold_for_supervisor=road != "none",
        )
        try:
            summary = run.train()
            transactions = run.bridge.store.transactions
        finally:
            run.close()
    return {
        "road": road,
        "decisions": len(summary["decisions"]),
        "requests": requests.count,
        "transactions": transactions,
        "wall_s": summary["wall_s"],
        "final_eval_loss": summary["final_eval_loss"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = ROADS[round_ % 3 :] + ROADS[: round_ % 3]
            for road in order:
                row = one_run(road, Path(tmp) / f"{round_}-{road}", args.steps, args.eval_steps)
                rows.append(row)
                print(f"round {round_} {road:5s}: {row}", flush=True)
    median = {
        road: {k: statistics.median(r[k] for r in rows if r["road"] == road) for k in rows[0] if k != "road"}
        for road in ROADS
    }
    base = median["none"]["transactions"]
    print(f"\n{args.rounds} rounds, tiny recipe, {args.steps} steps, eval every {args.eval_steps}; medians:")
    print(
        "| road | decisions | HTTP requests | per decision | SQLite transactions | above baseline per decision | wall s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for road in ROADS:
        m = median[road]
        per = m["requests"] / m["decisions"] if m["decisions"] else 0
        extra = (m["transactions"] - base) / m["decisions"] if m["decisions"] else 0
        print(
            f"| {road} | {m['decisions']:.0f} | {m['requests']:.0f} | {per:.1f} | {m['transactions']:.0f} | {extra:.1f} | {m['wall_s']:.2f} |"
        )
    if median["http"]["wall_s"]:
        print(f"\nwall time local / http: {median['local']['wall_s'] / median['http']['wall_s']:.3f}")


if __name__ == "__main__":
    main()

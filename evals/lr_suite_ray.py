"""The lr-suite's runs as Ray Tune trials (evals/ray_trials.py): one trial per cell, run on this machine's Ray (started here)
or on any Ray cluster (`ray_address`, or $RAY_ADDRESS).

Tune schedules the trials (`cpus_per_trial` each, at most `max_concurrent` at once), retries a failed
one (`FailureConfig(max_failures=retries)`) and reports a trial that still fails, which the suite writes
as a failed row. Each finished trial's row reaches the driver as its result and is written to
results.jsonl at once (`record`). An interrupted suite, run again, runs the cells results.jsonl does not
hold: by Tune's experiment restore of OUT/ray/suite when those are the trials it left unfinished, else
(the grid changed) as a new experiment (evals/ray_trials.py `fit`).

Every trial writes to OUT/suite.sqlite: safe for processes on one machine; on a multi-machine cluster
OUT must be on a filesystem every node shares.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ray import tune

from selfsteer.evals.lr_suite import Cell, SuiteConfig, append_result, failed_row, run_cell, suite_chat_model
from selfsteer.evals.ray_trials import ray_options, run_trials, set_trial_threads


def trial(params: dict, config: SuiteConfig, out: str) -> None:
    """One cell, in a Ray worker process."""
    set_trial_threads(config.cpus_per_trial)
    # A chat model of its own per trial process.
    chat_model = suite_chat_model(config) if params["item"]["supervisor"].startswith("llm:") else None
    out = Path(out)
    row = run_cell(Cell(**params["item"]), config, out, out / "suite.sqlite", chat_model)
    tune.report({"row": row})


def run_on_ray(cells: list[Cell], config: SuiteConfig, out: Path) -> None:
    """Run `cells` as Tune trials; each one's row (or its failure, after the retries, with its trial
    folder: its error.txt holds the tracebacks) is appended to OUT/results.jsonl as it finishes."""
    results = out / "results.jsonl"

    def fail(item: dict, error: str, attempts: int, trial_dir: str) -> None:
        append_result(results, {**failed_row(Cell(**item), error, attempts), "trial_dir": trial_dir})

    run_trials(
        [asdict(c) for c in cells],
        trial,
        record=lambda result: append_result(results, result["row"]),
        fail=fail,
        item_id=lambda item: Cell(**item).id,
        storage=out / "ray",
        name="suite",
        progress_desc="lr-suite (ray)",
        **ray_options(config),
        config=config,
        out=str(out.resolve()),
    )

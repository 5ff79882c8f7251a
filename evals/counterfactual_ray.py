"""Counterfactual collection runs as Ray Tune trials (evals/ray_trials.py): one trial per run spec, on
this machine's Ray or on any Ray cluster. A trial runs in another process, maybe on another machine: it
reports the run's rows (as their JSON lines) with its summary, and the driver writes both (rows first,
then the summary, which marks the run done), so OUT needs no filesystem shared with the workers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ray import tune

from selfsteer.agents.counterfactual_rows import CounterfactualRow
from selfsteer.evals.counterfactual import RunSpec, collect_run
from selfsteer.evals.ray_trials import ray_options, run_trials, set_trial_threads


def trial(params: dict, threads: float) -> None:
    """One collection run, in a Ray worker process (torch threads: the trial's CPUs)."""
    set_trial_threads(threads)
    rows: list[CounterfactualRow] = []
    summary = collect_run(RunSpec(**params["item"]), on_row=rows.append)
    tune.report({"summary": summary, "rows": [row.to_json() for row in rows]})


def collect_on_ray(
    specs: list[RunSpec],
    config,
    write_rows: Callable[[list[CounterfactualRow]], None],
    finished: Callable[[dict], None],
    failed: Callable[..., None],
) -> None:
    """Collect `specs` as Tune trials: each finished run's rows, then its summary, handed to `write_rows`
    and `finished` in the driver as it comes; a run still failing after the retries to `failed`.
    config: the collection's `CollectConfig` (evals/collect.py: `out` and the Ray options)."""

    def record(result: dict) -> None:
        write_rows([CounterfactualRow.from_json(line) for line in result["rows"]])
        finished(result["summary"])

    def fail(item: dict, error: str, attempts: int, trial_dir: str) -> None:
        failed(RunSpec(**item), error, attempts, trial_dir=trial_dir)  # its error.txt: the tracebacks

    run_trials(
        [s.to_dict() for s in specs],
        trial,
        record=record,
        fail=fail,
        item_id=lambda item: RunSpec(**item).id,
        storage=Path(config.out) / "ray",
        name="collect",
        progress_desc="counterfactual runs (ray)",
        **ray_options(config),
        threads=config.cpus_per_trial,
    )

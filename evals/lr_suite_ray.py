"""The lr-suite's runs as Ray Tune trials: one trial per cell, run on this machine's Ray (started here)
or on any Ray cluster (`ray_address`, or $RAY_ADDRESS).

Tune schedules the trials (`cpus_per_trial` each, at most `max_concurrent` at once), retries a failed
one (`FailureConfig(max_failures=retries)`) and reports a trial that still fails, which the suite writes
as a failed row. Each finished trial's row reaches the driver as its result and is written to
results.jsonl at once (`record`), so an interrupted suite resumes as the sequential one does: the cells
already in results.jsonl are not run again. (Tune's experiment restore would give the same: a trial has
no checkpoint to resume from, an unfinished run starts afresh; and the skip also holds when the grid has
changed between the two calls.) The Tune experiment lives under OUT/ray.

Every trial writes to OUT/suite.sqlite: safe for processes on one machine; on a multi-machine cluster
OUT must be on a filesystem every node shares.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

from ray import tune
from tqdm.auto import tqdm

from selfsteer.evals.lr_suite import Cell, SuiteConfig, append_result, failed_row, run_cell


def trial(params: dict, config: SuiteConfig, out: str) -> None:
    """One cell, in a Ray worker process."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(max(1, int(config.cpus_per_trial)))
    chat_model = None
    if params["cell"]["supervisor"].startswith("llm:"):  # a chat model of its own per trial process
        from selfsteer.agents.chat_models import make_chat_model

        extra = {"field_max_chars": config.explanation_chars} if config.llm == "local" else {}
        chat_model = make_chat_model(config.llm, base_url=config.base_url, api_key=config.api_key, **extra)
    out = Path(out)
    row = run_cell(Cell(**params["cell"]), config, out, out / "suite.sqlite", chat_model)
    tune.report({"row": row})


def start_ray(config: SuiteConfig) -> bool:
    """Connect to the cluster at `ray_address` or $RAY_ADDRESS, else start Ray here. True when this call
    started it (so it is the one to shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=config.ray_cpus, include_dashboard=False)
    return True


class Recorder(tune.Callback):
    """In the driver: each trial's row (or its failure, after the retries) appended to results.jsonl as
    it comes, and a bar over the finished trials."""

    def __init__(self, results: Path, total: int):
        self.results, self.total, self.bar = results, total, None

    def setup(self, **info):
        self.bar = tqdm(total=self.total, desc="lr-suite (ray)", unit="run")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        append_result(self.results, result["row"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.bar.update()

    def on_trial_error(self, iteration, trials, trial, **info):
        # The error file on this machine (`get_error` reads the experiment's copy, which may lag behind).
        error = Path(trial.error_file).read_text().strip().splitlines() if trial.error_file else []
        row = failed_row(Cell(**trial.config["cell"]), error[-1] if error else "", trial.num_failures)
        append_result(self.results, {**row, "trial_dir": trial.path})  # its error.txt: the tracebacks
        self.bar.update()

    def __getstate__(self):  # Tune saves its experiment state with the callbacks in it; no bar there
        return {**self.__dict__, "bar": None}


def run_on_ray(cells: list[Cell], config: SuiteConfig, out: Path) -> None:
    """Run `cells` as Tune trials; each one's row is appended to OUT/results.jsonl as it finishes."""
    import ray

    # Tune's own CSV/JSON/TensorBoard loggers: results.jsonl is the record (and lists upset TensorBoard's).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    recorder = Recorder(out / "results.jsonl", len(cells))
    started = start_ray(config)
    try:
        tuner = tune.Tuner(
            tune.with_resources(
                tune.with_parameters(trial, config=config, out=str(out.resolve())),
                {"cpu": config.cpus_per_trial},
            ),
            param_space={"cell": tune.grid_search([asdict(c) for c in cells])},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=config.max_concurrent,
                reuse_actors=True,  # a worker runs trial after trial: torch and transformers imported once
                trial_name_creator=lambda t: Cell(**t.config["cell"]).id,
                trial_dirname_creator=lambda t: Cell(**t.config["cell"]).id,
            ),
            run_config=tune.RunConfig(
                name=time.strftime("suite-%Y%m%d-%H%M%S"),
                storage_path=str((out / "ray").resolve()),
                failure_config=tune.FailureConfig(max_failures=config.retries),
                callbacks=[recorder],
                verbose=0,  # the bar is the progress
            ),
        )
        tuner.fit()
    finally:
        if recorder.bar is not None:
            recorder.bar.close()
        if started:
            ray.shutdown()

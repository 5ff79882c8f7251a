"""Many runs as Ray Tune trials, for the lr-suite (evals/lr_suite_ray.py) and counterfactual collection
(evals/counterfactual_ray.py): one trial per item, on this machine's Ray (started here) or on any Ray
cluster (`address`, or $RAY_ADDRESS).

Tune schedules the trials (`cpus_per_trial` each, at most `max_concurrent` at once), retries a failed one
(`FailureConfig(max_failures=retries)`) and reports one that still fails. Each trial's result reaches the
driver as it finishes and is written there at once (`record`; a failure after its retries: `fail`), so
an interrupted batch resumes by skipping what its files already hold. (Tune's experiment restore would
give the same: a trial has no checkpoint to resume from, an unfinished run starts afresh; and the skip
also holds when the items changed between the two calls.) The Tune experiment lives under `storage`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ray import tune
from tqdm.auto import tqdm


def start_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to the cluster at `address` or $RAY_ADDRESS, else start Ray here (`num_cpus`, default all).
    True when this call started it (so it is the one to shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    return True


class Recorder(tune.Callback):
    """In the driver: each trial's result handed to `record(result, trial)` as it comes (a failure, after
    the retries, to `fail(trial, error)`), and a bar over the finished trials."""

    def __init__(self, record: Callable, fail: Callable, total: int, desc: str):
        self.record, self.fail, self.total, self.desc, self.bar = record, fail, total, desc, None

    def setup(self, **info):
        self.bar = tqdm(total=self.total, desc=self.desc, unit="run")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.record(result, trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.bar.update()

    def on_trial_error(self, iteration, trials, trial, **info):
        # The error file on this machine (`get_error` reads the experiment's copy, which may lag behind).
        error = Path(trial.error_file).read_text().strip().splitlines() if trial.error_file else []
        self.fail(trial, error[-1] if error else "")
        self.bar.update()

    def __getstate__(self):  # Tune saves its experiment state with the callbacks in it: no bar, no closures
        return {**self.__dict__, "bar": None, "record": None, "fail": None}


def run_trials(
    items: list[dict],
    trial_fn: Callable,
    record: Callable[[dict], None],
    fail: Callable[[dict, str, int, str], None],
    *,
    item_id: Callable[[dict], str],
    **options,
) -> None:
    """Run `trial_fn(params, **trial_params)` once per item (`params["item"]`, a JSON-able dict) as Tune
    trials named `item_id(item)`; each reported result goes to `record` in the driver as it comes, each
    trial still failing after `retries` to `fail(item, error, attempts, trial_dir)`. `options`: those of
    `fit`."""
    if not items:
        return
    fit(
        trial_fn,
        {"item": tune.grid_search(items)},
        record=lambda result, trial: record(result),
        fail=lambda trial, error: fail(trial.config["item"], error, trial.num_failures, trial.path),
        trial_name=lambda config: item_id(config["item"]),
        total=len(items),
        **options,
    )


def fit(
    trainable: Callable | type,
    param_space: dict,
    record: Callable,
    fail: Callable,
    *,
    trial_name: Callable[[dict], str],
    total: int,
    storage: Path,
    name: str,
    progress_desc: str,
    scheduler=None,
    metric: str | None = None,
    mode: str | None = None,
    cpus_per_trial: float = 1,
    max_concurrent: int | None = None,
    retries: int = 1,
    address: str | None = None,
    num_cpus: int | None = None,
    **trial_params,
) -> None:
    """One Tune experiment: `trainable` (a function, or a `tune.Trainable`, given `trial_params`) over
    `param_space`, its trials named `trial_name(initial config)`, under `scheduler` if any; results and
    failures to `record(result, trial)` and `fail(trial, error)` in the driver (see `Recorder`)."""
    import ray

    # Tune's own CSV/JSON/TensorBoard loggers: our files are the record (and lists upset TensorBoard's).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # ...whose absence its end-of-run analysis then warns about, trial by trial.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    recorder = Recorder(record, fail, total, progress_desc)
    started = start_ray(address, num_cpus)
    try:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trainable, **trial_params), {"cpu": cpus_per_trial}),
            param_space=param_space,
            tune_config=tune.TuneConfig(
                scheduler=scheduler,
                metric=metric,
                mode=mode,
                max_concurrent_trials=max_concurrent,
                reuse_actors=True,  # a worker runs trial after trial: torch and transformers imported once
                trial_name_creator=lambda t: trial_name(t.config),
                trial_dirname_creator=lambda t: trial_name(t.config),
            ),
            run_config=tune.RunConfig(
                name=time.strftime(f"{name}-%Y%m%d-%H%M%S"),
                storage_path=str(Path(storage).resolve()),
                failure_config=tune.FailureConfig(max_failures=retries),
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


def ray_options(config) -> dict:
    """run_trials' scheduling options from a config with the fields the CLI's Ray group sets (ray_address,
    ray_cpus, cpus_per_trial, max_concurrent) and retries."""
    return {
        "address": config.ray_address,
        "num_cpus": config.ray_cpus,
        "cpus_per_trial": config.cpus_per_trial,
        "max_concurrent": config.max_concurrent,
        "retries": config.retries,
    }


def set_trial_threads(cpus_per_trial: float) -> None:
    """In a trial's process: torch threads = the trial's CPUs; transformers' warnings quiet."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(max(1, int(cpus_per_trial)))

"""Many runs as Ray Tune trials, for the lr-suite (evals/lr_suite_ray.py) and counterfactual collection
(evals/counterfactual_ray.py): one trial per item, on this machine's Ray (started here) or on any Ray
cluster (`address`, or $RAY_ADDRESS).

Tune schedules the trials (`cpus_per_trial` each, at most `max_concurrent` at once), retries a failed one
(`FailureConfig(max_failures=retries)`) and reports one that still fails. Each trial's result reaches the
driver as it finishes and is written there at once (`record`; a failure after its retries: `fail`). An
interrupted batch, called again with what its files do not hold yet, is Tune's experiment restore when
those are exactly the trials the saved experiment left unfinished (trials with a checkpoint, such as
PBT's members, go on from it); otherwise (the items changed between the two calls) a new experiment runs
them. The Tune experiment lives in STORAGE/NAME.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ray import tune
from ray.tune.search import BasicVariantGenerator
from tqdm.auto import tqdm

log = logging.getLogger(__name__)
# Imports a process may not need (torch, transformers, Ray's internals) stay in the functions that need
# them: every Ray worker process pays this module's top-level imports.


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


class KeepActorsWhileTrialsLive(BasicVariantGenerator):
    """Tune's default search, finished only once every trial it made has ended. Tune keeps a stopped trial's
    actor for reuse only while the search is unfinished, and the default search is finished as soon as it
    has made its last trial: each pause of a synchronous PBT population then ended the members' worker
    processes, and every one that went on paid for a new process and its imports (about 10 s here, a
    population's useful compute being about as much)."""

    def is_finished(self) -> bool:
        return super().is_finished() and not self._live_trials


# The driver's record/fail functions, by experiment folder: a Recorder restored from Tune's saved state
# (which cannot hold closures) finds the ones of the call that restored it here.
_SINKS: dict[str, tuple[Callable, Callable, tqdm | None]] = {}


class Recorder(tune.Callback):
    """In the driver: each trial's result handed to `record(result, trial)` as it comes (a failure, after
    the retries, to `fail(trial, error)`), and a bar over the finished trials."""

    def __init__(self, experiment: str):
        self.experiment = experiment

    def _sink(self):
        sink = _SINKS.get(self.experiment)
        if sink is not None:
            return sink
        if len(_SINKS) == 1:
            # Restored from an experiment whose folder has moved since: the one experiment running now.
            ((folder, sink),) = _SINKS.items()
            if not getattr(self, "_told", False):
                self._told = True
                log.warning(
                    "ray_trials: no experiment at %s; results go to the one at %s", self.experiment, folder
                )
            return sink
        # None, or several, running: a result handed to a guess could land in another experiment's files.
        raise RuntimeError(
            f"ray_trials: no experiment at {self.experiment} to hand this trial's result to "
            f"({len(_SINKS)} running: {', '.join(_SINKS) or 'none'})"
        )

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._sink()[0](result, trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._sink()[2].update()

    def on_trial_error(self, iteration, trials, trial, **info):
        # The error file on this machine (`get_error` reads the experiment's copy, which may lag behind).
        error = Path(trial.error_file).read_text().strip().splitlines() if trial.error_file else []
        self._sink()[1](trial, error[-1] if error else "")
        self._sink()[2].update()


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
        names=[item_id(item) for item in items],
        **options,
    )


def fit(
    trainable: Callable | type,
    param_space: dict,
    record: Callable,
    fail: Callable,
    *,
    trial_name: Callable[[dict], str],
    names: list[str],
    unfinished: list[str] | None = None,
    storage: Path,
    name: str,
    progress_desc: str,
    scheduler=None,
    keep_checkpoints: int | None = None,
    metric: str | None = None,
    mode: str | None = None,
    cpus_per_trial: float = 1,
    max_concurrent: int | None = None,
    retries: int = 1,
    address: str | None = None,
    num_cpus: int | None = None,
    **trial_params,
) -> None:
    """One Tune experiment in STORAGE/NAME: `trainable` (a function, or a `tune.Trainable`, given
    `trial_params`) over `param_space`, its trials named `trial_name(initial config)` (`names`: all of
    them), under `scheduler` if any, keeping each trial's latest `keep_checkpoints` (None: all); results
    and failures to `record(result, trial)` and `fail(trial, error)` in the driver.

    When STORAGE/NAME holds an interrupted experiment whose unfinished trials are exactly `unfinished`
    (default: `names`), it is restored (Tune's experiment restore: trials with a checkpoint go on from it,
    the scheduler's state too); any other one there is moved aside (NAME-TIME) and a new one started."""
    import ray

    # Tune's own CSV/JSON/TensorBoard loggers: our files are the record (and lists upset TensorBoard's).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # ...whose absence its end-of-run analysis then warns about, trial by trial.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    folder = Path(storage).resolve() / name
    wanted = set(names if unfinished is None else unfinished)
    restoring = unfinished_trials(folder) == wanted
    if not restoring and folder.exists():
        folder.rename(folder.with_name(time.strftime(f"{name}-%Y%m%d-%H%M%S")))
    total = len(wanted) if restoring else len(names)
    bar = tqdm(total=total, desc=progress_desc + (" (restored)" if restoring else ""), unit="run")
    _SINKS[str(folder)] = (record, fail, bar)
    started = start_ray(address, num_cpus)
    try:
        wrapped = tune.with_resources(
            tune.with_parameters(trainable, **trial_params), {"cpu": cpus_per_trial}
        )
        if restoring:
            tuner = tune.Tuner.restore(str(folder), wrapped, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                wrapped,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    scheduler=scheduler,
                    metric=metric,
                    mode=mode,
                    search_alg=KeepActorsWhileTrialsLive(max_concurrent=max_concurrent or 0),
                    reuse_actors=True,  # a worker runs trial after trial: torch and transformers imported once
                    trial_name_creator=lambda t: trial_name(t.config),
                    trial_dirname_creator=lambda t: trial_name(t.config),
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=str(folder.parent),
                    failure_config=tune.FailureConfig(max_failures=retries),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=keep_checkpoints),
                    callbacks=[Recorder(str(folder))],
                    verbose=0,  # the bar is the progress
                ),
            )
        tuner.fit()
        # Tune ends a run on Ctrl+C with its state saved, and returns: the caller stops here too.
        left = [
            n
            for n, status in (trial_statuses(folder) or {}).items()
            if status in ("PENDING", "RUNNING", "PAUSED")
        ]
        if left:
            raise KeyboardInterrupt(f"interrupted with {len(left)} trials unfinished; run again to go on")
    finally:
        bar.close()
        _SINKS.pop(str(folder), None)
        if started:
            ray.shutdown()


def trial_statuses(folder: Path) -> dict[str, str] | None:
    """Trial name -> Tune status (TERMINATED, ERROR, PAUSED, ...) of the experiment saved in `folder`
    (None: no experiment Tune can restore there)."""
    if not tune.Tuner.can_restore(str(folder)):
        return None
    from ray.tune import ExperimentAnalysis

    try:
        return {str(t): t.status for t in ExperimentAnalysis(str(folder)).trials}
    except Exception as error:  # unreadable state: not one to restore
        log.warning("ray_trials: cannot read the experiment in %s (%r): not restored", folder, error)
        return None


def unfinished_trials(folder: Path) -> set[str] | None:
    statuses = trial_statuses(folder)
    return None if statuses is None else {name for name, status in statuses.items() if status != "TERMINATED"}


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

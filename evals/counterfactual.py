"""Counterfactual decision data: what each learning-rate action would have done, from the same state.

A collection run trains a workload (a recipe plus overrides: model shape, optimizer, schedule, batch
size, start lr, seed) with its own small loop. At each decision point (every `eval_steps`) it takes an
in-memory snapshot of everything the future depends on (weights, optimizer and scheduler state, RNG,
the metric history; the data order is a pure function of the step) and runs one branch per action
(double, halve, keep) for a horizon, each from the identical state, recording the eval loss each
reached. A fourth "probe" branch keeps the lr with another data order and dropout seed: the spread
between it and "keep" is the noise of one horizon, from which the label's margin is measured. Then
the behaviour policy's action is taken for real and the run goes on to the next decision point, so a
collection run visits the states its behaviour policy leads to (`--policy intervener`: DAgger rounds).

The live run is exactly a branch: the branch of the behaviour's action is the run itself, so a run
that always keeps, collected, and the same run with no forks give the same losses to the last digit
(tests/test_counterfactual.py).

Why its own loop and not the Trainer: a branch must replay the same batches from the same step, and
the Trainer cannot rewind its data. The loop stands on the steering core for what a fork is: its
snapshots are the core's exact in-memory snapshots (`trainer_bridge.snapshots`, as behind
`save_checkpoint {"memory": true}`), its lr changes the core's `set_lr` (the "scale" semantics of a
live `set_optimizer`). Otherwise it does what the Trainer does (the Trainer builds the optimizer and
scheduler, with its param groups; gradients clipped at max_grad_norm; eval loss the mean over the
eval set). Observations are the supervisor's own `Observation`, built from the same metric
names the Trainer logs, so a prompt rendered here is the prompt a supervisor sees on a live run.

Held-out workloads (HELD_OUT) are refused by construction: no spec with the held-out optimizer, the
held-out model shape, or a start lr of the held-out cells can be collected.

    selfsteer decisions collect --out runs/counterfactual            # the default grid
    selfsteer decisions collect --out runs/cf --policy intervener    # a DAgger round
"""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from selfsteer.agents.observation import Observation
from selfsteer.agents.supervisors import Decision
from selfsteer.trainer_bridge import snapshots
from selfsteer.trainer_bridge.commands import LR_BOUNDS  # the supervision loop's clamp
from selfsteer.trainer_bridge.records import ACTIONS

PROBE = "keep_reseeded"  # the noise probe's branch name

# Model shapes, as recipe overrides. "deep" is held out.
SHAPES: dict[str, tuple[str, list[str]]] = {
    "tiny": ("tiny", []),
    "tiny-wide": ("tiny", ["model.n_embd=64", "model.n_head=4"]),
    "small-narrow": ("small", ["model.n_embd=64", "model.n_head=2", "data.eval_blocks=128"]),
    "small": ("small", ["data.eval_blocks=128"]),
    "deep": ("small", ["model.n_layer=3", "model.n_embd=96", "model.n_head=4", "data.eval_blocks=128"]),
    "deep-narrow": ("small", ["model.n_layer=4", "model.n_embd=64", "model.n_head=4", "data.eval_blocks=128"]),
}
# Optimizers: HF `optim` plus its `optim_args`. RMSprop is held out.
OPTIMIZERS: dict[str, list[str]] = {
    "adamw": ["training.optim=adamw_torch"],
    "sgd": ["training.optim=sgd", "training.optim_args=momentum=0.9"],
    "rmsprop": ["training.optim=rmsprop"],
    "adagrad": ["training.optim=adagrad"],
}
SCHEDULES: dict[str, list[str]] = {
    "constant": ["training.lr_scheduler_type=constant"],
    "warmup_decay": ["training.lr_scheduler_type=linear", "training.warmup_steps=6"],
    "cosine_warmup": ["training.lr_scheduler_type=cosine", "training.warmup_steps=6"],
}
# Where each optimizer learns well on these workloads (measured with static runs), and the start
# multipliers around it: far too low to far too high.
# RMSprop (held out) measured on the held-out shape, 60 steps, eval loss at the end: 1e-5 4.84, 1e-4 3.60,
# 3e-4 3.07, 1e-3 3.39, 3e-3 3.40, 1e-2 3.54, 3e-2 3.67, 0.1 5.97.
GOOD_LR = {"adamw": 1e-2, "sgd": 0.1, "rmsprop": 3e-4}
START_MULTIPLIERS = (1 / 64, 1 / 8, 1, 8, 64)
# Never collected: a model shape, an optimizer, and the start lrs of the held-out cells. The lr-suite's held-out cells
# come from here (evals/lr_suite.py WORKLOADS["deep-rmsprop"]).
HELD_OUT = {"shape": "deep", "optimizer": "rmsprop", "start_lrs": (1e-5, 3e-4, 3e-2)}
# A second held-out workload, defined before issue 25's supervisors were tuned (docs/held-out-workloads.md):
# its shape, optimizer family and schedule are each never collected. Its start lrs are 1/32, 1 and 32
# times the best of a static grid (60 steps, seed 0: 1e-3 4.46, 3e-3 3.63, 1e-2 3.21, 3e-2 3.26,
# 1e-1 3.21, 3e-1 3.38, 1.0 3.46).
HELD_OUT_2 = {
    "shape": "deep-narrow", "optimizer": "adagrad", "schedule": "cosine_warmup",
    "start_lrs": (3.125e-4, 1e-2, 0.32),
}  # fmt: skip


@dataclass(frozen=True)
class RunSpec:
    """One collection run. Everything a run does follows from these fields."""

    shape: str = "tiny"
    optimizer: str = "adamw"
    schedule: str = "constant"
    batch_size: int = 8
    lr: float = 1e-2
    seed: int = 0
    max_steps: int = 60
    eval_steps: int = 10  # a decision point after each evaluation, as the supervision loop does
    horizon: int | None = None  # steps each branch runs (default: to the next decision point)
    policy: str = "random"  # who picks the action the run takes: random | keep | rule | intervener | ...

    def __post_init__(self):
        for name, table in (("shape", SHAPES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in table:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}: one of {', '.join(table)}")
        held = [
            what
            for what, out in (
                ("shape", self.shape in (HELD_OUT["shape"], HELD_OUT_2["shape"])),
                ("optimizer", self.optimizer in (HELD_OUT["optimizer"], HELD_OUT_2["optimizer"])),
                ("schedule", self.schedule == HELD_OUT_2["schedule"]),
                ("start lr", any(math.isclose(self.lr, x, rel_tol=1e-3) for x in HELD_OUT["start_lrs"])),
            )
            if out
        ]
        if held:
            raise ValueError(f"{self.id}: held out for evaluation ({', '.join(held)}); never collected")

    @property
    def id(self) -> str:
        return (
            f"{self.shape}-{self.optimizer}-{self.schedule}-b{self.batch_size}-lr{self.lr:.3g}-s{self.seed}"
            f"-{self.policy.replace(':', '_').replace('/', '_')}"
        )

    @property
    def branch_steps(self) -> int:
        return self.horizon or self.eval_steps

    def recipe(self) -> dict:
        from selfsteer.trainer_bridge.recipe import load_recipe

        base, shape = SHAPES[self.shape]
        return load_recipe(base, recipe_overrides(self, shape))


def recipe_overrides(spec: RunSpec, shape: list[str]) -> list[str]:
    return [
        *shape,
        *OPTIMIZERS[spec.optimizer],
        *SCHEDULES[spec.schedule],
        f"training.per_device_train_batch_size={spec.batch_size}",
        f"training.learning_rate={spec.lr:.6e}",  # YAML reads 1e-05 as text
        f"training.seed={spec.seed}",
        f"training.max_steps={spec.max_steps}",
        f"training.eval_steps={spec.eval_steps}",
        "training.weight_decay=0.01",
    ]


def default_specs(
    seeds: Iterable[int] = (0, 1),
    shapes: Iterable[str] = ("tiny", "tiny-wide", "small-narrow"),
    policy: str = "random",
) -> list[RunSpec]:
    """The default grid: shapes x optimizers x schedules x batch sizes x starts x seeds."""
    specs = []
    for shape, optimizer, schedule, batch, multiplier, seed in itertools.product(
        shapes, ("adamw", "sgd"), ("constant", "warmup_decay"), (8, 16), START_MULTIPLIERS, seeds
    ):
        specs.append(
            RunSpec(
                shape=shape,
                optimizer=optimizer,
                schedule=schedule,
                batch_size=batch,
                lr=min(GOOD_LR[optimizer] * multiplier, LR_BOUNDS[1]),
                seed=seed,
                policy=policy,
            )
        )
    return specs


# -----------------------------------------------------------------------------------------------------
# the loop


@dataclass
class Snapshot:
    """The core's exact in-memory snapshot (weights, optimizer, scheduler, RNG) and the metric history."""

    state: snapshots.Snapshot
    metrics: list[dict]

    @property
    def step(self) -> int:
        return self.state.step


class CounterfactualRun:
    """A workload trained step by step, with snapshots, so that any state can be branched exactly."""

    def __init__(self, spec: RunSpec, data_seed: int | None = None):
        import tempfile

        from transformers import Trainer

        from selfsteer.trainer_bridge.recipe import build_workload

        self.spec = spec
        recipe = spec.recipe()
        self._tmp = tempfile.TemporaryDirectory(prefix="selfsteer-cf-")
        workload = build_workload(recipe, self._tmp.name)  # seeds the initial weights
        self.model, self.args = workload.model, workload.training_args
        self.train_data, self.eval_data = workload.train_dataset.dataset, workload.eval_dataset
        # The Trainer's own optimizer and scheduler (param groups without decay, optim_args, warm-up).
        trainer = Trainer(
            model=self.model, args=self.args, train_dataset=self.train_data, eval_dataset=self.eval_data
        )
        trainer.create_optimizer_and_scheduler(num_training_steps=spec.max_steps)
        self.optimizer, self.scheduler = trainer.optimizer, trainer.lr_scheduler
        self.step = 0
        self.metrics: list[dict] = []  # {step, name, value}, as the Trainer logs them
        self.data_seed = spec.seed if data_seed is None else data_seed
        self._orders: dict[tuple[int, int], torch.Tensor] = {}

    def close(self) -> None:
        self._tmp.cleanup()

    # -- data: the batch of a step depends on (data seed, step) alone -----------------------------------

    def batch(self, step: int, data_seed: int) -> torch.Tensor:
        size, n = self.args.per_device_train_batch_size, len(self.train_data)
        per_epoch = n // size
        epoch, index = divmod(step, per_epoch)
        key = (data_seed, epoch)
        if key not in self._orders:
            generator = torch.Generator().manual_seed(data_seed * 100_003 + epoch)
            self._orders[key] = torch.randperm(n, generator=generator)
        ids = self._orders[key][index * size : (index + 1) * size]
        return torch.stack([self.train_data[int(i)]["input_ids"] for i in ids]).to(self.model.device)

    # -- training ---------------------------------------------------------------------------------------

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self, steps: int, data_seed: int | None = None) -> None:
        data_seed = self.data_seed if data_seed is None else data_seed
        self.model.train()
        for _ in range(steps):
            lr = self.lr
            batch = self.batch(self.step, data_seed)
            loss = self.model(input_ids=batch, labels=batch).loss
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            for name, value in (
                ("loss", loss.item()),
                ("grad_norm", grad_norm.item()),
                ("learning_rate", lr),
            ):
                self.metrics.append({"step": self.step, "name": name, "value": value})

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        size, total, count = self.args.per_device_eval_batch_size, 0.0, 0
        for start in range(0, len(self.eval_data), size):
            ids = torch.stack(
                [self.eval_data[i]["input_ids"] for i in range(start, min(start + size, len(self.eval_data)))]
            ).to(self.model.device)
            total += self.model(input_ids=ids, labels=ids).loss.item() * len(ids)
            count += len(ids)
        self.model.train()
        value = total / count
        self.metrics.append({"step": self.step, "name": "eval_loss", "value": value})
        return value

    def set_lr(self, lr: float) -> None:
        from selfsteer.trainer_bridge.optim import set_lr

        set_lr(self.optimizer, self.scheduler, min(max(lr, LR_BOUNDS[0]), LR_BOUNDS[1]))

    def observation(self) -> Observation:
        return Observation.from_metrics(
            self.metrics, step=self.step, lr=self.lr, max_steps=self.spec.max_steps
        )

    # -- snapshots --------------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        state = snapshots.take(self.model, self.optimizer, self.scheduler, self.step)
        return Snapshot(state, list(self.metrics))

    def restore(self, snapshot: Snapshot) -> None:
        snapshots.restore(snapshot.state, self.model, self.optimizer, self.scheduler)
        self.step, self.metrics = snapshot.step, list(snapshot.metrics)


# -----------------------------------------------------------------------------------------------------
# collection


def behaviour_policy(spec: RunSpec) -> Callable[[Observation], Decision]:
    """What the run does at a decision point: a supervisor's decide, always keep, or random choice
    (seeded)."""
    if spec.policy == "keep":
        return lambda observation: Decision("keep", "keep behaviour policy")
    if spec.policy == "random":
        rng = random.Random(f"{spec.id}-policy")
        return lambda observation: Decision(rng.choice(ACTIONS), "random behaviour policy")
    from selfsteer.agents.supervisors import load_supervisor

    supervisor = load_supervisor(spec.policy)
    if supervisor is None:
        raise ValueError("the behaviour policy cannot be 'none': use keep")
    return supervisor.decide


def collect_run(spec: RunSpec, forks: bool = True, on_row: Callable[[dict], None] | None = None) -> dict:
    """Trains the run to its end; at each decision point, when `forks`, branches every action and the
    noise probe and emits a row (to `on_row`). Returns a summary of the run (its eval losses, the
    actions it took, timings)."""
    started = time.perf_counter()
    run = CounterfactualRun(spec)
    decide = behaviour_policy(spec)
    timings: dict[str, list[float]] = {"snapshot": [], "restore": [], "step": []}
    taken, rows = [], 0

    def interval() -> None:  # train to the next decision point (or the end) and evaluate there
        before, steps = time.perf_counter(), min(spec.eval_steps, spec.max_steps - run.step)
        run.train(steps)
        timings["step"].append((time.perf_counter() - before) / steps)
        run.evaluate()

    try:
        interval()
        while run.step < spec.max_steps:
            observation = run.observation()
            decision = decide(observation)
            taken.append(decision.action)
            if not forks:
                run.set_lr(decision.apply(run.lr))
                interval()
                continue
            before = time.perf_counter()
            snapshot = run.snapshot()
            timings["snapshot"].append(time.perf_counter() - before)
            horizon = min(spec.branch_steps, spec.max_steps - run.step)
            live_is_a_branch = horizon == min(spec.eval_steps, spec.max_steps - run.step)
            outcomes: dict[str, float] = {}
            # The behaviour's action last: where the horizon is the next decision point, its branch
            # is the live run, which goes on from there.
            for branch in [a for a in (*ACTIONS, PROBE) if a != decision.action] + [decision.action]:
                if outcomes:
                    before = time.perf_counter()
                    run.restore(snapshot)
                    timings["restore"].append(time.perf_counter() - before)
                run.set_lr(Decision("keep" if branch == PROBE else branch).apply(run.lr))
                if branch == PROBE:
                    torch.manual_seed(spec.seed * 7919 + run.step)  # another dropout draw too
                run.train(horizon, data_seed=run.data_seed + 1 if branch == PROBE else None)
                outcomes[branch] = run.evaluate()
            if not live_is_a_branch:
                run.restore(snapshot)
                run.set_lr(decision.apply(run.lr))
                interval()
            row = {
                "spec": asdict(spec),
                "run": spec.id,
                "step": snapshot.step,
                "lr": observation.lr,
                "observation": observation.to_dict(),
                "behaviour": {"action": decision.action, "explanation": decision.explanation},
                "horizon": horizon,
                "outcomes": {a: _finite_or_none(outcomes[a]) for a in ACTIONS},
                "probe": _finite_or_none(outcomes[PROBE]),
            }
            rows += 1
            if on_row is not None:
                on_row(row)
        final = run.metrics[-1]["value"] if run.metrics and run.metrics[-1]["name"] == "eval_loss" else None
        eval_losses = [(m["step"], m["value"]) for m in run.metrics if m["name"] == "eval_loss"]
        return {
            "run": spec.id,
            "spec": asdict(spec),
            "rows": rows,
            "actions": taken,
            "eval_loss": eval_losses,
            "final_eval_loss": final,
            "wall_s": time.perf_counter() - started,
            "step_s": statistics.median(timings["step"]) if timings["step"] else None,
            "snapshot_s": statistics.median(timings["snapshot"]) if timings["snapshot"] else None,
            "restore_s": statistics.median(timings["restore"]) if timings["restore"] else None,
        }
    finally:
        run.close()


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# -----------------------------------------------------------------------------------------------------
# the command


@dataclass
class CollectConfig:
    out: str
    specs: list[RunSpec] = field(default_factory=default_specs)
    shard: tuple[int, int] = (0, 1)  # (index, count): this process collects every count-th spec
    retries: int = 1  # a failed run is collected again this many times, then written to OUT/failed.jsonl
    # Ray Tune (evals/counterfactual_ray.py): each run a trial, on this machine's Ray or on a cluster
    ray: bool = False
    ray_address: str | None = None  # default $RAY_ADDRESS, else Ray started here
    ray_cpus: int | None = None  # the CPUs of a Ray started here (default: all)
    cpus_per_trial: float = 1  # and torch threads per run
    max_concurrent: int | None = None  # default: as many trials as the CPUs fit


def collect(config: CollectConfig, progress: bool = True, failures: list | None = None) -> list[dict]:
    """Collects every spec of this shard not yet done (an interrupted collection resumes), in this process
    or as Ray Tune trials (`config.ray`), writing each run's rows to OUT/rows.jsonl and then its summary to
    OUT/runs.jsonl as they come. A run that still fails after `config.retries` is written to
    OUT/failed.jsonl (and to `failures`), reported on stderr, and collected again by the next call."""
    from tqdm.auto import tqdm

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    index, count = config.shard
    runs_path, rows_path = out / "runs.jsonl", out / "rows.jsonl"
    done = set()
    if runs_path.exists():
        done = {json.loads(line)["run"] for line in runs_path.read_text().splitlines() if line.strip()}
        # Rows of a run cut off mid-way are dropped: the run is collected again, whole.
        if rows_path.exists():
            kept = [
                line
                for line in rows_path.read_text().splitlines()
                if line.strip() and json.loads(line)["run"] in done
            ]
            rows_path.write_text("".join(line + "\n" for line in kept))
    todo = [s for i, s in enumerate(config.specs) if i % count == index and s.id not in done]
    summaries, failures = [], [] if failures is None else failures
    with rows_path.open("a") as rows_file, runs_path.open("a") as runs_file:

        def write_rows(rows: list[dict]) -> None:
            rows_file.writelines(json.dumps(row) + "\n" for row in rows)
            rows_file.flush()

        def finished(summary: dict) -> None:  # after its rows: runs.jsonl is what marks a run done
            runs_file.write(json.dumps(summary) + "\n")
            runs_file.flush()
            summaries.append(summary)

        def failed(spec: RunSpec, error: str, attempts: int, **extra) -> None:
            failure = {"run": spec.id, "spec": asdict(spec), "error": error, "attempts": attempts, **extra}
            with (out / "failed.jsonl").open("a") as file:
                file.write(json.dumps(failure) + "\n")
            failures.append(failure)

        if config.ray:
            from selfsteer.evals.counterfactual_ray import collect_on_ray

            collect_on_ray(todo, config, write_rows, finished, failed)
        else:
            for spec in tqdm(todo, desc="counterfactual runs", unit="run", disable=not progress):
                for attempt in range(1, config.retries + 2):
                    start = rows_file.tell()
                    try:
                        summary = collect_run(spec, on_row=lambda row: write_rows([row]))
                    except Exception as error:  # retried, then written to failed.jsonl
                        rows_file.truncate(start)  # the failed attempt's rows
                        rows_file.seek(start)
                        if attempt > config.retries:
                            failed(spec, f"{type(error).__name__}: {error}", attempt)
                        continue
                    finished(summary)
                    break
    if failures:
        print(
            f"{len(failures)} runs failed after {config.retries + 1} attempts (OUT/failed.jsonl): "
            + ", ".join(f["run"] for f in failures),
            file=sys.stderr,
        )
    return summaries

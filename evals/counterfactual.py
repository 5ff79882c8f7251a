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

A run is either a cell of the named grid (SHAPES x OPTIMIZERS x SCHEDULES, `default_specs`) or a run
of any recipe (a built-in name or a YAML file) with `--set` overrides (`RunSpec.from_recipe`,
`recipe_specs`). A recipe run's `shape`, `optimizer` and `schedule` hold what the recipe resolves to
(the recipe's name with what the overrides change, in brackets; `training.optim`; the scheduler type
with its warm-up), so `workload_key(row.spec)` names the workload of a row of either kind.

A probed run (`--probe`) first probes each decision point with the core's probe (trainer_bridge/probe.py), as
an evidence intervener asks for it live (`intervener_data.evidence_probe`: x0.5, x1, x2, 4 steps each), and the
row's observation carries the table, so a supervisor that decides from a probe can be trained and scored on the
rows; the probe puts the state back exactly, so the run and its branches are the unprobed run's to the last digit.
Every run logs the update alignment as the core does (trainer_bridge/alignment.py).

Held-out workloads (evals/held_out.py) are refused by construction: no spec with a held-out model
shape, optimizer family or schedule, or a start lr of the held-out cells can be collected, from the
grid or from a recipe (whose resolved model section, optimizer and schedule are compared).

    selfsteer decisions collect --out runs/counterfactual            # the default grid
    selfsteer decisions collect --out runs/cf --policy intervener    # a DAgger round
    selfsteer decisions collect --recipe tiny --set model.n_layer=2 --lrs 1e-3,1e-2 --seeds 0,1 --out runs/cf-r
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from functools import cache, partial
from types import SimpleNamespace

import torch

from selfsteer.agents.counterfactual_rows import Behaviour, CounterfactualRow
from selfsteer.agents.intervener_data import evidence_probe
from selfsteer.agents.observation import Observation
from selfsteer.agents.supervisors import Decision, decide_or_fall_back
from selfsteer.evals.held_out import (
    EVALUATION_WORKLOADS,
    HELD_OUT,
    HELD_OUT_2,
    HELD_OUT_SCHEDULES,
    HELD_OUT_SHAPES,
)
from selfsteer.trainer_bridge import snapshots
from selfsteer.trainer_bridge.alignment import UpdateAlignment
from selfsteer.trainer_bridge.commands import LR_BOUNDS, ProbeArgs  # LR_BOUNDS: the supervision loop's clamp
from selfsteer.trainer_bridge.records import ACTIONS

PROBE = "keep_reseeded"  # the noise probe's branch name
# A probed run's probe at each decision point (`RunSpec.probe`): an evidence intervener's (agents/intervener_data.py
# evidence_probe), on the slice the HF adapter measures (the first 64 eval examples).
PROBE_SLICE = 64

# Model shapes, as recipe overrides. "deep" is held out.
SHAPES: dict[str, tuple[str, list[str]]] = {
    "tiny": ("tiny", []),
    "tiny-wide": ("tiny", ["model.n_embd=64", "model.n_head=4"]),
    "small-narrow": ("small", ["model.n_embd=64", "model.n_head=2", "data.eval_blocks=128"]),
    "small": ("small", ["data.eval_blocks=128"]),
    "deep": ("small", ["model.n_layer=3", "model.n_embd=96", "model.n_head=4", "data.eval_blocks=128"]),
    "deep-narrow": (
        "small",
        ["model.n_layer=4", "model.n_embd=64", "model.n_head=4", "data.eval_blocks=128"],
    ),
    "wide-shallow": (
        "small",
        ["model.n_layer=1", "model.n_embd=192", "model.n_head=6", "data.eval_blocks=128"],
    ),
    "deep-thin": (
        "small",
        ["model.n_layer=6", "model.n_embd=48", "model.n_head=4", "data.eval_blocks=128"],
    ),
    "mid": ("small", ["model.n_layer=2", "model.n_embd=80", "model.n_head=5", "data.eval_blocks=128"]),
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
    "inverse_sqrt_warmup": ["training.lr_scheduler_type=inverse_sqrt", "training.warmup_steps=6"],
    "constant_warmup": ["training.lr_scheduler_type=constant_with_warmup", "training.warmup_steps=10"],
    "cosine_restarts": [
        "training.lr_scheduler_type=cosine_with_restarts",
        "training.lr_scheduler_kwargs={num_cycles: 3}",
    ],
}
# Where each optimizer learns well on these workloads (measured with static runs), and the start
# multipliers around it: far too low to far too high.
# RMSprop (held out) measured on the held-out shape, 60 steps, eval loss at the end: 1e-5 4.84, 1e-4 3.60,
# 3e-4 3.07, 1e-3 3.39, 3e-3 3.40, 1e-2 3.54, 3e-2 3.67, 0.1 5.97.
GOOD_LR = {"adamw": 1e-2, "sgd": 0.1, "rmsprop": 3e-4}
START_MULTIPLIERS = (1 / 64, 1 / 8, 1, 8, 64)


@dataclass(frozen=True)
class RunSpec:
    """One collection run. Everything a run does follows from these fields.

    A cell of the named grid (`base_recipe` None): `shape`, `optimizer` and `schedule` name entries of
    SHAPES, OPTIMIZERS and SCHEDULES. A recipe run (`base_recipe` a built-in recipe or a YAML file, with
    its `overrides`): the three are derived from the resolved recipe (whatever is passed is replaced;
    see `resolve_recipe`), and the run trains the recipe with the overrides, then this spec's batch size,
    lr, seed, max_steps and eval_steps. `from_recipe` takes those three from the recipe itself."""

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
    probe: bool = False  # probe each decision point first (evidence_probe): its row's observation carries it
    base_recipe: str | None = None  # a recipe run: the recipe (built-in name or YAML file); None: the grid
    overrides: tuple[str, ...] = ()  # a recipe run's `--set KEY=VALUE`s, applied in this order

    def __post_init__(self):
        object.__setattr__(self, "overrides", tuple(self.overrides))  # a list, from JSON
        if self.base_recipe is None:
            if self.overrides:
                raise ValueError("overrides need a base_recipe: a grid cell is named by its tables")
            for name, table in (("shape", SHAPES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
                if getattr(self, name) not in table:
                    raise ValueError(f"unknown {name} {getattr(self, name)!r}: one of {', '.join(table)}")
            held = [
                what
                for what, out in (
                    ("shape", self.shape in HELD_OUT_SHAPES),
                    ("optimizer", self.optimizer in (HELD_OUT["optimizer"], HELD_OUT_2["optimizer"])),
                    ("schedule", self.schedule in HELD_OUT_SCHEDULES),
                )
                if out
            ]
        else:
            workload = resolve_recipe(self.base_recipe, self.overrides)
            for name in ("shape", "optimizer", "schedule"):
                object.__setattr__(self, name, workload[name])
            held = list(workload["held_out"])
            if not LR_BOUNDS[0] <= self.lr <= LR_BOUNDS[1]:
                raise ValueError(
                    f"{self.id}: start lr {self.lr:g} outside {LR_BOUNDS[0]:g}..{LR_BOUNDS[1]:g}"
                )
        if any(math.isclose(self.lr, x, rel_tol=1e-3) for x in HELD_OUT["start_lrs"]) and not (
            self.base_recipe is not None and evaluation_workload(asdict(self))
        ):
            held.append(f"start lr: {', '.join(f'{x:g}' for x in HELD_OUT['start_lrs'])} are held out")
        if held:
            raise ValueError(f"{self.id}: held out for evaluation ({'; '.join(held)}); never collected")

    @classmethod
    def from_recipe(
        cls,
        recipe: str,
        overrides: Iterable[str] = (),
        *,
        lr: float,
        seed: int = 0,
        policy: str = "random",
        horizon: int | None = None,
        probe: bool = False,
        max_steps: int | None = None,
        eval_steps: int | None = None,
        batch_size: int | None = None,
    ) -> RunSpec:
        """A recipe run. max_steps, eval_steps and batch_size default to the recipe's own (after the
        overrides): `training.max_steps` (60 where it sets none), `training.eval_steps` (10 where it sets
        none) and `training.per_device_train_batch_size` (8 where it sets none)."""
        overrides = tuple(overrides)
        workload = resolve_recipe(recipe, overrides)
        return cls(
            lr=lr,
            seed=seed,
            policy=policy,
            horizon=horizon,
            probe=probe,
            max_steps=max_steps or workload["max_steps"],
            eval_steps=eval_steps or workload["eval_steps"],
            batch_size=batch_size or workload["batch_size"],
            base_recipe=recipe,
            overrides=overrides,
        )

    @property
    def id(self) -> str:
        return (
            f"{self.shape}-{self.optimizer}-{self.schedule}-b{self.batch_size}-lr{self.lr:.3g}-s{self.seed}"
            f"-{self.policy.replace(':', '_').replace('/', '_')}{'-probed' if self.probe else ''}"
        )

    @property
    def branch_steps(self) -> int:
        return self.horizon or self.eval_steps

    def recipe(self) -> dict:
        from selfsteer.trainer_bridge.recipe import load_recipe

        if self.base_recipe is not None:
            return load_recipe(self.base_recipe, [*self.overrides, *run_overrides(self)])
        base, shape = SHAPES[self.shape]
        return load_recipe(base, recipe_overrides(self, shape))

    def to_dict(self) -> dict:
        """What rows and summaries store: a grid cell as it always was (without the recipe fields), an
        unprobed run without `probe`."""
        spec = asdict(self)
        if not self.probe:
            del spec["probe"]
        if self.base_recipe is None:
            del spec["base_recipe"], spec["overrides"]
        else:
            spec["overrides"] = list(self.overrides)
        return spec


def workload_key(spec: dict) -> str:
    """The workload of a row or run (its `spec`, as stored), the same across start lrs, seeds, batch sizes
    and policies: `shape-optimizer-schedule`, for a grid cell (tiny-adamw-constant) as for a recipe run,
    whose three fields hold the resolved recipe (tiny[n_embd=48,n_head=3,n_layer=2]-adafactor-linear)."""
    return f"{spec['shape']}-{spec['optimizer']}-{spec['schedule']}"


def evaluation_workload(spec: dict) -> str | None:
    """The name of the evaluation-only workload (EVALUATION_WORKLOADS) a row's or run's spec belongs to, or
    None: rows to evaluate on and never to train on."""
    if spec.get("base_recipe") is None:
        return None
    return _evaluation_keys().get(workload_key(spec))


@cache
def _evaluation_keys() -> dict[str, str]:
    keys = {}
    for name, workload in EVALUATION_WORKLOADS.items():
        resolved = resolve_recipe(workload["recipe"], tuple(workload["overrides"]))
        keys[workload_key(resolved)] = name
    return keys


def run_overrides(spec: RunSpec) -> list[str]:
    """What a recipe run sets after the recipe's own overrides."""
    return [
        f"training.per_device_train_batch_size={spec.batch_size}",
        f"training.learning_rate={spec.lr:.6e}",  # YAML reads 1e-05 as text
        f"training.seed={spec.seed}",
        f"training.max_steps={spec.max_steps}",
        f"training.eval_steps={spec.eval_steps}",
    ]


# Training keys a recipe run's spec holds in fields of its own (lr, seed, steps, batch size, optimizer,
# schedule): left out of the brackets of its shape.
SPEC_TRAINING_KEYS = {
    "learning_rate", "seed", "max_steps", "eval_steps", "per_device_train_batch_size", "optim", "optim_args",
    "lr_scheduler_type", "warmup_steps",
}  # the training keys a spec carries # fmt: skip


@cache
def resolve_recipe(recipe: str, overrides: tuple[str, ...]) -> dict:
    """What a recipe with overrides resolves to, for a recipe run's spec:

    shape: the recipe's name with, in brackets, every key the overrides change (model keys bare, others
      as section.key; the keys the spec holds itself left out), sorted: tiny[n_embd=48,n_head=3,n_layer=2];
    optimizer: `training.optim`, with its `optim_args` in parentheses where it has any;
    schedule: `training.lr_scheduler_type`, with `+warmupN` where it warms up;
    max_steps, eval_steps, batch_size: the recipe's own (60, 10 and 8 where it sets none);
    held_out: why it is held out (empty: collected): its resolved model section is that of a held-out
      shape, its optimizer of a held-out family, or its schedule the held-out one (cosine with warm-up).
    A RecipeError (a ValueError) for a recipe that does not load."""
    from selfsteer.trainer_bridge.recipe import load_recipe, parse_recipe

    resolved = load_recipe(recipe, list(overrides))
    plain = load_recipe(recipe)
    typed = parse_recipe(resolved)
    changed = []
    for section in ("model", "data", "training"):
        for key in sorted(set(resolved[section]) | set(plain[section])):
            value = resolved[section].get(key)
            if section == "training" and key in SPEC_TRAINING_KEYS or value == plain[section].get(key):
                continue
            value = f"{value:g}" if isinstance(value, float) else value
            changed.append(f"{key}={value}" if section == "model" else f"{section}.{key}={value}")
    training = typed.training
    optimizer = getattr(training.optim, "value", str(training.optim))
    if training.optim_args:
        optimizer += f"({training.optim_args})"
    schedule = getattr(training.lr_scheduler_type, "value", str(training.lr_scheduler_type))
    if training.warmup_steps:
        schedule += f"+warmup{training.warmup_steps:g}"

    held = []
    model = typed.model.to_dict()
    for name in HELD_OUT_SHAPES:
        if model == _held_out_model(name):
            held.append(f"shape: its model section is the held-out shape {name!r}'s")
    for family in (HELD_OUT["optimizer"], HELD_OUT_2["optimizer"]):
        if family in optimizer:
            held.append(f"optimizer: {family} is a held-out family")
    for name in HELD_OUT_SCHEDULES:
        held_schedule = dict(o.split("=", 1) for o in SCHEDULES[name])
        warms_up = "training.warmup_steps" in held_schedule  # held out with warm-up only, or at all
        if held_schedule["training.lr_scheduler_type"] in schedule and (
            training.warmup_steps or not warms_up
        ):
            held.append(
                f"schedule: {held_schedule['training.lr_scheduler_type']}{' with warm-up' * warms_up} is held out"
            )

    def integer(key: str, default: int) -> int:
        value = resolved["training"].get(key)
        return int(value) if value is not None and float(value) >= 1 else default

    return {
        "shape": f"{resolved.get('name', 'recipe')}[{','.join(changed)}]",
        "optimizer": optimizer,
        "schedule": schedule,
        "max_steps": integer("max_steps", 60),
        "eval_steps": integer("eval_steps", 10),
        "batch_size": integer("per_device_train_batch_size", 8),
        "held_out": tuple(held),
    }


@cache
def _held_out_model(shape: str) -> dict:
    """The resolved model section (as a GPT2Config dict) of a held-out grid shape."""
    from selfsteer.trainer_bridge.recipe import load_recipe, parse_recipe

    base, overrides = SHAPES[shape]
    return parse_recipe(load_recipe(base, overrides)).model.to_dict()


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


def recipe_specs(
    recipe: str,
    overrides: Iterable[str] = (),
    lrs: Iterable[float] = (),
    seeds: Iterable[int] = (0, 1),
    policy: str = "random",
) -> list[RunSpec]:
    """A recipe's runs: one per start lr and seed (lr-major), with the recipe's own steps and batch size.
    A ValueError where the recipe does not load or any run is held out (nothing is collected then)."""
    overrides = tuple(overrides)
    return [
        RunSpec.from_recipe(recipe, overrides, lr=lr, seed=seed, policy=policy)
        for lr, seed in itertools.product(lrs, seeds)
    ]


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
        self.alignment = UpdateAlignment()  # as the core logs it: the hypergradient and the probe read it
        self.alignment.attach(self.optimizer)
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
            loss, grad_norm = self._optimizer_step(self.batch(self.step, data_seed))
            self.step += 1
            alignment = self.alignment.take()
            for name, value in (
                ("loss", loss),
                ("grad_norm", grad_norm),
                ("learning_rate", lr),
                *((("update_alignment", alignment),) if alignment is not None else ()),
            ):
                self.metrics.append({"step": self.step, "name": name, "value": value})

    def _optimizer_step(self, batch: torch.Tensor) -> tuple[float, float]:
        """One optimizer step on `batch`, as the Trainer takes it: its loss and the gradient norm."""
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), grad_norm.item()

    def evaluate(self) -> float:
        value = self._eval_loss(len(self.eval_data))
        self.metrics.append({"step": self.step, "name": "eval_loss", "value": value})
        return value

    @torch.no_grad()
    def _eval_loss(self, n: int) -> float:
        """The mean loss over the first `n` eval examples, in the Trainer's eval batches."""
        self.model.eval()
        size, total, count = self.args.per_device_eval_batch_size, 0.0, 0
        for start in range(0, n, size):
            rows = [self.eval_data[i]["input_ids"] for i in range(start, min(start + size, n))]
            ids = torch.stack(rows).to(self.model.device)
            total += self.model(input_ids=ids, labels=ids).loss.item() * len(ids)
            count += len(ids)
        self.model.train()
        return total / count

    def set_lr(self, lr: float) -> None:
        from selfsteer.trainer_bridge.optim import set_lr

        set_lr(self.optimizer, self.scheduler, min(max(lr, LR_BOUNDS[0]), LR_BOUNDS[1]))

    def observation(self) -> Observation:
        return Observation.from_metrics(
            self.metrics, step=self.step, lr=self.lr, max_steps=self.spec.max_steps
        )

    # -- probes: the core's, as a live run under the Trainer is probed -----------------------------------

    def probe(self) -> dict:
        """The core's probe (trainer_bridge/probe.py) from this step, as an evidence intervener asks for it
        (`evidence_probe`), the state put back exactly."""
        from selfsteer.trainer_bridge.loop import StepContext
        from selfsteer.trainer_bridge.probe import run_probe

        ctx = StepContext(
            bridge=None, args=self.args, state=SimpleNamespace(global_step=self.step), control=None,
            model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler,
            train_step=self._probe_step, eval_slice=self._eval_slice,
        )  # what run_probe reads of a boundary # fmt: skip
        self.alignment.active = False  # the arms' steps are not the run's
        try:
            return run_probe(
                ctx, ProbeArgs(**evidence_probe(self.spec.eval_steps, self.spec.max_steps - self.step))
            )
        finally:
            self.alignment.active = True

    def _probe_step(self, i: int) -> float:
        """One step on the i-th probe batch: drawn as the HF adapter draws them, from (seed, step, i)."""
        generator = torch.Generator().manual_seed((self.spec.seed * 1_000_003 + self.step) * 1009 + i)
        ids = torch.randint(
            len(self.train_data), (self.args.per_device_train_batch_size,), generator=generator
        )
        batch = torch.stack([self.train_data[int(j)]["input_ids"] for j in ids]).to(self.model.device)
        return self._optimizer_step(batch)[0]

    def _eval_slice(self) -> float:
        return self._eval_loss(min(PROBE_SLICE, len(self.eval_data)))

    # -- snapshots --------------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        state = snapshots.take(self.model, self.optimizer, self.scheduler, self.step)
        return Snapshot(state, list(self.metrics))

    def restore(self, snapshot: Snapshot) -> None:
        snapshots.restore(snapshot.state, self.model, self.optimizer, self.scheduler)
        self.step, self.metrics = snapshot.step, list(snapshot.metrics)
        self.alignment.forget()  # the last update was another branch's


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
    from selfsteer.agents.registry import make_supervisor

    supervisor = make_supervisor(spec.policy)
    if supervisor is None:
        raise ValueError("the behaviour policy cannot be 'none': use keep")
    return partial(decide_or_fall_back, supervisor)  # a supervisor that fails keeps, as in the loop


def collect_run(
    spec: RunSpec, forks: bool = True, on_row: Callable[[CounterfactualRow], None] | None = None
) -> dict:
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
            if spec.probe:
                observation = replace(observation, probe=run.probe())
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
            row = CounterfactualRow(  # a non-finite outcome (a diverged branch) is None
                spec=spec.to_dict(),
                run=spec.id,
                step=snapshot.step,
                lr=observation.lr,
                observation=observation.to_dict(),
                behaviour=Behaviour(action=decision.action, explanation=decision.explanation),
                horizon=horizon,
                outcomes={a: outcomes[a] for a in ACTIONS},
                probe=outcomes[PROBE],
            )
            rows += 1
            if on_row is not None:
                on_row(row)
        final = run.metrics[-1]["value"] if run.metrics and run.metrics[-1]["name"] == "eval_loss" else None
        eval_losses = [(m["step"], m["value"]) for m in run.metrics if m["name"] == "eval_loss"]
        return {
            "run": spec.id,
            "spec": spec.to_dict(),
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

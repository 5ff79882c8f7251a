"""The built-in commands. Each handler runs in the training thread at a step boundary, on every rank,
and returns what the journal keeps as the command's result.
"""

from __future__ import annotations

from pathlib import Path

from selfsteer.trainer_bridge import checkpoints as ckpt
from selfsteer.trainer_bridge import optim, snapshots
from selfsteer.trainer_bridge.bridge import Bridge
from selfsteer.trainer_bridge.commands import (
    CommandError,
    CommandRegistry,
    LoadCheckpointArgs,
    NoArgs,
    ProbeArgs,
    ReloadDataArgs,
    SaveCheckpointArgs,
    SetMaxGradNormArgs,
    SetOptimizerArgs,
)
from selfsteer.trainer_bridge.data import SwappableDataset
from selfsteer.trainer_bridge.loop import StepContext
from selfsteer.trainer_bridge.probe import run_probe
from selfsteer.trainer_bridge.snapshots import MEMORY_CHECKPOINTS

BUILTINS = CommandRegistry()
command = BUILTINS.register


def default_registry() -> CommandRegistry:
    return BUILTINS.copy()


# ---- optimizer


def _check_optimizer(bridge: Bridge, args: SetOptimizerArgs) -> None:
    # Before training starts there is no optimizer to check against; the apply step checks again.
    if bridge._optimizer is not None:
        optim.check_args(bridge._optimizer, args)
    scheduler = bridge._schedule[0]() if bridge._schedule is not None else None
    if scheduler is not None:
        optim.check_peak(scheduler, args, bridge._schedule[1])


@command(
    "set_optimizer",
    SetOptimizerArgs,
    "Set any of lr, weight_decay, betas, eps, momentum. An lr sticks through the LR schedule: schedule "
    "'scale' (default) multiplies the rest of the schedule by new/current, so the next step uses the new "
    "value and a warm-up or decay keeps its shape around it (a warm-up's peak moves by the same factor); "
    "'constant' holds the lr at the new value from then on. A 'scale' that would lift the rest of the "
    "schedule above the lr bound (during a warm-up: its peak) is refused.",
    check=_check_optimizer,
)
def set_optimizer(ctx: StepContext, args: SetOptimizerArgs) -> dict:
    """The result: hyper-parameters `before` and `after`; with an lr also `schedule`: `mode`, `lr` (what
    the next step uses), `factor` or `rebased` (scale), and `peak_lr` / `peak_step`: the highest lr of
    the rest of the run and the first step that uses it (absent when the scheduler cannot say)."""
    groups = ctx.bridge.decay_groups(ctx)
    before = optim.hparams(ctx.optimizer, groups) if ctx.optimizer is not None else {}
    lr_info = optim.apply(ctx.optimizer, ctx.lr_scheduler, args, groups, ctx.state.max_steps - ctx.step)
    result = {"before": before, "after": optim.hparams(ctx.optimizer, groups)}
    if lr_info is not None:
        ahead = optim.peak_ahead(ctx.lr_scheduler, ctx.state.max_steps - ctx.step)
        if ahead is not None:
            lr_info.update(peak_lr=ahead[0], peak_step=ctx.step + 1 + ahead[1])
        result["schedule"] = lr_info
    return result


@command("set_max_grad_norm", SetMaxGradNormArgs, "Gradient clipping norm (0 turns clipping off).")
def set_max_grad_norm(ctx: StepContext, args: SetMaxGradNormArgs) -> dict:
    before = ctx.args.max_grad_norm
    ctx.args.max_grad_norm = args.value
    trainer_args = getattr(ctx.trainer, "args", None)  # a HF Trainer's own, when the context holds a copy
    if trainer_args is not None and trainer_args is not ctx.args:
        trainer_args.max_grad_norm = args.value
    return {"before": before, "after": args.value}


# ---- flow


@command("pause", NoArgs, "Hold training at this step boundary until resume or stop.", replay=False)
def pause(ctx: StepContext, args: NoArgs) -> dict:
    ctx.bridge.paused = True
    return {"paused": True}


@command("resume", NoArgs, "Go on after a pause.", replay=False)
def resume(ctx: StepContext, args: NoArgs) -> dict:
    ctx.bridge.paused = False
    return {"paused": False}


@command("stop", NoArgs, "End training after this step (the run finishes as 'stopped').")
def stop(ctx: StepContext, args: NoArgs) -> dict:
    ctx.control.should_training_stop = True
    ctx.bridge.paused = False
    ctx.bridge.stop_requested = True
    return {"stopped_at": ctx.step}


@command("evaluate", NoArgs, "Evaluate on the eval set now; the result holds the eval metrics.")
def evaluate(ctx: StepContext, args: NoArgs) -> dict:
    if ctx.evaluate is None:
        # Callback-only use: the loop evaluates right after this boundary.
        ctx.control.should_evaluate = True
        return {"scheduled": True}
    return ctx.evaluate()


@command(
    "probe",
    ProbeArgs,
    "Measure before deciding: from an exact in-memory snapshot, train `steps` steps at each factor of the "
    "lr in force (default x0.5, x1, x2), every arm on the same batches, and measure the loss on a small "
    "fixed eval slice; then restore the snapshot bit for bit. The result: per arm its train losses, "
    "slice losses and an estimate extrapolated to `horizon` steps; `best_factor`; `cost_steps` (the "
    "optimizer steps it paid for). The run itself goes on as if it had not happened.",
    # Its arms change nothing a replay could observe; restart arms end as checkpoints a later
    # load_checkpoint may fork to, so a replay runs those again (the same arms, to the bit).
    replay=lambda args: bool(args.get("restart")),
)
def probe(ctx: StepContext, args: ProbeArgs) -> dict:
    return run_probe(ctx, args)


# ---- checkpoints and branches


@command(
    "save_checkpoint",
    SaveCheckpointArgs,
    "Save model, optimizer, scheduler and RNG (name optional): a folder on disk, or with memory true an "
    f"exact copy in memory (fast; gone with the process; the latest {MEMORY_CHECKPOINTS} are kept).",
)
def save_checkpoint(ctx: StepContext, args: SaveCheckpointArgs) -> dict:
    bridge = ctx.bridge
    name = args.name or f"{bridge.branch}-step-{ctx.step}"
    if name in bridge.checkpoints:
        raise CommandError(f"this run already has a checkpoint named {name!r}")
    if args.memory:
        if ctx.optimizer is None:
            raise CommandError("the optimizer does not exist yet (training has not started)")
        # Every rank keeps its own copy of its own state: no file, nothing to agree on.
        snapshot = snapshots.take(
            ctx.model, ctx.optimizer, ctx.lr_scheduler, ctx.step, max_grad_norm=ctx.args.max_grad_norm
        )
        return snapshots.keep(bridge, name, snapshot)
    path = bridge.checkpoint_dir(ctx) / name
    error = None
    if bridge.is_main:
        meta = {"step": ctx.step, "branch": bridge.branch, "max_grad_norm": ctx.args.max_grad_norm}
        try:
            if path.exists():
                raise CommandError(f"{path} exists already")
            ckpt.save_checkpoint(path, ctx.model, ctx.optimizer, ctx.lr_scheduler, meta)
        except Exception as exc:
            error = f"cannot save checkpoint {name!r}: {exc}"
    bridge.agree(error)
    if bridge.world_size > 1:
        ckpt.save_rank_rng(path, bridge.rank)  # each rank's own random state, for its own data and dropout
    info = {"name": name, "path": str(path), "step": ctx.step, "branch": bridge.branch}
    bridge.checkpoints[name] = info
    return info


def _resolve_checkpoint(ctx: StepContext, checkpoint: str) -> tuple[str, Path, int | None]:
    known = ctx.bridge.checkpoints.get(checkpoint)
    if known is not None:
        return checkpoint, Path(known["path"]), known["step"]
    # Otherwise a folder, but only one inside this run's output or checkpoint folder: no reading of
    # arbitrary paths on the machine through the API.
    roots = [Path(ctx.args.output_dir).resolve(), ctx.bridge.checkpoint_dir(ctx).resolve()]
    path = Path(checkpoint)
    candidates = [path.resolve()] if path.is_absolute() else [(root / path).resolve() for root in roots]
    for candidate in candidates:
        try:
            if any(candidate.is_relative_to(root) for root in roots) and candidate.is_dir():
                return candidate.name, candidate, None
        except OSError:  # a name too long for the file system, ...: not a checkpoint of this run
            continue
    known_names = ", ".join(ctx.bridge.checkpoints) or "none"
    shown = checkpoint if len(checkpoint) <= 100 else f"{checkpoint[:100]}..."
    raise CommandError(f"no checkpoint {shown!r} in this run (known: {known_names})")


@command(
    "load_checkpoint",
    LoadCheckpointArgs,
    "Load a checkpoint into a new branch: the run forks; steps keep counting, metrics carry the branch.",
)
def load_checkpoint(ctx: StepContext, args: LoadCheckpointArgs) -> dict:
    bridge = ctx.bridge
    branch = args.branch or f"branch-{len(bridge.branches)}"
    if branch in bridge.branches:
        raise CommandError(f"branch {branch!r} exists already")
    known = bridge.checkpoints.get(args.checkpoint)
    if known is not None and known.get("memory"):
        name, path, meta = args.checkpoint, None, _load_from_memory(ctx, args.checkpoint)
    else:
        name, path, step = _resolve_checkpoint(ctx, args.checkpoint)
        rank = bridge.rank if bridge.world_size > 1 else None
        meta = ckpt.load_checkpoint(path, ctx.model, ctx.optimizer, ctx.lr_scheduler, rank=rank)
    if meta.get("max_grad_norm") is not None:
        ctx.args.max_grad_norm = meta["max_grad_norm"]
    parent = bridge.branch
    info = {
        "branch": branch,
        "parent": parent,
        "checkpoint": name,
        "checkpoint_step": meta["step"] if path is None else meta.get("step", step),
        "fork_step": ctx.step,
        "path": str(path) if path is not None else None,
        "restored": meta["restored"],
    }
    bridge.branches[branch] = {"name": branch, "parent": parent}
    bridge.branch = branch
    if ctx.goto is not None and info["checkpoint_step"] is not None:
        # A loop whose schedule and data follow its own step counter goes back to the checkpoint's step
        # (the Trainer keeps counting: its scheduler and data position came back with the checkpoint).
        ctx.goto(info["checkpoint_step"])
        info["continues_at"] = info["checkpoint_step"]
    return info


def _load_from_memory(ctx: StepContext, name: str) -> dict:
    snapshot = ctx.bridge.memory_checkpoints.get(name)
    if snapshot is None:
        raise CommandError(
            f"the in-memory checkpoint {name!r} is gone (only the latest {MEMORY_CHECKPOINTS} are kept, and "
            "none outlives its process)"
        )
    if ctx.optimizer is None:
        raise CommandError("the optimizer does not exist yet (training has not started)")
    snapshots.restore(snapshot, ctx.model, ctx.optimizer, ctx.lr_scheduler)
    restored = {"optimizer": True, "scheduler": snapshot.scheduler is not None, "rng": True, "memory": True}
    return {"step": snapshot.step, **snapshot.meta, "restored": restored}


# ---- data


@command(
    "reload_data", ReloadDataArgs, "Reload the training data, or replace it with another registered set."
)
def reload_data(ctx: StepContext, args: ReloadDataArgs) -> dict:
    bridge = ctx.bridge
    name = args.dataset or bridge.current_dataset
    if name is None or name not in bridge.data_factories:
        registered = ", ".join(bridge.data_factories) or "none"
        raise CommandError(f"no data factory {name!r} (registered: {registered})")
    target = getattr(ctx.trainer, "train_dataset", None)
    if target is None and ctx.train_dataloader is not None:
        target = ctx.train_dataloader.dataset
    if not isinstance(target, SwappableDataset):
        raise CommandError("the training data cannot be replaced: give the Trainer a SwappableDataset")
    dataset = bridge.data_factories[name]()
    target.swap(dataset)
    bridge.current_dataset = name
    return {"dataset": name, "examples": len(dataset)}

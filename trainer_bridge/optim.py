"""Reading and changing optimizer hyper-parameters of a live run, so that the change sticks.

The trap: an LR scheduler recomputes every group's lr from `base_lrs` at each step, so writing only
`param_groups[i]["lr"]` is undone one step later. `set_lr` rescales the schedule itself: base_lrs (and
`initial_lr`, which a re-created scheduler would read) are multiplied by the same factor as the current
lr, so the schedule keeps its shape from the new value on (a linear decay goes on decaying, from there).
"""

from __future__ import annotations

from typing import Any

from selfsteer.trainer_bridge.commands import CommandError, InvalidCommand, SetOptimizerArgs

HPARAMS = ("lr", "weight_decay", "betas", "eps", "momentum")


def unwrap_optimizer(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


def unwrap_scheduler(scheduler: Any) -> Any:
    return getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler


def optimizer_name(optimizer: Any) -> str:
    return type(unwrap_optimizer(optimizer)).__name__


def missing_hparams(optimizer: Any, args: SetOptimizerArgs) -> list[str]:
    """Names the caller set that this optimizer's param groups do not have (momentum on Adam, ...)."""
    group = optimizer.param_groups[0]
    return [name for name in HPARAMS if getattr(args, name) is not None and name not in group]


def check_args(optimizer: Any, args: SetOptimizerArgs, error: type[Exception] = InvalidCommand) -> None:
    missing = missing_hparams(optimizer, args)
    if missing:
        raise error(f"optimizer {optimizer_name(optimizer)} has no {', '.join(missing)}")


def hparams(optimizer: Any, decay_groups: list[int]) -> dict:
    """The hyper-parameters as one flat dict (first group; weight decay of the first decaying group)."""
    groups = optimizer.param_groups
    out = {name: groups[0][name] for name in HPARAMS if name in groups[0]}
    if "betas" in out:
        out["betas"] = list(out["betas"])
    if decay_groups and "weight_decay" in groups[decay_groups[0]]:
        out["weight_decay"] = groups[decay_groups[0]]["weight_decay"]
    return out


def set_lr(optimizer: Any, scheduler: Any, lr: float) -> None:
    groups = optimizer.param_groups
    inner = unwrap_scheduler(scheduler) if scheduler is not None else None
    base_lrs = getattr(inner, "base_lrs", None)
    current = groups[0]["lr"]
    if current > 0:
        # Keep the ratios between groups and the schedule's shape: scale everything by one factor.
        factor = lr / current
        for group in groups:
            group["lr"] *= factor
        if base_lrs is not None:
            inner.base_lrs = [base * factor for base in base_lrs]
    elif base_lrs is not None:
        # The schedule is at zero (warm-up start, end of a decay): no ratio to keep; move its base, and
        # the schedule brings the lr there (a warm-up then ramps up to the new value).
        inner.base_lrs = [lr] * len(base_lrs)
    else:
        for group in groups:
            group["lr"] = lr
    for i, group in enumerate(groups):
        if "initial_lr" in group and base_lrs is not None:
            group["initial_lr"] = inner.base_lrs[i]
    if inner is not None and hasattr(inner, "_last_lr"):
        # What get_last_lr() reports (the Trainer logs it as learning_rate): the lr the next step uses.
        inner._last_lr = [group["lr"] for group in groups]


def apply(optimizer: Any, scheduler: Any, args: SetOptimizerArgs, decay_groups: list[int]) -> None:
    if optimizer is None:
        raise CommandError("the optimizer does not exist yet (training has not started)")
    check_args(optimizer, args, CommandError)
    if args.lr is not None:
        set_lr(optimizer, scheduler, args.lr)
    for i, group in enumerate(optimizer.param_groups):
        # Groups without decay (biases, norms) keep theirs: the Trainer put them there on purpose.
        if args.weight_decay is not None and i in decay_groups:
            group["weight_decay"] = args.weight_decay
        if args.betas is not None:
            group["betas"] = tuple(args.betas)
        if args.eps is not None:
            group["eps"] = args.eps
        if args.momentum is not None:
            group["momentum"] = args.momentum


def decay_groups(optimizer: Any, decay_parameter_names: set[str] | None, model: Any) -> list[int]:
    """Indices of the param groups that hold weight-decayed parameters."""
    groups = optimizer.param_groups
    if decay_parameter_names is not None and model is not None:
        decayed = {id(p) for name, p in model.named_parameters() if name in decay_parameter_names}
        found = [i for i, g in enumerate(groups) if any(id(p) in decayed for p in g["params"])]
        if found:
            return found
    with_decay = [i for i, g in enumerate(groups) if g.get("weight_decay", 0) > 0]
    return with_decay or list(range(len(groups)))

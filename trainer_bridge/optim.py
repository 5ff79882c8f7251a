"""Reading and changing optimizer hyper-parameters of a live run, so that the change sticks.

The trap: an LR scheduler recomputes every group's lr from `base_lrs` at each step, so writing only
`param_groups[i]["lr"]` is undone one step later. A new lr therefore changes the schedule itself, in one
of two ways (`set_optimizer`'s `schedule`):

- "scale" (the default): the remaining schedule passes through the new value. Precisely: let `c` be the
  lr the schedule gives the next step (group 0, as the scheduler computes it: `base_lr * lambda(t)`).
  Every later step then uses `new / c` times the lr the schedule would have given it, and the next step
  uses exactly `new`; the shape (warm-up ramp, decay) and the ratios between param groups are kept. This
  is what double / halve mean: the rest of the run at twice / half the lr it would have had. During a
  warm-up the peak moves by the same factor: 0.01 at step 4 of a 10-step warm-up towards 0.003 (the
  schedule gives 0.0012 there) means the warm-up goes on to 0.025. The command's result says so
  (`factor`, `peak_lr`, `peak_step`); use "constant" for "0.01 from now on". Where the schedule is at 0
  for the next step (the first step of a warm-up) no factor leads 0 to the new value: the new value then
  becomes the schedule's base lr (its peak), as if the run had started with it, and the warm-up ramps up
  to it (the result's `lr` is 0, `rebased` is true).
- "constant": every later step uses the new value, whatever the scheduler says. The scheduler's lambda
  is wrapped (`HeldLambda`, installed by `make_holdable` when training begins) so that it returns 1 from
  this scheduler step on, and base_lrs become the new values. The hold is part of the scheduler's
  `state_dict()`, so checkpoints, branches and resumed runs keep or drop it with the rest of the schedule.
  A later "scale" scales the held value (double after constant doubles it).

Both set `initial_lr` (which a re-created scheduler would read) to the new base.
"""

from __future__ import annotations

from typing import Any

from torch.optim.lr_scheduler import LambdaLR

from selfsteer.trainer_bridge.commands import LR_BOUNDS, CommandError, InvalidCommand, SetOptimizerArgs

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


class HeldLambda:
    """An LR-lambda wrapper that can hold the multiplier at 1 from a scheduler step on.

    torch's `LambdaLR.state_dict()` keeps the `__dict__` of each lambda that is a callable object and
    `load_state_dict()` updates it back, so the hold (`hold_from`, a plain int or None) travels with every
    checkpoint of the scheduler, loadable with `weights_only=True`. The wrapped lambda lives in a slot,
    outside that state."""

    __slots__ = ("inner", "__dict__")

    def __init__(self, inner: Any, hold_from: int | None = None):
        self.inner = inner
        self.hold_from = hold_from

    def __call__(self, step: int) -> float:
        if self.hold_from is not None and step >= self.hold_from:
            return 1.0
        return self.inner(step)


def make_holdable(scheduler: Any) -> bool:
    """Wraps the lambdas of a LambdaLR (every transformers schedule but reduce_lr_on_plateau and greedy)
    in `HeldLambda`, once; returns whether the scheduler's lr can now be held. Call it before any
    checkpoint of the scheduler is saved (the bridge does, when training begins), so that every checkpoint
    records a hold or its absence. A hold saved by a wrapped scheduler and loaded into a fresh one (the
    Trainer resuming a run) sits on the plain lambda until this adopts it."""
    inner = unwrap_scheduler(scheduler) if scheduler is not None else None
    lambdas = getattr(inner, "lr_lambdas", None)
    if not isinstance(inner, LambdaLR) or lambdas is None:
        return False
    for i, fn in enumerate(lambdas):
        if isinstance(fn, HeldLambda):
            continue
        state = dict(getattr(fn, "__dict__", {}))
        hold_from = state.pop("hold_from", None)
        if state:
            return False  # a stateful lambda object: wrapping it would drop its state from checkpoints
        lambdas[i] = HeldLambda(fn, hold_from)
    return True


class LrScale:
    """The steered lr of a loop that sets the lr itself each step (nanoGPT: `param_group["lr"] =
    get_lr(it)`), where an outside edit of the groups would be undone a step later. The loop asks for
    its lr through it, `lr = scale(get_lr(it))`: what its own schedule gives, times the scale the
    commands set ("scale"), or the value they hold ("constant"; a later "scale" scales the held value).

    It stands where a scheduler would (the bridge's `lr_scheduler`): checkpoints save its `state_dict()`
    and a rollback loads it back, so the steered lr is restored with the weights."""

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer
        self.scale = 1.0
        self.held: float | None = None
        self.scheduled: float | None = None  # what the loop's schedule gave the latest step

    def __call__(self, scheduled: float) -> float:
        self.scheduled = float(scheduled)
        return self.held if self.held is not None else self.scheduled * self.scale

    def current(self) -> float:
        """The lr in force: held, or the latest scheduled value scaled (before the loop first asked: the
        groups' lr)."""
        if self.held is not None:
            return self.held
        if self.scheduled is None:
            return float(unwrap_optimizer(self.optimizer).param_groups[0]["lr"])
        return self.scheduled * self.scale

    def set(self, lr: float, schedule: str) -> dict:
        info: dict[str, Any] = {"mode": schedule}
        now = self.current()
        if schedule == "constant":
            self.held = lr
        elif now <= 0:
            raise CommandError(
                f"the loop's schedule gives {now:g} now (a warm-up's first step?): no scale leads it to a new "
                "lr; send schedule 'constant', or wait a step"
            )
        else:
            info["factor"] = lr / now
            if self.held is not None:
                self.held = lr
            else:
                self.scale *= lr / now
        # So that a loop which leaves the groups alone (no schedule of its own) trains at it too; the
        # ratios between groups are kept.
        groups = unwrap_optimizer(self.optimizer).param_groups
        first = groups[0]["lr"]
        for group in groups:
            group["lr"] = lr * group["lr"] / first if first > 0 else lr
        groups[0]["lr"] = lr
        info["lr"] = lr
        return info

    def state_dict(self) -> dict:
        return {"scale": self.scale, "held": self.held, "scheduled": self.scheduled}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.held, self.scheduled = state["scale"], state["held"], state["scheduled"]


def _scheduled_lrs(inner: Any, step: int) -> list[float] | None:
    """What a LambdaLR gives each group at one of its steps; None for other schedulers."""
    if not isinstance(inner, LambdaLR):
        return None
    return [base * float(fn(step)) for fn, base in zip(inner.lr_lambdas, inner.base_lrs, strict=True)]


PEAK_HORIZON = 100_000  # how far ahead the peak is looked for: a warm-up's end lies well within it


def peak_ahead(scheduler: Any, steps: int) -> tuple[float, int] | None:
    """The highest lr (group 0) the schedule gives one of the next `steps` optimizer steps (at most
    PEAK_HORIZON of them: the cost is one lambda call a step, and a run may declare a billion steps),
    and its offset from the next step (0: the next one). None when the scheduler is not a LambdaLR
    (its future is not a function of the step) or there is no step left."""
    inner = unwrap_scheduler(scheduler) if scheduler is not None else None
    if not isinstance(inner, LambdaLR) or steps <= 0:
        return None
    fn, base, now = inner.lr_lambdas[0], inner.base_lrs[0], inner.last_epoch
    peak, earliest = max((base * float(fn(now + k)), -k) for k in range(min(steps, PEAK_HORIZON)))
    return peak, -earliest


def check_peak(
    scheduler: Any, args: SetOptimizerArgs, steps: int, error: type[Exception] = InvalidCommand
) -> None:
    """Refuses an lr whose "scale" would lift the rest of the schedule (within the next `steps` optimizer
    steps) above the lr bound: the new lr itself is inside it, but during a warm-up the peak to come moves
    by the same factor (0.5 at step 4 of a 10-step warm-up towards 0.003 is a peak of 1.25)."""
    if args.lr is None or args.schedule != "scale":
        return
    inner = unwrap_scheduler(scheduler) if scheduler is not None else None
    if not isinstance(inner, LambdaLR):
        return  # no schedule ahead to lift: the groups' lr is the new one
    now = _scheduled_lrs(inner, inner.last_epoch)[0]
    ahead = peak_ahead(scheduler, steps)
    if now <= 0 or ahead is None:
        return  # at 0 the new lr becomes the schedule's base, its peak: inside the bound
    peak, high = ahead[0] * args.lr / now, LR_BOUNDS[1]
    if peak > high * (1 + 1e-9):  # not a rounding of a peak that is the new lr itself
        raise error(
            f"lr {args.lr:g} with schedule 'scale' multiplies the rest of the schedule by {args.lr / now:g}: "
            f"the peak ahead ({ahead[1] + 1} steps on) would be {peak:.4g}, above the lr bound {high:g}; send a "
            f"smaller lr (at most {args.lr * high / peak:.4g}), or schedule 'constant'"
        )


def set_lr(optimizer: Any, scheduler: Any, lr: float, schedule: str = "scale") -> dict:
    """Sets the lr from the next optimizer step on (see the module docstring for what "scale" and
    "constant" mean). Returns what it did: `mode`, `lr` (what the next step uses), `factor` (scale) and
    `rebased` (scale where the schedule was at 0)."""
    if schedule not in ("scale", "constant"):
        raise CommandError(f"schedule must be 'scale' or 'constant', not {schedule!r}")
    if isinstance(scheduler, LrScale):
        return scheduler.set(lr, schedule)
    groups = optimizer.param_groups
    inner = unwrap_scheduler(scheduler) if scheduler is not None else None
    info: dict[str, Any] = {"mode": schedule}
    if isinstance(inner, LambdaLR):
        scheduled = _scheduled_lrs(inner, inner.last_epoch)
        if schedule == "constant":
            if not make_holdable(inner):
                raise CommandError("schedule 'constant' cannot wrap this scheduler's stateful lr lambdas")
            # Keep the ratios between groups: group i holds at new * (its lr / group 0's lr).
            ref, values = (
                (scheduled[0], scheduled) if scheduled[0] > 0 else (inner.base_lrs[0], inner.base_lrs)
            )
            inner.base_lrs = [lr] + [lr * v / ref if ref > 0 else lr for v in values[1:]]
            for fn in inner.lr_lambdas:
                if fn.hold_from is None or fn.hold_from > inner.last_epoch:
                    fn.hold_from = inner.last_epoch
        elif scheduled[0] > 0:
            factor = lr / scheduled[0]
            inner.base_lrs = [base * factor for base in inner.base_lrs]
            info["factor"] = factor
        else:
            base0 = inner.base_lrs[0]
            inner.base_lrs = [lr * base / base0 if base0 > 0 else lr for base in inner.base_lrs]
            info["rebased"] = True
        for group, value in zip(groups, _scheduled_lrs(inner, inner.last_epoch), strict=True):
            group["lr"] = value
        if "factor" in info:
            groups[0]["lr"] = lr  # exactly, not base * factor * lambda rounded
        for group, base in zip(groups, inner.base_lrs, strict=True):
            if "initial_lr" in group:
                group["initial_lr"] = base
        # What get_last_lr() reports (the Trainer logs it as learning_rate): the lr the next step uses.
        inner._last_lr = [group["lr"] for group in groups]
    elif schedule == "constant" and inner is not None:
        raise CommandError(
            f"schedule 'constant' needs a LambdaLR scheduler (every transformers lr_scheduler_type but "
            f"reduce_lr_on_plateau and greedy); this run has {type(inner).__name__}"
        )
    else:
        # No scheduler (nothing moves the lr), or one that works from the groups' current lr
        # (ReduceLROnPlateau, chainable torch schedulers): scale the groups, and base_lrs where present.
        base_lrs = getattr(inner, "base_lrs", None)
        current = groups[0]["lr"]
        factor = lr / current if current > 0 else None
        for group in groups:
            group["lr"] = group["lr"] * factor if factor is not None else lr
        groups[0]["lr"] = lr  # exactly
        if base_lrs is not None:
            inner.base_lrs = [b * factor if factor is not None else lr for b in base_lrs]
            for group, base in zip(groups, inner.base_lrs, strict=True):
                if "initial_lr" in group:
                    group["initial_lr"] = base
        if factor is not None and schedule == "scale":
            info["factor"] = factor
        if inner is not None and hasattr(inner, "_last_lr"):
            inner._last_lr = [group["lr"] for group in groups]
    info["lr"] = groups[0]["lr"]
    return info


def scale_schedule(optimizer: Any, scheduler: Any, factor: float) -> float:
    """Multiplies the whole lr schedule by `factor`, wherever it is (at a warm-up's first step too, where
    `set_lr` has no lr to scale from). Returns the lr the next step uses."""
    if isinstance(scheduler, LrScale):
        scheduler.scale *= factor
        if scheduler.held is not None:
            scheduler.held *= factor
        for group in unwrap_optimizer(optimizer).param_groups:
            group["lr"] *= factor
        return scheduler.current()
    inner = unwrap_scheduler(scheduler) if scheduler is not None else None
    groups = optimizer.param_groups
    if hasattr(inner, "base_lrs"):
        inner.base_lrs = [base * factor for base in inner.base_lrs]
    for group in groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    if inner is not None and hasattr(inner, "_last_lr"):
        inner._last_lr = [group["lr"] for group in groups]
    return float(groups[0]["lr"])


def apply(
    optimizer: Any, scheduler: Any, args: SetOptimizerArgs, decay_groups: list[int], steps: int
) -> dict | None:
    """Applies the args (`steps`: the optimizer steps left in the run); returns what `set_lr` did when
    they set the lr. Nothing is changed when any of them is refused."""
    if optimizer is None:
        raise CommandError("the optimizer does not exist yet (training has not started)")
    check_args(optimizer, args, CommandError)
    # Again here: the server could not check a command sent before the optimizer existed.
    check_peak(scheduler, args, steps, CommandError)
    lr_info = set_lr(optimizer, scheduler, args.lr, args.schedule) if args.lr is not None else None
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
    return lr_info


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

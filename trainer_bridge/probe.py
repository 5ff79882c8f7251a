"""Probes: which lr does better from here, measured instead of guessed.

At a step boundary the core takes an exact in-memory snapshot (weights, optimizer, scheduler, RNG), then
for each factor trains `steps` optimizer steps at that multiple of the lr in force, every arm from the
snapshot and on the same batches, measures the loss on a small fixed evaluation slice at the start,
halfway and at the end, and puts the snapshot back: the run goes on bit for bit as if nothing had
happened (tests/test_probe.py), at a cost of `len(factors) x steps` optimizer steps, journaled with the
result.

Each arm's slice losses are extrapolated to `horizon` steps with an exponential fit, `a + b e^(-ct)`:
a few steps reward whatever lr drops the loss fastest now and may plateau soonest (short-horizon bias,
Wu et al. 2018); AutoLRS compares candidate lrs by such fits instead of by their last value.

The adapter gives the two things only the loop knows (on its `StepContext`): `train_step(i)`, one optimizer
step on the i-th probe batch, returning its train loss (the batches must be the same for every arm: drawn
from the step alone, or from the RNG the snapshot restores), and `eval_slice()`, the mean loss on the slice.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch

from selfsteer.trainer_bridge import optim, snapshots
from selfsteer.trainer_bridge.commands import LR_BOUNDS, CommandError, ProbeArgs

if TYPE_CHECKING:
    from selfsteer.trainer_bridge.loop import StepContext

EVAL_SLICE_SEED = 1234
DECAY_RATES = [1e-3 * (3000 ** (i / 59)) for i in range(60)]  # per step, 1e-3 .. 3: the fits tried


def extrapolate(points: list[tuple[int, float]], horizon: int) -> float:
    """The loss at step `horizon` of a curve through `points` (step, loss), starting at step 0. A curve
    that falls is fitted with `a + b e^(-ct)` (b >= 0, c > 0, by least squares over a grid of c); one
    that rises goes on rising at its average rate; a non-finite loss is infinite."""
    if not points or any(not math.isfinite(y) for _, y in points):
        return math.inf
    (t0, y0), (tk, yk) = points[0], points[-1]
    if len(points) < 2 or tk <= t0 or horizon <= tk:
        return yk
    if yk >= y0:  # not learning: no fit makes it better than its trend
        return yk + (yk - y0) / (tk - t0) * (horizon - tk)
    best = None
    for c in DECAY_RATES:
        xs = [math.exp(-c * t) for t, _ in points]
        ys = [y for _, y in points]
        n, sx, sy = len(xs), sum(xs), sum(ys)
        sxx, sxy = sum(x * x for x in xs), sum(x * y for x, y in zip(xs, ys, strict=True))
        det = n * sxx - sx * sx
        if det <= 1e-15:
            continue
        b = (n * sxy - sx * sy) / det
        if b < 0:
            continue
        a = (sy - b * sx) / n
        error = sum((a + b * x - y) ** 2 for x, y in zip(xs, ys, strict=True))
        if best is None or error < best[0] - 1e-15:
            best = (error, a, b, c)
    if best is None:
        return yk
    _, a, b, c = best
    # Not clamped at zero: a steep, barely bending drop (a run recovering from a far too high lr) can
    # extrapolate below it, and clamped, every such arm tied at 0. The estimate ranks arms; it is not a loss.
    return a + b * math.exp(-c * horizon)


def lr_in_force(optimizer, scheduler) -> float:
    """The lr the next optimizer step uses."""
    if isinstance(scheduler, optim.LrScale):
        return scheduler.current()
    return float(optim.unwrap_optimizer(optimizer).param_groups[0]["lr"])


def _measure(ctx: StepContext) -> float:
    """The slice's loss, under its own fixed seed: an evaluation that draws random batches (nanoGPT's
    estimate_loss) measures the same ones each time, and the training RNG is left as it was."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(EVAL_SLICE_SEED)
        return float(ctx.eval_slice())


def run_probe(ctx: StepContext, args: ProbeArgs) -> dict:
    """Trains every arm from the same snapshot, restores it, and returns the probe's table."""
    if ctx.train_step is None:
        raise CommandError(
            "this loop cannot be probed: it gave no train_step (a plain loop: selfsteer.attach(..., "
            "train_step=fn), fn(step) doing one optimizer step and returning its loss)"
        )
    if ctx.eval_slice is None:
        raise CommandError(
            "this loop cannot be probed: it has no evaluation (pass evaluate= or probe_evaluate=)"
        )
    if ctx.optimizer is None:
        raise CommandError("the optimizer does not exist yet (training has not started)")
    if args.restart and ctx.bridge.start is None:
        raise CommandError("restart arms need the run's start: this run kept none (BridgeConfig keep_start)")
    started = time.perf_counter()
    model, optimizer, scheduler = ctx.model, ctx.optimizer, ctx.lr_scheduler
    snapshot = snapshots.take(model, optimizer, scheduler, ctx.step)
    was_training = model.training
    base_lr = lr_in_force(optimizer, scheduler)
    horizon = args.horizon or 2 * args.steps
    start = _measure(ctx)
    halfway = args.steps // 2
    arms = []
    try:
        for factor in args.factors:
            snapshots.restore(snapshot, model, optimizer, scheduler)
            # x1 is the run's own future, whatever its lr. Another arm stays within the bounds every lr
            # command keeps to: a run started above them (plain SGD at 9.6) is probed lower at the bound,
            # where a move would take it. Clamping x1 too had every arm train at the bound, alike.
            lr = base_lr if factor == 1 else min(max(base_lr * factor, LR_BOUNDS[0]), LR_BOUNDS[1])
            if lr != base_lr:
                optim.set_lr(optimizer, scheduler, lr)
            train_loss, curve = [], [(0, start)]
            for i in range(args.steps):
                loss = float(ctx.train_step(i))
                train_loss.append(loss)
                if not math.isfinite(loss):
                    break
                if i + 1 == halfway and halfway < args.steps:
                    curve.append((i + 1, _measure(ctx)))
            ended = len(train_loss) == args.steps and math.isfinite(train_loss[-1])
            curve.append((len(train_loss), _measure(ctx) if ended else math.inf))
            estimate = extrapolate(curve, horizon)
            arms.append({
                "factor": factor, "lr": lr, "train_loss": train_loss, "eval_loss": [list(p) for p in curve],
                "final": curve[-1][1], "estimate": estimate, "diverged": not math.isfinite(estimate),
            })  # one arm per factor # fmt: skip
        restarts = [_restart_arm(ctx, factor) for factor in args.restart]
    finally:
        snapshots.restore(snapshot, model, optimizer, scheduler)
        model.train(was_training)
    finite = [arm for arm in arms if math.isfinite(arm["estimate"])]
    best = min(finite, key=lambda arm: arm["estimate"])["factor"] if finite else None
    return {
        "step": ctx.step,
        "lr": base_lr,
        "steps": args.steps,
        "horizon": horizon,
        "start": start,
        "arms": arms,
        "best_factor": best,
        "restarts": restarts,
        "cost_steps": sum(len(arm["train_loss"]) for arm in [*arms, *restarts]),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _restart_arm(ctx: StepContext, factor: float) -> dict:
    """From the run's start, the schedule times `factor`, as many steps as the run has trained (so its loss
    compares with the run's now as it is: no extrapolation), then kept as an in-memory checkpoint."""
    model, optimizer, scheduler = ctx.model, ctx.optimizer, ctx.lr_scheduler
    snapshots.restore(ctx.bridge.start, model, optimizer, scheduler)
    optim.scale_schedule(optimizer, scheduler, factor)
    train_loss = []
    for i in range(ctx.step - ctx.bridge.start.step):
        train_loss.append(float(ctx.train_step(i)))
        if not math.isfinite(train_loss[-1]):
            break
    final = _measure(ctx) if train_loss and math.isfinite(train_loss[-1]) else math.inf
    name = f"restart-x{factor:g}-at-{ctx.step}"
    point = snapshots.take(model, optimizer, scheduler, ctx.step, max_grad_norm=ctx.args.max_grad_norm)
    snapshots.keep(ctx.bridge, name, point)
    lr = lr_in_force(optimizer, scheduler)
    return {"factor": factor, "lr": lr, "train_loss": train_loss, "final": final, "checkpoint": name}

"""Plots a person would rather look at than read: a run's losses and learning rate with the
supervisor's decisions marked, and a suite's curves side by side."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, never a window
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"double": ("^", "tab:red"), "halve": ("v", "tab:blue"), "keep": ("o", "tab:gray")}


def _series(store, run_id: str, name: str) -> tuple[list[int], list[float]]:
    rows = store.get_metrics(run_id, names=[name])
    return [r["step"] for r in rows], [r["value"] if r["value"] is not None else math.nan for r in rows]


def plot_run(store, run_id: str, path: str | Path, title: str | None = None) -> Path:
    """Train and eval loss (top) and learning rate (bottom, log scale), decisions as markers where
    they took effect (`applied_step`): a red up-triangle for double, a blue down-triangle for halve, a
    grey dot for keep; a dotted line joins each to the step where it was observed, when that differs
    (a supervisor that does not hold the run acts later than it looked)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[3, 2])
    steps, train = _series(store, run_id, "loss")
    top.plot(steps, train, color="tab:orange", alpha=0.5, linewidth=0.8, label="train loss")
    steps_eval, evals = _series(store, run_id, "eval_loss")
    top.plot(steps_eval, evals, "o-", color="black", markersize=3, label="eval loss")
    top.set_ylabel("loss")
    lr_steps, lrs = _series(store, run_id, "learning_rate")
    bottom.plot(lr_steps, lrs, color="tab:green", label="learning rate")
    bottom.set_yscale("log")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step")
    for decision in store.list_decisions(run_id):
        marker, color = MARKERS.get(decision["action"], ("x", "black"))
        observed = decision["step"]
        applied = decision["applied_step"] if decision.get("applied_step") is not None else observed
        for axis in (top, bottom):
            axis.axvline(applied, color=color, alpha=0.15, linewidth=1)
        if decision.get("lr_after"):
            if applied != observed:
                bottom.plot([observed, applied], [decision["lr_after"]] * 2, ":", color=color, linewidth=1)
                bottom.plot([observed], [decision["lr_after"]], "|", color=color, markersize=8)
            bottom.plot([applied], [decision["lr_after"]], marker, color=color, markersize=8)
    handles = [plt.Line2D([], [], marker=m, color=c, linestyle="", label=a) for a, (m, c) in MARKERS.items()]
    top.legend(loc="upper right")
    bottom.legend(handles=[*bottom.get_legend_handles_labels()[0], *handles], loc="upper right", fontsize=8)
    top.set_title(title or f"run {run_id[:8]}")
    return _save(fig, path)


def plot_curves(curves: dict[str, tuple[list[int], list[float]]], path: str | Path, title: str) -> Path:
    """Several eval-loss curves on one chart (one per supervisor)."""
    fig, axis = plt.subplots(figsize=(8, 4.5))
    for label, (steps, values) in curves.items():
        axis.plot(steps, values, "o-", markersize=2.5, label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("eval loss")
    finite = [v for _, values in curves.values() for v in values if math.isfinite(v) and v > 0]
    if finite and max(finite) > 4 * min(finite):  # one diverging run would flatten every other curve
        axis.set_yscale("log")
        axis.set_ylabel("eval loss (log scale)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    return _save(fig, path)


def plot_grpo(log_history: list[dict], path: str | Path, title: str) -> Path:
    """A GRPO run on reflections, step by step: the mean reward (the share of reflections whose retry
    passed) with its running mean over 10 steps, the share of groups that taught nothing (all rewards
    equal), and the mean reflection length."""
    logs = [entry for entry in log_history if "reward" in entry]
    steps = [entry["step"] for entry in logs]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(8, 7), sharex=True, height_ratios=[3, 1.5, 1.5])
    rewards = [float(entry["reward"]) for entry in logs]
    running = [
        sum(rewards[max(0, i - 9) : i + 1]) / len(rewards[max(0, i - 9) : i + 1]) for i in range(len(rewards))
    ]
    top.plot(steps, rewards, ".", color="tab:blue", alpha=0.5, label="reward (retries passed)")
    top.plot(steps, running, "-", color="tab:blue", label="running mean, 10 steps")
    top.set_ylabel("reward")
    top.legend(fontsize=8)
    zero = [float(entry.get("frac_reward_zero_std", math.nan)) for entry in logs]
    middle.plot(steps, zero, ".-", color="tab:gray", markersize=3)
    middle.set_ylabel("groups with\nno signal")
    length = [float(entry.get("completions/mean_length", math.nan)) for entry in logs]
    bottom.plot(steps, length, ".-", color="tab:green", markersize=3)
    bottom.set_ylabel("reflection\ntokens")
    bottom.set_xlabel("step")
    top.set_title(title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

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
    """Train and eval loss (top) and learning rate (bottom, log scale), decisions as markers:
    a red up-triangle for double, a blue down-triangle for halve, a grey dot for keep."""
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
        for axis in (top, bottom):
            axis.axvline(decision["step"], color=color, alpha=0.15, linewidth=1)
        if decision.get("lr_after"):
            bottom.plot([decision["step"]], [decision["lr_after"]], marker, color=color, markersize=8)
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
    axis.set_title(title)
    axis.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

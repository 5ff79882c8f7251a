"""What a supervisor sees of a training run: the metric history since the start, and the views of it
that prompts use (down-sampled JSON, compact statistics, warnings)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

Series = list[tuple[int, float]]  # (step, value), by step
SERIES = ("train_loss", "eval_loss", "grad_norm", "learning_rate", "update_alignment")  # the series fields


@dataclass
class Observation:
    step: int
    lr: float
    max_steps: int | None = None
    train_loss: Series = field(default_factory=list)
    eval_loss: Series = field(default_factory=list)
    grad_norm: Series = field(default_factory=list)
    learning_rate: Series = field(default_factory=list)
    # The cosine between each step's gradient and the previous step's update, reversed (the core logs it:
    # trainer_bridge/alignment.py): positive, successive steps agree; negative, they oppose.
    update_alignment: Series = field(default_factory=list)
    # Self-correction: lessons from this run's rolled-back decisions (and, with memory, earlier runs'),
    # and the actions already tried and rolled back from this very state.
    reflections: list[str] = field(default_factory=list)
    avoid: list[str] = field(default_factory=list)
    # Evidence: the result of a `probe` sent before this decision (trainer_bridge/probe.py), or None.
    probe: dict | None = None
    # Whether the run keeps a copy of its start, from which a probe can train restart arms.
    start_kept: bool = False

    @classmethod
    def from_metrics(
        cls, rows: Iterable[Mapping], *, step: int, lr: float, max_steps: int | None = None
    ) -> Observation:
        """From metric rows `{step, name, value}` as the store and the bridge give them
        (names as the HF Trainer logs them: loss, eval_loss, grad_norm, learning_rate; and the core's
        update_alignment)."""
        names = ("loss", "eval_loss", "grad_norm", "learning_rate", "update_alignment")
        series: dict[str, Series] = {name: [] for name in names}
        for row in rows:
            if row["name"] in series:
                value = row["value"]
                series[row["name"]].append((int(row["step"]), math.nan if value is None else float(value)))
        for values in series.values():
            values.sort(key=lambda point: point[0])
        return cls(
            step=step,
            lr=lr,
            max_steps=max_steps,
            train_loss=series["loss"],
            eval_loss=series["eval_loss"],
            grad_norm=series["grad_norm"],
            learning_rate=series["learning_rate"],
            update_alignment=series["update_alignment"],
        )

    # -- facts --------------------------------------------------------------------------------------

    @property
    def losses(self) -> Series:
        """The loss a decision is about: eval loss where there is one, else train loss."""
        return self.eval_loss or self.train_loss

    @property
    def nonfinite(self) -> bool:
        recent = [v for _, v in self.train_loss[-5:] + self.eval_loss[-2:] + self.grad_norm[-5:]]
        return any(not math.isfinite(v) for v in recent)

    @property
    def exploding_gradients(self) -> bool:
        norms = [v for _, v in self.grad_norm if math.isfinite(v)]
        return len(norms) >= 5 and norms[-1] > 10 * statistics.median(norms[:-1])

    def last_lr_change_step(self) -> int:
        """The step of the last change of learning rate (0 when it never changed)."""
        changed = 0
        for (_, before), (step, after) in zip(self.learning_rate, self.learning_rate[1:], strict=False):
            if not math.isclose(before, after, rel_tol=1e-6):
                changed = step
        return changed

    def alignments(self, since: int | None = None) -> list[float]:
        """The update alignments of the steps after `since` (default: the evaluation before the last) up to
        the last evaluation: the interval it closes. Not up to this step: a decision on an evaluation at
        step E is read at step E + 1, whose alignment may or may not be in the store yet, and one value
        can flip the sign of a mean near zero; so the same run gives the same values. Up to this step when
        no evaluation is after `since`."""
        if since is None:
            since = self.eval_loss[-2][0] if len(self.eval_loss) >= 2 else 0
        until = self.eval_loss[-1][0] if self.eval_loss and self.eval_loss[-1][0] > since else self.step
        return [v for s, v in self.update_alignment if since < s <= until and math.isfinite(v)]

    def eval_interval(self) -> int | None:
        """Steps between the last two evaluations (the first evaluation's step when there is one); None
        before any evaluation."""
        evals = [step for step, _ in self.eval_loss]
        if not evals:
            return None
        return evals[-1] - evals[-2] if len(evals) >= 2 else evals[-1]

    def mean_alignment(self, since: int | None = None) -> float | None:
        """The mean of `alignments(since)`; None when none was logged there."""
        values = self.alignments(since)
        return statistics.fmean(values) if values else None

    def warnings(self) -> list[str]:
        found = []
        if self.nonfinite:
            found.append("the loss or gradient norm is NaN or infinite")
        if self.exploding_gradients:
            found.append("the gradient norm exploded (over 10x its median)")
        found += [f"a lesson from an earlier decision: {text}" for text in self.reflections]
        found += [
            f"{action} was tried from this state and made things worse: do not {action}"
            for action in self.avoid
        ]
        return found

    # -- views for prompts --------------------------------------------------------------------------

    def history(self, max_points: int = 12, recent: int = 5) -> list[dict]:
        """The loss history, every one of the last `recent` points and older ones ever sparser
        (each step back twice as far): the present matters most, the past gives the trend."""
        points = self.losses
        if len(points) > max_points:
            keep = set(range(len(points) - recent, len(points)))
            gap, index = 2, len(points) - recent - 1
            while index >= 0 and len(keep) < max_points:
                keep.add(index)
                index -= gap
                gap *= 2
            keep.add(0)
            points = [points[i] for i in sorted(keep)]
        key = "eval_loss" if self.eval_loss else "train_loss"
        return [{"step": step, key: _round(value)} for step, value in points]

    def history_json(self, **options) -> str:
        return json.dumps(self.history(**options))

    def table(self, max_rows: int = 8) -> str:
        """One row per evaluation (the latest `max_rows`, after the first train step): the lr in force,
        the mean train loss since the previous row, the eval loss. What the intervener reads."""
        ends = [s for s, _ in self.eval_loss] or [s for s, _ in self.train_loss][-max_rows:]
        eval_at = dict(self.eval_loss)
        lr_at = dict(self.learning_rate)
        rows, previous = [], 0
        if self.train_loss:
            step, value = self.train_loss[0]
            rows.append(f"{step} | {_lr_text(lr_at.get(step, self.lr))} | {_loss_text(value)} | -")
            previous = step
        for end in ends:
            window = [v for s, v in self.train_loss if previous < s <= end]
            train = statistics.fmean(window) if window else math.nan
            lrs = [v for s, v in self.learning_rate if previous < s <= end]
            lr = lrs[-1] if lrs else lr_at.get(end, self.lr)
            rows.append(
                f"{end} | {_lr_text(lr)} | {_loss_text(train)} | {_loss_text(eval_at.get(end, math.nan))}"
            )
            previous = end
        if len(rows) > max_rows:
            rows = rows[:1] + rows[-(max_rows - 1) :]
        return "step | lr | train loss | eval loss\n" + "\n".join(rows)

    def signals(self) -> str:
        """A few derived numbers in words: how the eval loss moved over the last two evaluations, how
        noisy the train loss was since the previous one, the gradient norm against the interval before,
        the mean update alignment since the previous evaluation, and the lr as a multiple of its start
        and of its value at the previous evaluation. No absolute lr: what counts as a high rate differs by
        optimizer and model, the moves of the loss do not. What the `intervener_signals` prompt reads."""
        if not self.train_loss and not self.eval_loss:
            return "No loss measured yet."
        which = "Eval" if self.eval_loss else "Train"
        losses = [v for _, v in self.losses]
        previous = [v for _, v in self.eval_loss[-2:-1]] or [v for _, v in self.train_loss[:1]]
        before = (
            self.eval_loss[-3][1]
            if len(self.eval_loss) >= 3
            else (self.train_loss[0][1] if len(self.eval_loss) == 2 and self.train_loss else None)
        )
        since = "the previous evaluation" if len(self.eval_loss) >= 2 else "the first step"
        line = f"{which} loss {_loss_text(losses[-1])} at step {self.step} of {self.max_steps or '?'}"
        if previous:
            line += f": {_move(losses[-1], previous[0])} since {since}"
            if before is not None:
                line += f", after it {_move(previous[0], before)} in the interval before"
        lines = [line + "."]
        start = self.eval_loss[-2][0] if len(self.eval_loss) >= 2 else 0
        window = [v for s, v in self.train_loss if start < s <= self.step]
        finite = [v for v in window if math.isfinite(v)]
        if len(finite) >= 2:
            spread = 100 * statistics.pstdev(finite) / statistics.fmean(finite)
            lines.append(
                f"Train loss over the last {len(window)} steps: mean {_loss_text(statistics.fmean(window))}, spread {spread:.1f}%."
            )
        norms = [v for s, v in self.grad_norm if s > start and math.isfinite(v)]
        before_norms = [v for s, v in self.grad_norm if s <= start and math.isfinite(v)][
            -len(window) or None :
        ]
        if norms and before_norms and statistics.median(before_norms) > 0:
            lines.append(
                f"Gradient norm: {_times(statistics.median(norms) / statistics.median(before_norms))} its median"
                " in the interval before."
            )
        if (alignment := self.mean_alignment(start)) is not None:
            lines.append(
                f"Update alignment over the last interval: mean {alignment:+.2f} (positive: successive steps agree,"
                " the lr could be higher; negative: they oppose, it is too high)."
            )
        lrs = [v for _, v in self.learning_rate]
        first_eval = self.eval_loss[0][0] if self.eval_loss else self.step
        started = max((v for s, v in self.learning_rate if s <= first_eval), default=0.0)
        at_previous = dict(self.learning_rate).get(start) if len(self.eval_loss) >= 2 else started
        if lrs and started > 0 and at_previous:
            lines.append(
                f"Learning rate: {_times(self.lr / started)} its start, {_times(self.lr / at_previous)} its value at"
                " the previous evaluation."
            )
        return "\n".join(lines)

    def probe_text(self) -> str:
        """The probe's table in relative terms: each arm's factor of the lr in force, and its loss on the
        slice now and extrapolated, as a change against the x1 arm. No absolute lr."""
        probe = self.probe or {}
        arms = probe.get("arms") or []
        if not arms:
            return f"No probe: {probe['error']}." if probe.get("error") else "No probe."
        keep = next((a for a in arms if a["factor"] == 1.0), None)
        lines = [
            f"Probe: each lr trained {probe['steps']} steps from here on the same batches; the eval-slice loss"
            f" after them and extrapolated to {probe['horizon']} steps" + (", against x1:" if keep else ":")
        ]
        for arm in arms:
            final, estimate = arm_loss(arm, "final"), arm_loss(arm, "estimate")
            if keep is not None and arm is not keep:
                keep_final, keep_estimate = arm_loss(keep, "final"), arm_loss(keep, "estimate")
                text = f"{_move(final, keep_final)} now, {_move(estimate, keep_estimate)} extrapolated"
            else:
                text = f"{_loss_text(final)} now, {_loss_text(estimate)} extrapolated"
            lines.append(f"x{arm['factor']:g}: {text}" + (" (diverged)" if arm.get("diverged") else ""))
        return "\n".join(lines)

    def stats(self) -> dict:
        """A few numbers that say where the run stands."""
        losses = [v for _, v in self.losses]
        out: dict = {"points": len(losses)}
        if not losses:
            return out
        finite = [v for v in losses if math.isfinite(v)]
        out["latest"] = _round(losses[-1])
        if finite:
            out["best"] = _round(min(finite))
            out["first"] = _round(finite[0])
        if len(losses) >= 2:
            out["change_vs_previous_pct"] = _pct(losses[-1], losses[-2])
        if len(losses) >= 4:
            half = len(losses[-6:]) // 2
            older, newer = losses[-6:][:half], losses[-6:][half:]
            out["recent_trend_pct"] = _pct(statistics.fmean(newer), statistics.fmean(older))
        return out

    def stats_text(self) -> str:
        s = self.stats()
        if s["points"] == 0:
            return "No loss measured yet."
        which = "eval" if self.eval_loss else "train"
        parts = [f"{which} loss: latest {s['latest']}"]
        if "best" in s:
            parts.append(f"best {s['best']}, first {s['first']}")
        if "change_vs_previous_pct" in s:
            parts.append(f"change since previous {s['change_vs_previous_pct']:+.1f}%")
        if "recent_trend_pct" in s:
            parts.append(f"recent trend {s['recent_trend_pct']:+.1f}%")
        return "; ".join(parts) + "."

    def prompt_values(self) -> dict:
        """The placeholders a prompt template may use."""
        warnings = self.warnings()
        return {
            "step": self.step,
            "max_steps": self.max_steps if self.max_steps is not None else "?",
            "lr": self.lr,
            "history_json": self.history_json(),
            "table": self.table(),
            "signals": self.signals(),
            "stats": self.stats_text(),
            "warnings": "".join(f" WARNING: {w}." for w in warnings),
            "probe": self.probe_text(),
        }

    def to_dict(self) -> dict:
        return asdict(self)

    def record(self, recent_evaluations: int = 8, recent_steps: int = 64) -> dict:
        """What a decision stores of what it saw: the prompt views it was shown (`views`, exactly as
        rendered) and the raw series of the recent past only: the last `recent_evaluations` evaluations
        and the points since the earlier of the `recent_evaluations`-th last evaluation and the last
        `recent_steps` points. The whole history stays in the run's metrics; a copy of it in every
        decision grew the store quadratically (and a long run's decision past the server's body limit)."""
        evals = self.eval_loss[-recent_evaluations:]
        since = min(evals[0][0] - 1 if evals else self.step, self.step - recent_steps)

        def recent(series: Series) -> Series:
            return [(s, v) for s, v in series if s > since]

        return {
            **asdict(self),
            "train_loss": recent(self.train_loss),
            "eval_loss": evals,
            "grad_norm": recent(self.grad_norm),
            "learning_rate": recent(self.learning_rate),
            "update_alignment": recent(self.update_alignment),
            "views": self.prompt_values(),
        }

    @classmethod
    def from_record(cls, data: Mapping) -> Observation:
        """An observation from a stored one (`to_dict` or `record`): JSON lists back to series, non-finite
        numbers back to floats (null, as JSON persists them, is NaN; older records spell them "nan",
        "inf", or NaN and Infinity tokens), the rendered views set aside."""
        fields = {k: v for k, v in data.items() if k != "views"}
        for key in SERIES:
            fields[key] = [(int(s), math.nan if v is None else float(v)) for s, v in data.get(key, [])]
        if "lr" in data and data["lr"] is None:
            fields["lr"] = math.nan
        return cls(**fields)


def arm_loss(arm: Mapping, key: str) -> float:
    """A probe arm's `final` or `estimate` as a float: the journal stores a diverged arm's as null (JSON
    has no infinity), a stored observation as the string "inf"; both are infinite."""
    value = arm.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.inf
    return value if math.isfinite(value) else math.inf


def _loss_text(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else ("-" if math.isnan(value) else str(value))


def _lr_text(value: float) -> str:
    return f"{value:.3g}"


def _move(new: float, old: float) -> str:
    """How a loss moved from `old` to `new`: "fell 3.2%", "rose 0.4%"."""
    if not (math.isfinite(new) and math.isfinite(old)) or old == 0:
        return "became non-finite" if not math.isfinite(new) else "came back from non-finite"
    change = 100 * (new - old) / abs(old)
    return f"{'rose' if change > 0 else 'fell'} {abs(change):.1f}%"


def _times(ratio: float) -> str:
    return f"{ratio:.2g}x"


def _round(value: float) -> float | str:
    return round(value, 4) if math.isfinite(value) else str(value)


def _pct(new: float, old: float) -> float:
    if not (math.isfinite(new) and math.isfinite(old)) or old == 0:
        return math.inf if not math.isfinite(new) else 0.0
    return round(100.0 * (new - old) / abs(old), 2)

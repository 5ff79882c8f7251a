"""The Hugging Face Trainer adapter: a callback (public callback events only) that drives the steering
core at each optimizer-step boundary.

    trainer = make_interactive(Trainer)(model=..., args=..., train_dataset=...)   # or
    bridge = attach(Trainer(...))                                                   # on any Trainer
    trainer.train()                                   # now steerable at http://127.0.0.1:7007

Works on TRL trainers too (Trainer subclasses). The Trainer's own objects are the core's `args`,
`state` and `control`; `on_train_begin` is the boundary at step 0, `on_step_end` every later one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from transformers import TrainerCallback

from selfsteer.trainer_bridge import optim
from selfsteer.trainer_bridge.bridge import Bridge
from selfsteer.trainer_bridge.commands import CommandError
from selfsteer.trainer_bridge.config import BridgeConfig
from selfsteer.trainer_bridge.loop import StepContext


class BridgeCallback(TrainerCallback):
    """The Trainer-facing half: public callback events only, forwarded to the bridge."""

    def __init__(self, bridge: Bridge):
        self.bridge = bridge
        self.probe: TrainerProbe | None = None

    def context(self, args, state, control, **kwargs) -> StepContext:
        names = ("model", "optimizer", "lr_scheduler", "train_dataloader", "eval_dataloader")
        ctx = StepContext(self.bridge, args, state, control, **{n: kwargs.get(n) for n in names})
        trainer = self.bridge.trainer
        if trainer is not None:
            ctx.evaluate = lambda: evaluate_now(trainer, control)
            if self.probe is None or self.probe.trainer is not trainer:
                self.probe = TrainerProbe(trainer)
            probe, step = self.probe, state.global_step
            ctx.train_step = lambda i: probe.train_step(step, i)
            ctx.eval_slice = probe.eval_slice if trainer.eval_dataset is not None else None
        return ctx

    def on_train_begin(self, args, state, control, **kwargs):
        self.bridge.on_train_begin(self.context(args, state, control, **kwargs))

    def on_step_end(self, args, state, control, **kwargs):
        self.bridge.boundary(self.context(args, state, control, **kwargs))

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            clear_loss_window(self.bridge.trainer)
        self.bridge.on_log(state, args, logs or {})

    def on_save(self, args, state, control, **kwargs):
        self.bridge.on_trainer_save(self.context(args, state, control, **kwargs))

    def on_train_end(self, args, state, control, **kwargs):
        self.bridge.on_train_end(self.context(args, state, control, **kwargs))


def clear_loss_window(trainer: Any) -> None:
    """The Trainer sums the loss of a logging window in `_tr_loss` and clears it by subtracting it from
    itself, which leaves a NaN in place: with NaN losses shown (logging_nan_inf_filter off), one bad step
    would make every later logged loss NaN, even after a rollback to good weights. The NaN has just been
    logged; the next window starts from zero. (On every rank: each clears its own sum.)"""
    window = getattr(trainer, "_tr_loss", None)
    if isinstance(window, torch.Tensor) and not torch.isfinite(window).all():
        window.zero_()


def evaluate_now(trainer: Any, control: Any) -> dict:
    if trainer.eval_dataset is None:
        raise CommandError("this run has no eval dataset")
    # Trainer.evaluate() logs through the callback handler, which clears should_log: keep this step's
    # training log. (Its clearing should_evaluate is right: this was the step's evaluation.)
    should_log = control.should_log
    metrics = trainer.evaluate()
    control.should_log = should_log
    return metrics


class TrainerProbe:
    """What a probe (trainer_bridge/probe.py) needs of a Trainer: an optimizer step as the Trainer takes
    one (its `training_step`, gradient accumulation, clipping, optimizer and scheduler), on batches drawn
    from the step alone, so every arm trains on the same ones; and the mean loss of the first
    `eval_examples` of the eval set (the Trainer's `prediction_step`)."""

    eval_examples = 64

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self._train_data: Any = None
        self._eval_batches: list | None = None

    def _pruned(self, data: Any) -> Any:
        if hasattr(data, "column_names"):  # a datasets.Dataset: the Trainer's own column pruning
            return self.trainer._remove_unused_columns(data, description="probe")
        return data

    def _data(self) -> Any:
        if self._train_data is None:
            self._train_data = self._pruned(self.trainer.train_dataset)
        return self._train_data

    def train_step(self, step: int, i: int) -> float:
        trainer, args = self.trainer, self.trainer.args
        data = self._data()
        rank = args.process_index
        generator = torch.Generator().manual_seed(((args.seed * 1_000_003 + step) * 1009 + i) * 64 + rank)
        model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
        loss = 0.0
        for _ in range(args.gradient_accumulation_steps):
            ids = torch.randint(len(data), (args.per_device_train_batch_size,), generator=generator)
            batch = trainer.data_collator([data[int(j)] for j in ids])
            loss += float(trainer.training_step(model, batch))  # each micro-batch's loss / accumulation
        if args.max_grad_norm:
            trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), args.max_grad_norm)
        trainer.optimizer.step()
        # As the Trainer's own loop: ReduceLROnPlateau steps on an evaluation's metric, never per step (a
        # probe that stepped it failed, and the probe supervisor kept every lr for want of evidence).
        if not isinstance(optim.unwrap_scheduler(trainer.lr_scheduler), ReduceLROnPlateau):
            trainer.lr_scheduler.step()
        model.zero_grad()
        return loss

    @torch.no_grad()
    def eval_slice(self) -> float:
        trainer = self.trainer
        if self._eval_batches is None:
            data = trainer.eval_dataset
            if isinstance(data, dict):
                data = next(iter(data.values()))
            data = self._pruned(data)
            n, size = min(self.eval_examples, len(data)), trainer.args.per_device_eval_batch_size
            self._eval_batches = [
                trainer.data_collator([data[j] for j in range(start, min(start + size, n))])
                for start in range(0, n, size)
            ]
        model, optimizer = trainer.model, trainer.optimizer
        was_training = model.training
        # A schedule-free optimizer is measured at its averaged weights, as the Trainer's evaluate does.
        switches = callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
        model.eval()
        if switches:
            optimizer.eval()
        total = count = 0
        try:
            for batch in self._eval_batches:
                loss = trainer.prediction_step(model, batch, prediction_loss_only=True)[0]
                rows = len(next(iter(batch.values())))
                total += float(loss) * rows
                count += rows
        finally:
            model.train(was_training)
            if switches:
                optimizer.train()
        return total / count


def attach_bridge(bridge: Bridge, trainer: Any) -> Bridge:
    """Steers `trainer` through `bridge` (one that no other loop drives)."""
    bridge.trainer = trainer
    # The Trainer's default hides a NaN or infinite loss behind the mean of the window's others, and a
    # window of nothing but NaN logs 0.0: a broken run looked perfect. The bridge logs what happened.
    trainer.args.logging_nan_inf_filter = False
    trainer.add_callback(BridgeCallback(bridge))
    return bridge


def attach(trainer: Any, config: BridgeConfig | None = None, **kwargs: Any) -> Bridge:
    """Makes an existing Trainer (or TRL trainer) steerable; returns its bridge. kwargs go to Bridge."""
    return attach_bridge(Bridge(config, **kwargs), trainer)


def make_interactive(trainer_class: type) -> type:
    """A subclass of `trainer_class` that serves a control API while it trains.

    Extra constructor keywords: `bridge` (a BridgeConfig or a ready Bridge), `data_factories` (for
    `reload_data`), `commands` (a CommandRegistry with your own commands)."""

    class Interactive(trainer_class):
        def __init__(self, *args, bridge=None, data_factories=None, commands=None, **kwargs):
            super().__init__(*args, **kwargs)
            if not isinstance(bridge, Bridge):
                bridge = Bridge(bridge, registry=commands, data_factories=data_factories)
            self.bridge = attach_bridge(bridge, self)

        def train(self, *args, **kwargs):
            try:
                return super().train(*args, **kwargs)
            except BaseException as exc:
                self.bridge.finish("failed", error=f"training failed: {type(exc).__name__}: {exc}")
                raise

    Interactive.__name__ = Interactive.__qualname__ = f"Interactive{trainer_class.__name__}"
    return Interactive

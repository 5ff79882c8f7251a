"""The Hugging Face Trainer adapter: a callback (public callback events only) that drives the steering
core at each optimizer-step boundary.

    trainer = make_interactive(Trainer)(model=..., args=..., train_dataset=...)   # or
    bridge = attach(Trainer(...))                                                   # on any Trainer
    trainer.train()                                   # now steerable at http://127.0.0.1:7007

Works on TRL trainers too (Trainer subclasses). The Trainer's own objects are the core's `args`,
`state` and `control`; `on_train_begin` is the boundary at step 0, `on_step_end` every later one.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from selfsteer.trainer_bridge.bridge import Bridge, BridgeConfig, StepContext
from selfsteer.trainer_bridge.commands import CommandError


class BridgeCallback(TrainerCallback):
    """The Trainer-facing half: public callback events only, forwarded to the bridge."""

    def __init__(self, bridge: Bridge):
        self.bridge = bridge

    def context(self, args, state, control, **kwargs) -> StepContext:
        names = ("model", "optimizer", "lr_scheduler", "train_dataloader", "eval_dataloader")
        ctx = StepContext(self.bridge, args, state, control, **{n: kwargs.get(n) for n in names})
        trainer = self.bridge.trainer
        if trainer is not None:
            ctx.evaluate = lambda: evaluate_now(trainer, control)
        return ctx

    def on_train_begin(self, args, state, control, **kwargs):
        self.bridge.on_train_begin(self.context(args, state, control, **kwargs))

    def on_step_end(self, args, state, control, **kwargs):
        self.bridge.boundary(self.context(args, state, control, **kwargs))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.bridge.on_log(state, args, logs or {})

    def on_save(self, args, state, control, **kwargs):
        self.bridge.on_trainer_save(self.context(args, state, control, **kwargs))

    def on_train_end(self, args, state, control, **kwargs):
        self.bridge.on_train_end(self.context(args, state, control, **kwargs))


def evaluate_now(trainer: Any, control: Any) -> dict:
    if trainer.eval_dataset is None:
        raise CommandError("this run has no eval dataset")
    # Trainer.evaluate() logs through the callback handler, which clears should_log: keep this step's
    # training log. (Its clearing should_evaluate is right: this was the step's evaluation.)
    should_log = control.should_log
    metrics = trainer.evaluate()
    control.should_log = should_log
    return metrics


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

"""A plain PyTorch loop, steered: the loop keeps its own schedule, data and logging; the core applies
the commands at each step boundary.

A nanoGPT-style loop changes in five lines:

    steer = selfsteer.attach(model, optimizer, max_steps=max_iters, evaluate=estimate_loss, eval_every=250)
    for it in steer.steps():                                   # was: for it in range(max_iters)
        lr = steer.lr(get_lr(it))                              # was: lr = get_lr(it)
        for group in optimizer.param_groups: group["lr"] = lr
        ...forward, backward...
        if steer.max_grad_norm: clip_grad_norm_(model.parameters(), steer.max_grad_norm)  # was: grad_clip
        optimizer.step()
        steer.log(loss=loss.item(), learning_rate=lr)          # added

(`evaluate` returns {"loss": x}; it is logged as eval_loss.)

`steps()` is where the commands apply: between two iterations it takes what is pending, holds while
paused, ends the loop on stop, and after a rollback (`load_checkpoint`) it goes on from the
checkpoint's step, on a new branch, with the model, the optimizer, the steered lr and the RNG of the
checkpoint. `steer.lr(x)` is the loop's scheduled lr times the scale the commands set, so a new lr
sticks through any schedule. A loop that sets no lr of its own needs no `steer.lr`: the commands set
the optimizer's groups. A loop that clips gradients reads `steer.max_grad_norm`.

With accelerate, pass `accelerator=`: the checkpoints unwrap the model, and `accelerator.save_state()`
carries the steering state (`register_for_checkpointing`). Under torchrun rank 0 serves and decides;
every rank applies the same commands at the same step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from selfsteer.trainer_bridge.bridge import Bridge
from selfsteer.trainer_bridge.commands import CommandError, CommandRegistry
from selfsteer.trainer_bridge.config import BridgeConfig
from selfsteer.trainer_bridge.loop import LoopArgs, LoopControl, LoopState, StepContext
from selfsteer.trainer_bridge.optim import LrScale
from selfsteer.trainer_bridge.store import DEFAULT_DB_PATH


class Steer:
    """The handle a plain loop holds: `steps()`, `lr()`, `log()`, `max_grad_norm`, `state_dict()`."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        max_steps: int,
        evaluate: Callable[[], dict] | None = None,
        eval_every: int | None = None,
        train_step: Callable[[int], Any] | None = None,
        probe_evaluate: Callable[[], dict] | None = None,
        lr_scheduler: Any = None,
        max_grad_norm: float | None = None,
        batch_size: int | None = None,
        output_dir: str | os.PathLike = "selfsteer-run",
        accelerator: Any = None,
        name: str = "plain",
        host: str = "127.0.0.1",
        port: int | None = 7007,
        token: str | None = None,
        db: str | os.PathLike | None = None,
        run_config: dict | None = None,
        data_factories: dict[str, Any] | None = None,
        commands: CommandRegistry | None = None,
        announce: bool = True,
        start_paused: bool = False,
        keep_start: bool | None = None,
        replay_of: str | None = None,
        update_alignment: bool | None = None,
    ):
        """max_steps: the loop's optimizer steps. evaluate: a function returning eval metrics (the
        `evaluate` command calls it; keys are logged with an `eval_` prefix). eval_every: also evaluate at
        every step boundary that is a multiple of it (0 included), after the boundary's commands. lr_scheduler: a torch
        scheduler the loop steps itself, if any (then the commands scale its base lrs; without one the
        loop asks `steer.lr`). max_grad_norm: the clipping norm the loop starts with (read
        `steer.max_grad_norm`). train_step: one iteration of the loop as a function, `train_step(it)`
        (batch, forward, backward, clip, optimizer step; returns the loss): with it a `probe` can train
        candidate lrs from a snapshot (the loop may call it too). probe_evaluate: a cheaper evaluation for
        probes (default `evaluate`; one that draws random batches draws the same ones each time).
        batch_size: examples per optimizer step on one process (for samples/s).
        start_paused: hold at step 0 until a `resume` (a supervisor or a person looks first).
        keep_start: keep a copy of the weights at step 0, for a probe's restart arms (`BridgeConfig`;
        default: for a model of at most 50M trained parameters).
        replay_of: a run of this loop in the same store whose journaled commands are applied again at
        their steps (the loop itself must be the same, with the same seed; a run that went back to an
        earlier step replays each command at its first visit of its step). update_alignment: log the
        `update_alignment` of every step at the iteration that took it (one float32 copy of the
        parameters; see `BridgeConfig`). The rest is the control server's and the store's, as in
        `BridgeConfig`."""
        if accelerator is not None:
            model = accelerator.unwrap_model(model)
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module  # checkpoints hold the model's own names, loadable without the wrapper
        self.model = model
        self.optimizer = optimizer
        self.lr_scale = LrScale(optimizer)
        self.lr_scheduler = lr_scheduler
        self.user_evaluate = evaluate
        self.user_train_step = train_step
        self.probe_evaluate = probe_evaluate or evaluate
        self._probing = False
        self.eval_every = eval_every
        self.args = LoopArgs(str(output_dir), max_grad_norm, batch_size)
        self.state = LoopState(0, max_steps)
        self.control = LoopControl()
        self._started = self._ended = False
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        config = BridgeConfig(
            host=host, port=port, token=token, db=db or DEFAULT_DB_PATH, run_name=name,
            run_kind="replay" if replay_of else "train",
            run_config={"loop": "plain", "max_steps": max_steps, **(run_config or {})},
            checkpoint_dir=str(Path(output_dir) / "checkpoints"), auto_finish=False, announce=announce,
            start_paused=start_paused, keep_start=keep_start, replay_of=replay_of, update_alignment=update_alignment,
        )  # the plain loop's bridge settings # fmt: skip
        self.bridge = Bridge(config, registry=commands, data_factories=data_factories)
        self.bridge.step_log_offset = -1  # the loop logs iteration `it`'s loss at step `it`
        if accelerator is not None:
            accelerator.register_for_checkpointing(self)

    # ---- what the loop calls

    @property
    def url(self) -> str | None:
        return self.bridge.url

    @property
    def step(self) -> int:
        """Optimizer steps done: the step the loop is at."""
        return self.state.global_step

    @property
    def max_grad_norm(self) -> float | None:
        """The clipping norm in force (set_max_grad_norm changes it; 0 or None: no clipping)."""
        return self.args.max_grad_norm

    @property
    def stopped(self) -> bool:
        return self.control.should_training_stop

    def steps(self) -> Iterator[int]:
        """The loop's step numbers, from 0 (or where `load_state_dict` put the loop) to `max_steps`,
        with the boundary between each two: commands apply, a pause holds, a stop ends the loop, a
        rollback goes back to the checkpoint's step."""
        if self._started:
            raise RuntimeError("steps() runs once per attach")
        self._started = True
        self.bridge.on_train_begin(self._context())
        self._evaluate_when_due()
        clean = False
        try:
            while self.state.global_step < self.state.max_steps and not self.stopped:
                yield self.state.global_step
                self.state.global_step += 1
                self.bridge.boundary(self._context())
                self._evaluate_when_due()
            clean = True
        finally:
            # A loop that breaks out early closes this generator: the run ends as stopped.
            self.close(None if clean else "stopped")

    def lr(self, scheduled: float) -> float:
        """The lr for this step: the loop's schedule gives `scheduled`; the commands' scale applies."""
        return self.lr_scale(scheduled)

    def log(self, step: int | None = None, **metrics: float) -> None:
        """Records metrics at `step` (default: the step the loop is at) on the current branch:
        `loss`, `learning_rate`, `eval_loss`, anything numeric. They reach the dashboard and the
        supervisors."""
        if self._probing:  # a probe's arms train off the record
            return
        state = LoopState(self.state.global_step if step is None else step, self.state.max_steps)
        values = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        self.bridge.on_log(state, self.args, values, branch=self.bridge.branch)

    def close(self, status: str | None = None, error: str | None = None) -> None:
        """Ends the run in the store (finished, stopped or failed) and stops the server. Once."""
        if self._ended:
            return
        self._ended = True
        try:
            if not self.bridge.training_done:
                self.bridge.on_train_end(self._context())
            if self.bridge.is_main:
                self.bridge.finish(status, summary={"steps": self.state.global_step}, error=error)
        finally:
            self.bridge.close()

    def __enter__(self) -> Steer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.close("failed", error=f"the loop failed: {type(exc).__name__}: {exc}")
        else:
            self.close()

    # ---- the loop's own checkpoints (torch.save(steer.state_dict()) beside the model's)

    def state_dict(self) -> dict:
        return {
            "step": self.state.global_step,
            "branch": self.bridge.branch,
            "lr": self.lr_scale.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Goes on from a checkpoint of the loop's own: its step and steered lr."""
        self.state.global_step = int(state["step"])
        self.lr_scale.load_state_dict(state["lr"])

    # ---- the core's side

    def _context(self) -> StepContext:
        return StepContext(
            self.bridge,
            self.args,
            self.state,
            self.control,
            model=self.model,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler if self.lr_scheduler is not None else self.lr_scale,
            evaluate=self._evaluate,
            goto=self._go_to,
            train_step=self._probe_step if self.user_train_step is not None else None,
            eval_slice=self._probe_loss if self.probe_evaluate is not None else None,
        )

    @contextlib.contextmanager
    def _off_the_record(self) -> Iterator[None]:
        """What the loop's own functions log while a probe runs them is dropped (see `log`)."""
        self._probing = True
        try:
            yield
        finally:
            self._probing = False

    def _probe_step(self, i: int) -> float:
        with self._off_the_record():
            loss = self.user_train_step(self.state.global_step + i)
        return float(loss.item() if isinstance(loss, torch.Tensor) else loss)

    def _probe_loss(self) -> float:
        with self._off_the_record():
            metrics = self.probe_evaluate()
        for key in ("loss", "eval_loss"):
            if key in metrics:
                return float(metrics[key])
        raise CommandError(
            f"the probe's evaluation gave no 'loss' (it gave {', '.join(metrics) or 'nothing'})"
        )

    def _evaluate(self) -> dict:
        if self.user_evaluate is None:
            raise CommandError("this loop gave selfsteer.attach() no evaluate function")
        metrics = self.user_evaluate()
        named = {(k if k.startswith("eval_") else f"eval_{k}"): v for k, v in metrics.items()}
        self.log(**named)
        return named

    def _evaluate_when_due(self) -> None:
        if self.eval_every and self.user_evaluate is not None and self.step % self.eval_every == 0:
            self._evaluate()

    def _go_to(self, step: int) -> None:
        # The rest of this boundary, and the loop after it, go on from the checkpoint's step.
        self.state.global_step = step


def attach(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Steer:
    """Steers a plain PyTorch loop; see `Steer` for the keywords and the module docstring for the loop.
    Serves the control API and the dashboard (default http://127.0.0.1:7007; `port=0`: any free port)."""
    return Steer(model, optimizer, **kwargs)

"""What an adapter hands the steering core at each optimizer-step boundary: the `StepContext` (the live
model, optimizer and scheduler, and the loop's args / state / control), and `LoopArgs`, `LoopState` and
`LoopControl`, the loop's own under the field names of the Trainer's (an adapter of the Trainer passes the
Trainer's objects instead). Command handlers (`commands`, `handlers`, `probe`) take a `StepContext`.

A leaf: nothing here imports the core, so the command set imports it without an import cycle."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class LoopArgs:
    """The settings of a loop that a command reads or changes, under the names of the Trainer's
    `TrainingArguments` (an adapter of the Trainer passes those; other adapters pass this)."""

    output_dir: str = "."
    max_grad_norm: float | None = None  # the clipping norm the loop should use (set_max_grad_norm)
    per_device_train_batch_size: int | None = None  # for samples/s; None: not reported
    gradient_accumulation_steps: int = 1


@dataclass
class LoopState:
    """Where a loop is, under the names of the Trainer's `TrainerState`."""

    global_step: int = 0  # optimizer steps done
    max_steps: int = 0
    epoch: float | None = None


@dataclass
class LoopControl:
    """What a command asks of the loop after this boundary, under the names of `TrainerControl`."""

    should_training_stop: bool = False
    should_evaluate: bool = False
    should_log: bool = False
    should_save: bool = False


@dataclass
class StepContext:
    """What a command handler gets: the live objects at the boundary where it is applied.

    `args`, `state` and `control` are the Trainer's own objects under the Trainer, a `LoopArgs`,
    `LoopState` and `LoopControl` elsewhere. `evaluate` runs an evaluation now and returns its metrics
    (None: the loop evaluates when `control.should_evaluate` asks it to). `goto` (a plain loop's) moves
    the loop to another step after a rollback. `train_step` and `eval_slice` (when the adapter gives
    them) let a `probe` train candidate lrs from a snapshot."""

    bridge: Any  # the `bridge.Bridge` whose boundary this is (not imported: this module is a leaf)
    args: Any
    state: Any
    control: Any
    model: torch.nn.Module | None = None
    optimizer: Any = None
    lr_scheduler: Any = None
    train_dataloader: Any = None
    eval_dataloader: Any = None
    evaluate: Callable[[], dict] | None = None
    goto: Callable[[int], None] | None = field(default=None, repr=False)
    # What a probe needs of the loop (trainer_bridge/probe.py): one optimizer step on the i-th probe
    # batch, returning its loss; the mean loss on a small fixed evaluation slice.
    train_step: Callable[[int], float] | None = field(default=None, repr=False)
    eval_slice: Callable[[], float] | None = field(default=None, repr=False)

    @property
    def step(self) -> int:
        return self.state.global_step

    @property
    def trainer(self) -> Any:
        return self.bridge.trainer


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of its loop (0 and 1 when it trains alone)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    # Before the process group exists, torchrun/accelerate's environment says it.
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))

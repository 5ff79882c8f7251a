"""PyTorch Lightning, steered: one callback.

    from selfsteer.integrations.lightning import SteerCallback
    trainer = lightning.Trainer(max_steps=1000, callbacks=[SteerCallback(port=7007)])
    trainer.fit(model, train_loader, val_loader)      # steerable at http://127.0.0.1:7007

Each optimizer step ends at a boundary (`on_train_batch_end` once the global step has moved; the start
of training is step 0). The loss the training step returned and the optimizer's lr are logged every
step; the validation metrics whose names start with `val` are logged as `eval_...` (`val_loss` is
`eval_loss`). A stop sets `trainer.should_stop`; set_max_grad_norm sets `trainer.gradient_clip_val`;
evaluate runs the validation loop now, as Lightning's own loop does at `val_check_interval`; a
rollback loads weights, optimizer, scheduler and RNG, and the step counter keeps counting on a new
branch, as under the HF Trainer. The callback's `state_dict` carries the branch in Lightning's own
checkpoints. Works with `import lightning` and with `import pytorch_lightning`.

A `probe` (trainer_bridge/probe.py) trains with the module's own `training_step` on batches drawn from
the training data by the step alone, steps the optimizer and the per-step schedulers as Lightning's loop
does, and measures the loss `training_step` gives on the first `PROBE_EVAL_EXAMPLES` validation examples
(a `validation_step` logs, and returns nothing to read). What the module logs meanwhile is dropped: the
probe's steps are not the run's. It needs automatic optimization.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback

from selfsteer.trainer_bridge.bridge import Bridge
from selfsteer.trainer_bridge.commands import CommandError, CommandRegistry
from selfsteer.trainer_bridge.config import BridgeConfig
from selfsteer.trainer_bridge.loop import LoopArgs, LoopControl, LoopState, StepContext

PROBE_EVAL_EXAMPLES = 64  # the fixed validation slice a probe measures its arms on, as the HF adapter's


class SteerCallback(Callback):
    """Serves a control API for the Lightning run it is given to; keywords are `BridgeConfig`'s."""

    def __init__(
        self,
        config: BridgeConfig | None = None,
        *,
        commands: CommandRegistry | None = None,
        data_factories: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ):
        if config is not None and config_kwargs:
            raise TypeError("give a BridgeConfig or its keywords, not both")
        config = config or BridgeConfig(**{"run_name": "lightning", **config_kwargs})
        self.bridge = Bridge(config, registry=commands, data_factories=data_factories)
        self.args = LoopArgs()
        self._last_step = -1

    @property
    def url(self) -> str | None:
        return self.bridge.url

    # ---- Lightning's hooks

    def on_train_start(self, trainer, pl_module) -> None:
        self.bridge.trainer = trainer
        self.args = LoopArgs(
            output_dir=trainer.default_root_dir,
            max_grad_norm=trainer.gradient_clip_val,
            per_device_train_batch_size=None,
            gradient_accumulation_steps=trainer.accumulate_grad_batches,
        )
        self._last_step = trainer.global_step
        self._run_boundary(trainer, pl_module, first=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:
            return  # accumulating gradients: no optimizer step yet
        self._last_step = trainer.global_step
        logs = {"learning_rate": trainer.optimizers[0].param_groups[0]["lr"]} if trainer.optimizers else {}
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            logs["loss"] = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
        # The step just taken ran on the branch in force since the last boundary.
        self.bridge.on_log(self._state(trainer), self.args, logs, branch=self.bridge.branch)
        self._run_boundary(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.bridge.on_log(self._state(trainer), self.args, eval_metrics(trainer.callback_metrics))

    def on_train_end(self, trainer, pl_module) -> None:
        self.bridge.on_train_end(self._context(trainer, pl_module))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.bridge.finish("failed", error=f"training failed: {type(exception).__name__}: {exception}")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.bridge.trainer = None
            self.bridge.close()

    def state_dict(self) -> dict:
        return {"branch": self.bridge.branch}

    # ---- the core's side

    def _state(self, trainer) -> LoopState:
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if max_steps is None:
            estimated = trainer.estimated_stepping_batches
            max_steps = int(estimated) if math.isfinite(estimated) else 0
        return LoopState(trainer.global_step, max_steps, float(trainer.current_epoch))

    def _context(self, trainer, pl_module) -> StepContext:
        schedulers = trainer.lr_scheduler_configs
        return StepContext(
            self.bridge,
            self.args,
            self._state(trainer),
            LoopControl(should_training_stop=trainer.should_stop),
            model=pl_module,
            optimizer=trainer.optimizers[0] if trainer.optimizers else None,
            lr_scheduler=schedulers[0].scheduler if schedulers else None,
            evaluate=lambda: self._validate_now(trainer),
            train_step=lambda i: self._probe_step(trainer, pl_module, i),
            eval_slice=lambda: self._probe_loss(trainer, pl_module),
        )

    def _run_boundary(self, trainer, pl_module, first: bool = False) -> None:
        ctx = self._context(trainer, pl_module)
        if first:
            self.bridge.on_train_begin(ctx)
        else:
            self.bridge.boundary(ctx)
        if ctx.control.should_training_stop:
            trainer.should_stop = True
        trainer.gradient_clip_val = self.args.max_grad_norm or None

    def _validate_now(self, trainer) -> dict:
        """Lightning's own validation loop, run as its training loop runs it at val_check_interval."""
        loop = trainer.fit_loop.epoch_loop
        if not loop.val_loop._data_source.is_defined():
            raise CommandError("this run has no validation data")
        first_iter = trainer._logger_connector._first_loop_iter
        trainer.validating = True
        try:
            loop.val_loop.run()
        finally:
            trainer.training = True
            trainer._logger_connector._first_loop_iter = first_iter
        return eval_metrics(trainer.callback_metrics)

    # ---- probes

    def _probe_step(self, trainer, pl_module, i: int) -> float:
        """One optimizer step on the i-th probe batch of this boundary, as Lightning's automatic loop takes
        it (accumulation, clipping, per-step schedulers); returns its loss."""
        if not pl_module.automatic_optimization:
            raise CommandError(
                "a probe needs automatic optimization (this module steps its optimizer itself)"
            )
        loader = _indexable(trainer.train_dataloader, "training")
        generator = torch.Generator().manual_seed(trainer.global_step * 1009 + i)
        accumulate = trainer.accumulate_grad_batches
        optimizer = trainer.optimizers[0]
        loss = 0.0
        with _quiet(pl_module):
            for _ in range(accumulate):
                ids = torch.randint(len(loader.dataset), (loader.batch_size,), generator=generator).tolist()
                batch = trainer.strategy.batch_to_device(loader.collate_fn([loader.dataset[j] for j in ids]))
                value = _loss(pl_module.training_step(batch, 0))
                (value / accumulate).backward()
                loss += float(value.detach()) / accumulate
        if trainer.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(pl_module.parameters(), trainer.gradient_clip_val)
        optimizer.step()
        # The scheduler the snapshot holds (the first), per step, as the loop steps it; a plateau scheduler
        # steps on validation metrics.
        schedulers = trainer.lr_scheduler_configs[:1]
        if (
            schedulers
            and schedulers[0].interval == "step"
            and not isinstance(schedulers[0].scheduler, ReduceLROnPlateau)
        ):
            schedulers[0].scheduler.step()
        optimizer.zero_grad()
        return loss

    @torch.no_grad()
    def _probe_loss(self, trainer, pl_module) -> float:
        """The mean of `training_step`'s loss over the first validation examples, in eval mode."""
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if loader is None:
            raise CommandError("this run has no validation data for a probe to measure on")
        loader = _indexable(loader, "validation")
        n = min(PROBE_EVAL_EXAMPLES, len(loader.dataset))
        size = loader.batch_size or n
        was_training = pl_module.training
        pl_module.eval()
        total = 0.0
        try:
            with _quiet(pl_module):
                for start in range(0, n, size):
                    rows = list(range(start, min(start + size, n)))
                    batch = trainer.strategy.batch_to_device(
                        loader.collate_fn([loader.dataset[j] for j in rows])
                    )
                    total += float(_loss(pl_module.training_step(batch, 0))) * len(rows)
        finally:
            pl_module.train(was_training)
        return total / n


def _indexable(loader: Any, what: str) -> Any:
    dataset = getattr(loader, "dataset", None)
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise CommandError(
            f"a probe draws its batches by index, and this run's {what} data is no indexed dataset"
        )
    return loader


def _loss(output: Any) -> torch.Tensor:
    return output["loss"] if isinstance(output, dict) else output


@contextlib.contextmanager
def _quiet(pl_module):
    """What the module logs is dropped: a probe's steps are not the run's."""
    pl_module.log, pl_module.log_dict = (lambda *a, **k: None), (lambda *a, **k: None)
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict  # the class's own again


def eval_metrics(metrics: dict) -> dict[str, float]:
    """Lightning's validation metrics under the API's names: `val_loss` and `val/loss` are `eval_loss`."""
    out = {}
    for name, value in metrics.items():
        match = re.fullmatch(r"val(?:idation)?[_/](.+)", name)
        if match:
            out[f"eval_{match.group(1).replace('/', '_')}"] = float(value)
    return out

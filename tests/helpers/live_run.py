"""Helpers for tests that drive a real run (`from helpers.live_run import LiveRun`; not part of the
shipped package): a recipe training in a background thread behind a real server on a free loopback port,
gates that hold the training thread at chosen steps, and `serving` (an ASGI app on a free port).

    with LiveRun(tmp_path, gates=[5]) as live:
        live.gate.wait(5)              # the training thread is inside step 5's on_step_end
        uuid = live.client.set_lr(0.01)["uuid"]
        live.gate.release(5)           # the bridge applies the command at step 5
        summary = live.join()
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from selfsteer.trainer_bridge.net import serving  # noqa: F401 - the tests import it from here
from selfsteer.trainer_bridge.recipe import load_recipe
from selfsteer.trainer_bridge.runner import BackgroundRun


class StepGate(TrainerCallback):
    """Holds training at the end of the given steps until released. Added before the bridge's callback,
    so commands sent while a step is held are applied at that very step."""

    def __init__(self, steps: list[int], timeout: float = 60.0):
        self.timeout = timeout
        self.reached = {step: threading.Event() for step in steps}
        self.released = {step: threading.Event() for step in steps}

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step in self.reached:
            self.reached[step].set()
            if not self.released[step].wait(self.timeout):
                raise TimeoutError(f"step {step} was never released")

    def wait(self, step: int, timeout: float | None = None) -> None:
        if not self.reached[step].wait(timeout or self.timeout):
            raise TimeoutError(f"training never reached step {step}")

    def release(self, step: int) -> None:
        self.released[step].set()

    def release_all(self) -> None:
        for event in self.released.values():
            event.set()


class LrRecorder(TrainerCallback):
    """The lr each optimizer step really used: read from the optimizer just before the step."""

    def __init__(self) -> None:
        self.lr: dict[int, float] = {}

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lr[state.global_step + 1] = optimizer.param_groups[0]["lr"]


class LiveRun(BackgroundRun):
    """`BackgroundRun` of a recipe (default tiny) in `tmp_path`, with step gates and an lr recorder."""

    def __init__(
        self,
        tmp_path: Path,
        overrides: list[str] | None = None,
        recipe: str = "tiny",
        gates: list[int] | None = None,
        callbacks: list | None = None,
        **run_kwargs: Any,
    ):
        self.gate = StepGate(gates or [])
        self.recorder = LrRecorder()
        self.db = Path(tmp_path) / "selfsteer.sqlite"
        super().__init__(
            load_recipe(recipe, overrides),
            Path(tmp_path) / "out",
            callbacks=[self.gate, self.recorder, *(callbacks or [])],
            db=self.db,
            **run_kwargs,
        )

    def join(self, timeout: float = 120.0) -> dict:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.gate.release_all()
        return super().join(0)

    def __exit__(self, *exc_info: Any) -> None:
        self.gate.release_all()
        super().__exit__(*exc_info)

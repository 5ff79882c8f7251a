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

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from selfsteer.trainer_bridge.client import BridgeClient
from selfsteer.trainer_bridge.recipe import load_recipe
from selfsteer.trainer_bridge.runner import RecipeRun


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


class LiveRun:
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
        run_kwargs.setdefault("port", 0)
        self.run = RecipeRun(
            load_recipe(recipe, overrides),
            out_dir=Path(tmp_path) / "out",
            db=self.db,
            callbacks=[self.gate, self.recorder, *(callbacks or [])],
            **run_kwargs,
        )
        self.bridge = self.run.bridge
        self.client = BridgeClient(self.run.url, token=run_kwargs.get("token")) if self.run.url else None
        self.summary: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._train, name="trainer", daemon=True)

    def _train(self) -> None:
        try:
            self.summary = self.run.train()
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def start(self) -> LiveRun:
        self.thread.start()
        return self

    def join(self, timeout: float = 120.0) -> dict:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.gate.release_all()
            raise TimeoutError("training did not finish")
        if self.error is not None:
            raise self.error
        return self.summary

    def __enter__(self) -> LiveRun:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.gate.release_all()
        if self.bridge is not None and self.bridge.paused:
            with contextlib.suppress(Exception):  # the run may be over already
                self.client.resume()
        self.thread.join(60)
        if self.client is not None:
            self.client.close()
        self.run.close()


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """An ASGI app on uvicorn in a thread, on a free loopback port, for the length of the block;
    yields its base URL (http://127.0.0.1:PORT). The socket listens before the URL is handed out."""
    import uvicorn

    from selfsteer.trainer_bridge.net import bind

    sock, url, _ = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

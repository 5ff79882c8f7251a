"""A torchrun worker for tests/test_bridge_ddp.py, launched by its path:

    torchrun --standalone --nproc_per_node 2 tests/helpers/bridge_ddp_worker.py DIR [overrides]

(or the same script under `accelerate launch`; tests/test_bridge_ddp.py has both command lines). Run as a
script, its own folder (tests/helpers) is on sys.path, so it imports `live_run` as a top-level module.

Each rank trains the tiny recipe on CPU (gloo); rank 0 serves on a free port and writes its URL to
DIR/url. Rank 0 holds at the steps named in DIR/gates (one a line) until the test creates
DIR/release-STEP, so the test can send commands that land on a known step. At the end every rank writes
DIR/rank-R.json: the lr each step used, a checksum of its weights, its branch and max_grad_norm.

With DIR/steal holding a command source, another process "takes" the commands of that source: right
after rank 0 lists the pending commands at a boundary, a second connection to the store journals each
of them `failed`, before rank 0 can journal it `running` (the race, made deterministic).
"""

from __future__ import annotations

import faulthandler
import json
import sys
import time
from pathlib import Path

import torch
from live_run import LrRecorder  # tests/helpers/live_run.py: this script's folder is on sys.path
from transformers import TrainerCallback

from selfsteer.trainer_bridge.recipe import load_recipe
from selfsteer.trainer_bridge.runner import RecipeRun, exit_now
from selfsteer.trainer_bridge.store import Store


class FileGate(TrainerCallback):
    def __init__(self, folder: Path, steps: set[int]):
        self.folder = folder
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step in self.steps:
            (self.folder / f"reached-{state.global_step}").touch()
            deadline = time.monotonic() + 120
            while not (self.folder / f"release-{state.global_step}").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"step {state.global_step} was never released")
                time.sleep(0.02)


class GradNormRecorder(TrainerCallback):
    """The max_grad_norm each optimizer step clipped with."""

    def __init__(self) -> None:
        self.values: dict[int, float] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.values[state.global_step + 1] = args.max_grad_norm


def steal_after_listing(store: Store, db: Path, source: str) -> None:
    """Rank 0's store lists pending commands as usual; those from `source` are then failed through a
    separate connection to the same file, as another process would."""
    list_commands = store.list_commands

    def listing(run_id, status=None):
        rows = list_commands(run_id, status=status)
        if status == "pending":
            with Store(db) as other:
                for row in rows:
                    if row["source"] == source:
                        other.update_command(row["uuid"], "failed", error="taken by another process")
        return rows

    store.list_commands = listing


def main(folder: Path, overrides: list[str]) -> None:
    gates = (
        {int(line) for line in (folder / "gates").read_text().split()}
        if (folder / "gates").exists()
        else set()
    )
    recorder, grad_norms = LrRecorder(), GradNormRecorder()
    recipe = load_recipe("tiny", ["training.use_cpu=true", *overrides])
    run = RecipeRun(
        recipe,
        out_dir=folder / "out",
        db=folder / "selfsteer.sqlite",
        port=0,
        callbacks=[FileGate(folder, gates), recorder, grad_norms],
    )
    bridge = run.bridge
    if bridge.is_main and (folder / "steal").exists():
        steal_after_listing(bridge.store, folder / "selfsteer.sqlite", (folder / "steal").read_text().strip())
    if bridge.is_main:
        (folder / "url.tmp").write_text(run.url)
        (folder / "url.tmp").rename(folder / "url")
    summary = run.train()
    model = run.trainer.model
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    report = {
        "rank": bridge.rank,
        "world_size": bridge.world_size,
        "distributed": torch.distributed.is_initialized(),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "distributed_type": run.trainer.accelerator.distributed_type.value,  # the Trainer's accelerate state
        "url": run.url,
        "lr": recorder.lr,
        "checksum": checksum,
        "branch": bridge.branch,
        "max_grad_norm": grad_norms.values,
        "steps": summary["steps"],
        "final_eval_loss": summary["final_eval_loss"],
        "run_id": bridge.run_id,
    }
    (folder / f"rank-{bridge.rank}.json").write_text(json.dumps(report))
    run.close()


if __name__ == "__main__":
    faulthandler.enable()  # a fatal signal in teardown prints every thread's stack in the test's log
    main(Path(sys.argv[1]), sys.argv[2:])
    # The process group is gone (run.close()); nothing is left for interpreter finalization to tear
    # down in an order of its own.
    exit_now(0)

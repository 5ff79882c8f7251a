"""Benchmark: what self-correction's rollback point costs a decision.

Under self-correction every learning-rate change is preceded by a checkpoint (model, optimizer and
scheduler state on disk, through the bridge's `save_checkpoint`), and a failed one is undone by
`load_checkpoint` into a new branch. For each workload this trains a few steps, pauses the run, and
times both commands through the API (POST to journaled success), against the median time of a training
step of the same run; it prints medians over the repeats and the checkpoint's size.

    python -m selfsteer.evals.bench.rollback [--workloads tiny,small,deep-rmsprop] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

from selfsteer.evals.lr_suite import WORKLOADS
from selfsteer.trainer_bridge.recipe import load_recipe
from selfsteer.trainer_bridge.runner import BackgroundRun


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def bench(workload: str, repeats: int) -> dict:
    recipe, overrides = WORKLOADS.get(workload, (workload, []))
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(recipe, [*overrides, "training.max_steps=1000", "training.eval_steps=1000"])
        live = BackgroundRun(recipe, Path(tmp) / "out", db=Path(tmp) / "selfsteer.sqlite", callbacks=[timer])
        client = live.start().client
        while client.state()["step"] < 20:  # warmed up
            time.sleep(0.05)
        client.pause()
        saves, loads = [], []
        for i in range(repeats):
            started = time.perf_counter()
            row = client.wait(client.save_checkpoint(f"bench-{i}")["uuid"])
            saves.append(time.perf_counter() - started)
            assert row["status"] == "success", row
            started = time.perf_counter()
            row = client.wait(client.load_checkpoint(f"bench-{i}", branch=f"bench-{i}")["uuid"])
            loads.append(time.perf_counter() - started)
            assert row["status"] == "success", row
        size = sum(f.stat().st_size for f in Path(row["result"]["path"]).rglob("*") if f.is_file())
        client.stop()
        live.join()
    step = statistics.median(timer.times[2:])
    return {
        "workload": workload,
        "step_s": step,
        "save_s": statistics.median(saves),
        "load_s": statistics.median(loads),
        "size_mb": size / 1e6,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default="tiny,small,deep-rmsprop")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print("| workload | step s | save s (rollback point) | load s (rollback) | save in steps | size MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for workload in args.workloads.split(","):
        r = bench(workload, args.repeats)
        print(
            f"| {workload} | {r['step_s']:.3f} | {r['save_s']:.3f} | {r['load_s']:.3f} | "
            f"{r['save_s'] / r['step_s']:.1f} | {r['size_mb']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

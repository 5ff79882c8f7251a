"""A plain PyTorch loop steered by `selfsteer.attach` under torchrun: two CPU ranks on gloo, the model in
DistributedDataParallel (wrapped by the loop itself, or by an accelerate `Accelerator`). Only rank 0 serves
and decides; every command is broadcast and applied at the same step on both ranks. The worker
(tests/helpers/plain_ddp_worker.py) sends the commands from rank 0's loop body at chosen iterations, so
each lands at a known boundary whatever the machine's speed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from selfsteer.trainer_bridge.store import Store

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "helpers" / "plain_ddp_worker.py"
PEAK, WARMUP = 0.01, 4


def get_lr(it: int) -> float:  # the worker's schedule
    return PEAK * (it + 1) / WARMUP if it < WARMUP else PEAK * (1 - 0.02 * (it - WARMUP))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(folder: Path, mode: str, timeout: float = 240.0) -> list[dict]:
    """Two ranks of the worker under torchrun; returns both ranks' reports once both exited 0. Whatever
    happens, the launcher and its workers are gone afterwards (a session of their own)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(WORKER), str(folder), mode,
    ]  # the torchrun command as typed # fmt: skip
    with open(folder / "log", "wb") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the workers too, even when the launcher is done
            proc.wait()
    text = (folder / "log").read_text()
    assert proc.returncode == 0, text[-4000:]
    return [json.loads((folder / f"rank-{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("mode", ["ddp", "accelerate"])
def test_both_ranks_apply_lr_checkpoint_rollback_evaluate_and_stop_at_the_same_steps(tmp_path, mode):
    ranks = launch(tmp_path, mode)
    assert [(r["rank"], r["world_size"], r["backend"], r["mode"]) for r in ranks] == [
        (0, 2, "gloo", mode),
        (1, 2, "gloo", mode),
    ]
    assert ranks[0]["url"] and ranks[1]["url"] is None and ranks[1]["run_id"] is None  # only rank 0 serves

    # The same steps, lrs and branches on both ranks, iteration by iteration.
    seen = [[(s["it"], s["step"], s["lr"], s["branch"]) for s in r["steps"]] for r in ranks]
    assert seen[0] == seen[1]
    its = [s["it"] for s in ranks[0]["steps"]]
    assert its == [*range(11), *range(6, 16)]  # main 0..10, rollback to 6, stopped after 15
    branches = [s["branch"] for s in ranks[0]["steps"]]
    assert branches == ["main"] * 11 + ["retry"] * 10
    main = {s["it"]: s for s in ranks[0]["steps"] if s["branch"] == "main"}
    retry = {s["it"]: s for s in ranks[0]["steps"] if s["branch"] == "retry"}
    factor = 0.004 / get_lr(3)  # set_lr(0.004) at step 4: relative to what the schedule gave step 3
    for it in range(4):
        assert main[it]["lr"] == pytest.approx(get_lr(it), rel=1e-12)
    for it in range(4, 8):
        assert main[it]["lr"] == pytest.approx(get_lr(it) * factor, rel=1e-9)
    for it in range(8, 11):  # set_lr(0.03) at step 8, after the checkpoint
        assert main[it]["lr"] == pytest.approx(get_lr(it) * factor * 0.03 / (get_lr(7) * factor), rel=1e-9)
    for it in range(6, 16):  # the checkpoint's steered lr again: the rollback undid the raise
        assert retry[it]["lr"] == pytest.approx(get_lr(it) * factor, rel=1e-9)

    # On each rank the rollback restored weights, optimizer and RNG: the branch's first steps (before the
    # raised lr made a difference) lose exactly what main's did, on that rank's own shard.
    for report in ranks:
        losses = {(s["branch"], s["it"]): s["loss"] for s in report["steps"]}
        for it in (6, 7, 8):
            assert losses["retry", it] == losses["main", it]
        assert losses["retry", 9] != losses["main", 9]
    assert ranks[0]["steps"][6]["loss"] != ranks[1]["steps"][6]["loss"]  # the ranks trained on other shards

    # The stop ended both ranks at the same step, with the same weights and the same evaluation.
    assert [(r["final_step"], r["stopped"], r["branch"]) for r in ranks] == [(16, True, "retry")] * 2
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert len(ranks[0]["evaluations"]) == 1 and ranks[0]["evaluations"] == ranks[1]["evaluations"]

    with Store(tmp_path / "runs.db") as store:
        run = store.get_run(ranks[0]["run_id"])
        rows = {int(it): store.get_command(s["uuid"]) for it, s in ranks[0]["sent"].items()}
        metrics = store.get_metrics(run["id"], names=["loss"])
    assert run["status"] == "stopped" and run["summary"] == {"steps": 16}
    assert {it: (r["type"], r["status"], r["step"]) for it, r in rows.items()} == {
        3: ("set_optimizer", "success", 4),
        5: ("save_checkpoint", "success", 6),
        7: ("set_optimizer", "success", 8),
        10: ("load_checkpoint", "success", 11),
        12: ("evaluate", "success", 13),
        15: ("stop", "success", 16),
    }
    assert rows[10]["result"]["checkpoint_step"] == 6 and rows[10]["result"]["continues_at"] == 6
    assert rows[12]["result"]["eval_loss"] == pytest.approx(ranks[0]["evaluations"][0])
    assert sorted(m["step"] for m in metrics if m["branch"] == "retry") == list(range(6, 16))
    # Written once, by rank 0, with the unwrapped model's own names (no DDP `module.` prefix).
    folder = tmp_path / "out" / "checkpoints" / "at-6"
    assert set(load_file(str(folder / "model.safetensors"))) == {"0.weight", "0.bias", "2.weight", "2.bias"}

"""Two CPU processes under torchrun or `accelerate launch` (gloo): only rank 0 serves; every command is
broadcast and applied at the same step on both ranks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfsteer.trainer_bridge.client import BridgeClient
from selfsteer.trainer_bridge.store import Store


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the launcher exited with {proc.returncode} before {path.name}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {path.name} after {timeout} s")
        time.sleep(0.05)


BIN = os.path.dirname(sys.executable)
WORKER = [str(Path(__file__).resolve().parent / "helpers" / "bridge_ddp_worker.py")]  # launched by path
# Two local processes on a free port. accelerate's `--cpu` alone starts a single process (its multi-CPU
# path wants mpirun), so accelerate is asked for its torch.distributed launcher (`--multi_gpu`, which needs
# no GPU) and the recipe's `use_cpu` makes the Trainer's accelerate state MULTI_CPU on gloo, as under
# torchrun. Every setting is on the command line: no accelerate config file is needed.
LAUNCHERS = {
    "torchrun": (shutil.which("torchrun", path=BIN), ["--standalone", "--nproc_per_node", "2"]),
    "accelerate": (
        shutil.which("accelerate", path=BIN),
        ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0"]
        + ["--mixed_precision", "no", "--dynamo_backend", "no"],
    ),
}
needs_torchrun = pytest.mark.skipif(LAUNCHERS["torchrun"][0] is None, reason="no torchrun")
OVERRIDES = ["training.max_steps=12", "training.ddp_find_unused_parameters=false", "training.eval_steps=100"]


@contextlib.contextmanager
def launched(folder: Path, launcher: str = "torchrun", overrides: list[str] = OVERRIDES):
    """Two ranks of the worker (WORKER) on `folder` under `launcher`; yields the process once rank 0 serves.
    Whatever happens, the launcher and its workers are gone afterwards and the log is printed."""
    program, options = LAUNCHERS[launcher]
    if program is None:
        pytest.skip(f"no {launcher}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(folder / "log", "wb")  # noqa: SIM115 - closed in finally
    # A session of its own, so a failing test can end the launcher *and* its workers (SIGKILL on the
    # launcher alone would leave them orphaned, waiting in a collective).
    proc = subprocess.Popen(
        [program, *options, *WORKER, str(folder), *overrides],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(folder / "url", proc)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the workers too, even when the launcher is done
        proc.wait()
        log.close()
        print((folder / "log").read_text()[-3000:])


def finish(folder: Path, proc: subprocess.Popen) -> list[dict]:
    """Waits for a clean end; returns both ranks' reports."""
    proc.wait(timeout=180)
    assert proc.returncode == 0, (folder / "log").read_text()[-3000:]
    return [json.loads((folder / f"rank-{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_ranks_apply_the_same_commands_at_the_same_steps(tmp_path, launcher):
    (tmp_path / "gates").write_text("3\n6\n")
    with launched(tmp_path, launcher) as proc:
        client = BridgeClient((tmp_path / "url").read_text())
        wait_for(tmp_path / "reached-3", proc)
        sent = [
            client.set_lr(0.01),
            client.save_checkpoint("c3"),
            client.set_max_grad_norm(0.5),
            client.pause(),
        ]
        (tmp_path / "release-3").touch()
        client.wait(sent[-1]["uuid"])
        time.sleep(0.3)  # paused: both ranks wait at step 3
        assert client.state()["step"] == 3 and client.state()["paused"]
        sent.append(client.resume())
        wait_for(tmp_path / "reached-6", proc)
        sent += [client.load_checkpoint("c3", branch="b"), client.evaluate()]
        (tmp_path / "release-6").touch()
        ranks = finish(tmp_path, proc)
        with Store(tmp_path / "selfsteer.sqlite") as store:  # the server is gone with the run
            rows = [store.get_command(s["uuid"]) for s in sent]
        client.close()

    assert [(r["type"], r["status"], r["step"]) for r in rows] == [
        ("set_optimizer", "success", 3),
        ("save_checkpoint", "success", 3),
        ("set_max_grad_norm", "success", 3),
        ("pause", "success", 3),
        ("resume", "success", 3),
        ("load_checkpoint", "success", 6),
        ("evaluate", "success", 6),
    ]
    assert [r["distributed"] for r in ranks] == [True, True] and ranks[0]["world_size"] == 2
    assert {(r["distributed_type"], r["backend"]) for r in ranks} == {("MULTI_CPU", "gloo")}
    assert ranks[0]["url"] and ranks[1]["url"] is None and ranks[1]["run_id"] is None  # only rank 0 serves
    # The same lr at every step on both ranks: 0.003 up to step 3, then 0.01; then the checkpoint's.
    assert ranks[0]["lr"] == ranks[1]["lr"]
    assert [ranks[0]["lr"][str(s)] for s in (3, 4, 6, 7)] == [0.003, 0.01, 0.01, 0.01]
    assert ranks[0]["branch"] == ranks[1]["branch"] == "b"
    # The checkpoint was saved before set_max_grad_norm(0.5) (journal order): loading it restored 1.0.
    assert ranks[0]["max_grad_norm"] == ranks[1]["max_grad_norm"]
    assert [ranks[0]["max_grad_norm"][str(s)] for s in (3, 4, 6, 7)] == [1.0, 0.5, 0.5, 1.0]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # the load happened on both ranks
    assert ranks[0]["final_eval_loss"] == ranks[1]["final_eval_loss"]


@needs_torchrun
def test_a_command_rank_0_cannot_journal_running_is_applied_by_no_rank(tmp_path):
    """Another process fails a command between rank 0 listing it and journaling it running: no rank
    applies it (before, rank 0 skipped it while rank 1, which had it from the broadcast, applied it), and
    the commands around it still apply on both ranks."""
    (tmp_path / "gates").write_text("3\n")
    (tmp_path / "steal").write_text("elsewhere\n")
    with launched(tmp_path) as proc:
        url = (tmp_path / "url").read_text()
        client, other = BridgeClient(url), BridgeClient(url, source="elsewhere")
        wait_for(tmp_path / "reached-3", proc)
        sent = [client.set_max_grad_norm(0.5), other.set_lr(0.05), client.set_optimizer(weight_decay=0.2)]
        (tmp_path / "release-3").touch()
        ranks = finish(tmp_path, proc)
        with Store(tmp_path / "selfsteer.sqlite") as store:
            rows = [store.get_command(s["uuid"]) for s in sent]
        client.close()
        other.close()

    assert [(r["status"], r["step"], r["error"]) for r in rows] == [
        ("success", 3, None),
        ("failed", None, "taken by another process"),
        ("success", 3, None),
    ]
    # The lr never moved on either rank; the weights stayed the same on both.
    assert ranks[0]["lr"] == ranks[1]["lr"] == {str(s): 0.003 for s in range(1, 13)}
    assert ranks[0]["max_grad_norm"] == ranks[1]["max_grad_norm"]
    assert [ranks[0]["max_grad_norm"][str(s)] for s in (3, 4, 12)] == [1.0, 0.5, 0.5]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]

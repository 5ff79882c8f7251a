"""Commands exactly once: idempotency keys on the real control server, two real processes racing with
the same keys, and a supervisor process killed with SIGKILL inside each node of its graph and started
again, over a real tiny training run."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from multiprocessing import get_context
from pathlib import Path

import pytest
from helpers.live_run import LiveRun
from helpers.polling import wait_for
from helpers.racer import post_many

from selfsteer.trainer_bridge.client import BridgeHTTPError
from selfsteer.trainer_bridge.store import Store

LONG_RUN = ["training.max_steps=100000", "training.eval_steps=5"]  # stopped by the test
CRASH_DRIVER = Path(__file__).parent / "helpers" / "supervisor_crash.py"


def test_a_repeat_under_the_same_key_returns_the_first_command(tmp_path):
    with LiveRun(tmp_path, LONG_RUN, gates=[3]) as live:
        live.gate.wait(3)
        first = live.client.set_lr(1e-3, idempotency_key="k1")
        again = live.client.set_lr(1e-3, idempotency_key="k1")
        other = live.client.set_lr(1e-3, idempotency_key="k2")
        with pytest.raises(BridgeHTTPError) as refused:  # one key, another command: a client bug
            live.client.set_lr(2e-3, idempotency_key="k1")
        assert refused.value.status_code == 422 and "k1" in str(refused.value.detail)
        live.gate.release(3)
        live.client.wait(first["uuid"])
        live.client.stop(idempotency_key="end")
        live.join()
        # Once the run is over a retry still gets its answer: the first command, not a 409.
        assert live.client.stop(idempotency_key="end")["repeated"] is True
        with pytest.raises(BridgeHTTPError) as over:
            live.client.set_lr(1e-3, idempotency_key="k3")
        assert over.value.status_code == 409
        commands = live.client.commands()

    assert (first["repeated"], again["repeated"], other["repeated"]) == (False, True, False)
    assert again["uuid"] == first["uuid"] != other["uuid"]
    lr_rows = [c for c in commands if c["type"] == "set_optimizer"]
    assert [(c["idempotency_key"], c["status"], c["step"]) for c in lr_rows] == [
        ("k1", "success", 3),
        ("k2", "success", 3),
    ]


def test_two_processes_racing_with_the_same_keys_queue_each_command_once(tmp_path):
    keys = [f"race-{i}" for i in range(40)]
    with LiveRun(tmp_path, LONG_RUN, gates=[2]) as live:
        live.gate.wait(2)  # held: nothing is applied while they race
        ctx = get_context("spawn")
        start, results = ctx.Event(), ctx.Queue()
        racers = [ctx.Process(target=post_many, args=(live.run.url, keys, start, results)) for _ in range(2)]
        for racer in racers:
            racer.start()
        start.set()
        uuids = [results.get(timeout=60) for _ in range(2 * len(keys))]
        for racer in racers:
            racer.join(30)
        rows = [c for c in live.client.commands() if c["source"] == "racer"]
        live.gate.release(2)
        live.client.stop()
        live.join()

    assert all(racer.exitcode == 0 for racer in racers)
    assert len(rows) == len(keys) and sorted(c["idempotency_key"] for c in rows) == sorted(keys)
    assert Counter(uuids) == Counter({row["uuid"]: 2 for row in rows})  # both racers got the one uuid


def _supervisor(url: str, db: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CRASH_DRIVER), "--url", url, "--db", str(db), *extra],
        capture_output=True,
        text=True,
        timeout=180,
    )


# Each kill point, in the order the processes die: one supervisor process after another, each killed
# inside a node of the graph, the next resuming from the checkpoint the last one left.
KILLS = [
    "decide:record_decision",  # recorded the decision, died before acting on it
    "act:set_lr",  # the lr command reached the server; the node's checkpoint was never written
    "act:resume",  # ... and the run was resumed too
    "observe:pause",  # the run is paused and waits for a decision that died with the process
    "observe:update_decision",
    "wait:read_metrics",
]
ITERATIONS = 9


def test_a_supervisor_killed_inside_each_node_acts_exactly_once(tmp_path):
    with LiveRun(tmp_path, LONG_RUN) as live:
        for point in KILLS:
            died = _supervisor(
                live.run.url, live.db, "--kill-after", point, "--max-iterations", str(ITERATIONS)
            )
            assert died.returncode == -9, (point, died.returncode, died.stderr[-2000:])
        finished = _supervisor(live.run.url, live.db, "--max-iterations", str(ITERATIONS))
        assert finished.returncode == 0, finished.stderr[-2000:]
        live.client.stop()
        live.join()
        with Store(live.db) as store:
            decisions = store.list_decisions(live.run.run_id)
            commands = [c for c in store.list_commands(live.run.run_id) if c["source"] == "alternating"]

    run = live.run.run_id
    assert [d["key"] for d in decisions] == [
        f"{run}/crash-test/{i}/decision" for i in range(1, ITERATIONS + 1)
    ]
    by_type = {t: [c for c in commands if c["type"] == t] for t in ("pause", "set_optimizer", "resume")}
    for what, kind in (("pause", "pause"), ("set_optimizer", "lr"), ("resume", "resume")):
        keys = [c["idempotency_key"] for c in by_type[what]]
        assert keys == [f"{run}/crash-test/{i}/{kind}" for i in range(1, ITERATIONS + 1)], what
        assert all(c["status"] == "success" for c in by_type[what]), what
    assert len(commands) == 3 * ITERATIONS  # nothing else was sent
    # Each lr change is the one its decision asked for, and each decision saw the lr the last one set.
    for decision, command in zip(decisions, by_type["set_optimizer"], strict=True):
        assert command["args"]["lr"] == pytest.approx(decision["lr_after"])
    for before, after in zip(decisions, decisions[1:], strict=False):
        assert after["lr_before"] == pytest.approx(before["lr_after"])


def test_a_supervisor_killed_inside_a_rollback_rolls_back_once(tmp_path):
    """Self-correction: at lr 0.3 a doubling makes the tiny run's eval loss rise, so the check rolls it
    back. The supervisor process dies right after the rollback reached the server, before LangGraph
    checkpointed the node; the next process re-runs `check` and must not roll back a second time.
    The first decision is made at a step the test fixes (6: the run waits there until the supervisor's
    pause is queued), so the same weights are judged at the evaluation of step 10 whatever the speed."""
    overrides = [*LONG_RUN, "training.learning_rate=0.3"]
    with LiveRun(tmp_path, overrides, gates=[6]) as live, Store(live.db) as store:

        def release_once_paused():
            wait_for(
                lambda: any(c["type"] == "pause" for c in store.list_commands(live.run.run_id)), "a pause"
            )
            live.gate.release(6)

        releaser = threading.Thread(target=release_once_paused, daemon=True)
        releaser.start()
        died = _supervisor(
            live.run.url,
            live.db,
            "--self-correct",
            "--kill-after",
            "check:load_checkpoint",
            "--max-iterations",
            "3",
        )
        assert died.returncode == -9, (died.returncode, died.stderr[-2000:])
        finished = _supervisor(live.run.url, live.db, "--self-correct", "--max-iterations", "3")
        assert finished.returncode == 0, finished.stderr[-2000:]
        live.client.stop()
        live.join()
        run = live.run.run_id
        loads = [c for c in store.list_commands(run) if c["type"] == "load_checkpoint"]
        decisions = store.list_decisions(run)
    keys = [c["idempotency_key"] for c in loads]
    assert keys[0] == f"{run}/crash-test/1/load-rollback" and len(set(keys)) == len(keys)  # once each
    assert [c["args"]["branch"] for c in loads].count("retry-1") == 1
    assert all(c["status"] == "success" for c in loads)
    # Each rollback is recorded once, on the decision it undid; the retry in its place did not double.
    rolled_back = [d for d in decisions if d["rolled_back"]]
    assert len(rolled_back) == len(loads) and rolled_back[0]["key"] == f"{run}/crash-test/1/decision"
    retry = next(d for d in decisions if d["retry_of"] == rolled_back[0]["id"])
    assert retry["action"] == "keep"

"""Checkpoints and branches: loading a checkpoint forks the run into a new branch, recorded in the tree,
with the checkpoint's weights and metrics tagged by branch."""

from __future__ import annotations

import contextlib
import copy
import json

import torch
from helpers.live_run import LiveRun
from transformers import TrainerCallback
from websockets.sync.client import connect

from selfsteer.trainer_bridge.store import Store


class WeightsAt(TrainerCallback):
    """Copies of the weights at the end of given steps, after the bridge applied that step's commands."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.weights = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_load_checkpoint_forks_a_branch(tmp_path):
    overrides = ["training.max_steps=24", "training.save_strategy=steps", "training.save_steps=8"]
    with LiveRun(tmp_path, overrides, gates=[5, 10, 15, 20]) as live:
        weights = WeightsAt([5, 10, 15, 20])
        live.run.trainer.add_callback(weights)  # after the bridge: sees what the commands did
        c = live.client
        live.gate.wait(5)
        events = connect(live.run.url.replace("http", "ws") + "/api/events")
        save = c.save_checkpoint("early")["uuid"]
        live.gate.release(5)
        live.gate.wait(10)
        load = c.load_checkpoint("early", branch="retry")["uuid"]
        live.gate.release(10)
        live.gate.wait(15)
        save2 = c.save_checkpoint()["uuid"]  # default name: <branch>-step-<step>
        load2 = c.load_checkpoint("retry-step-15")["uuid"]  # default branch name
        live.gate.release(15)
        live.gate.wait(20)
        load3 = c.load_checkpoint("checkpoint-8", branch="from-trainer")["uuid"]  # the Trainer's own save
        live.gate.release(20)
        live.join()
        announced = []  # the branches that state events announced, in order (the dashboard follows them)
        with contextlib.suppress(TimeoutError), events:
            while True:
                event = json.loads(events.recv(timeout=1))
                branch = event["state"]["branch"] if event["event"] == "state" else None
                if branch and (not announced or announced[-1] != branch):
                    announced.append(branch)
        rows = {u: c.command(u) for u in (save, load, save2, load2, load3)}
        branches = c.branches()
        checkpoints = c.checkpoints()
        state = c.state()

    assert all(row["status"] == "success" for row in rows.values()), rows
    assert [rows[u]["step"] for u in (save, load, save2, load2, load3)] == [5, 10, 15, 15, 20]
    assert rows[load2]["result"]["branch"] == "branch-2"

    # The tree: main -> retry -> branch-2 -> from-trainer (a checkpoint of main at step 8).
    tree = {b["name"]: (b["parent"], b["checkpoint"], b["checkpoint_step"], b["fork_step"]) for b in branches}
    assert tree == {
        "main": (None, None, 0, 0),
        "retry": ("main", "early", 5, 10),
        "branch-2": ("retry", "retry-step-15", 15, 15),
        "from-trainer": ("branch-2", "checkpoint-8", 8, 20),
    }
    assert state["branch"] == "from-trainer"
    assert announced == ["main", "retry", "branch-2", "from-trainer"]
    names = [(cp["name"], cp["step"], cp["branch"], cp["source"]) for cp in checkpoints]
    assert ("early", 5, "main", "api") in names and ("retry-step-15", 15, "retry", "api") in names
    assert ("checkpoint-8", 8, "main", "trainer") in names

    # The weights right after the load are the checkpoint's (step 5's), not step 10's.
    for key, value in weights.weights[5].items():
        assert torch.equal(weights.weights[10][key], value)
    assert any(not torch.equal(weights.weights[15][k], v) for k, v in weights.weights[5].items())

    # Metrics carry the branch they were logged on.
    with Store(live.db) as store:
        losses = store.get_metrics(live.run.run_id, names=["loss"])
    by_step = {row["step"]: row["branch"] for row in losses}
    assert {by_step[s] for s in range(1, 11)} == {"main"}
    assert {by_step[s] for s in range(11, 16)} == {"retry"}
    assert {by_step[s] for s in range(16, 21)} == {"branch-2"}
    assert {by_step[s] for s in range(21, 25)} == {"from-trainer"}


def test_duplicate_names_fail_without_harm(tmp_path):
    with LiveRun(tmp_path, ["training.max_steps=8"], gates=[2]) as live:
        live.gate.wait(2)
        first = live.client.save_checkpoint("a")["uuid"]
        again = live.client.save_checkpoint("a")["uuid"]
        live.gate.release(2)
        summary = live.join()
        statuses = [live.client.command(u)["status"] for u in (first, again)]
    assert statuses == ["success", "failed"] and summary["steps"] == 8


def test_a_checkpoint_name_too_long_for_the_file_system_fails_cleanly(tmp_path):
    with LiveRun(tmp_path, ["training.max_steps=100000"], gates=[3]) as live:
        live.gate.wait(3)
        uuid = live.client.load_checkpoint("0" * 4096)["uuid"]
        live.gate.release(3)
        row = live.client.wait(uuid)
        live.client.stop()
        live.join()
    assert row["status"] == "failed" and row["error"].startswith("no checkpoint '000")
    assert len(row["error"]) < 300  # the 4 KB name is not echoed back


class PoisonThenRestore(TrainerCallback):
    """NaN weights for steps 6-8 (as a diverging run), then the weights and optimizer state of step 5
    back (a rollback)."""

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == 5:
            self.saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        if state.global_step == 8:
            model.load_state_dict(self.saved[0])
            optimizer.load_state_dict(self.saved[1])


def test_after_a_nan_is_logged_later_losses_are_the_runs_own_again(tmp_path):
    with LiveRun(tmp_path, ["training.max_steps=14"], callbacks=[PoisonThenRestore()]) as live:
        live.join()
        with Store(live.db) as store:
            losses = {m["step"]: m["value"] for m in store.get_metrics(live.run.run_id, names=["loss"])}
    assert all(losses[step] != losses[step] for step in (6, 7, 8))  # NaN shown as NaN, never 0.0
    assert all(0 < losses[step] < 10 for step in (1, 2, 3, 4, 5, 9, 10, 11, 12, 13, 14))


def test_an_in_memory_checkpoint_forks_the_trainer_back_to_its_exact_weights(tmp_path):
    with LiveRun(tmp_path, ["training.max_steps=14"], gates=[5, 10]) as live:
        weights = WeightsAt([5, 10])
        live.run.trainer.add_callback(weights)
        c = live.client
        live.gate.wait(5)
        save = c.save_checkpoint("fast", memory=True)["uuid"]
        live.gate.release(5)
        live.gate.wait(10)
        load = c.load_checkpoint("fast", branch="again")["uuid"]
        live.gate.release(10)
        live.join()
        save_row, load_row = c.command(save), c.command(load)
        (checkpoint,) = c.checkpoints()
    assert save_row["status"] == "success" and load_row["status"] == "success", (save_row, load_row)
    assert checkpoint["memory"] is True and checkpoint["path"] is None and checkpoint["step"] == 5
    assert load_row["result"]["checkpoint_step"] == 5 and load_row["result"]["restored"]["memory"] is True
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("fast"))  # nothing on disk
    for key, value in weights.weights[5].items():
        assert torch.equal(weights.weights[10][key], value)  # bit for bit

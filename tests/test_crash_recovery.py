"""A training process killed with SIGKILL loses nothing: every journaled command ends applied (with its
step) or failed with the reason that the run crashed, and `selfsteer train --resume RUN_ID` continues the
same run from its latest Trainer checkpoint. Real processes, a real kill, a real store file."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.polling import wait_for

from selfsteer.trainer_bridge.client import BridgeClient
from selfsteer.trainer_bridge.store import Store

MAX_STEPS = 80
SAVE_STEPS = 20
RECIPE = [
    "--recipe", "tiny",
    "--set", f"training.max_steps={MAX_STEPS}",
    "--set", "training.save_strategy=steps", "--set", f"training.save_steps={SAVE_STEPS}",
    "--set", "training.eval_steps=1000",
]  # flag and value pairs # fmt: skip
HELD_TRAIN = Path(__file__).parent / "helpers" / "held_train.py"


PAUSE_AT = 30  # past the first Trainer save (step 20), and not the step right after a save


def selfsteer_train(*args: str, held: Path | None = None) -> subprocess.Popen:
    """`selfsteer train`; with `held`, the CLI plus a `hold` command that blocks the training thread until
    the file `held` exists, and a pause of its own at the step boundary PAUSE_AT
    (tests/helpers/held_train.py)."""
    program = [str(HELD_TRAIN)] if held else ["-m", "selfsteer.cli.main"]
    env = (
        {**os.environ, "SELFSTEER_TEST_RELEASE": str(held), "SELFSTEER_TEST_PAUSE_AT": str(PAUSE_AT)}
        if held
        else None
    )
    return subprocess.Popen(
        [sys.executable, *program, "train", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def url_of(process: subprocess.Popen) -> str:
    for line in process.stdout:
        if match := re.search(r"(http://127\.0\.0\.1:\d+)/", line):
            return match.group(1)
    raise AssertionError(f"no URL line (exit code {process.wait()})")


def test_a_killed_trainer_loses_no_command_and_resumes_the_same_run(tmp_path):
    db, out, release = tmp_path / "store.sqlite", tmp_path / "run", tmp_path / "release"
    trainer = selfsteer_train(*RECIPE, "--db", str(db), "--out", str(out), held=release)
    try:
        with BridgeClient(url_of(trainer), source="test") as client:
            run_id = client.state()["run_id"]
            # Paused at PAUSE_AT by the run itself: the steps trained before the kill go past the latest
            # checkpoint (the resumed run retrains some of them: the weights can be compared), and a
            # fast machine cannot finish the run first. The pause holds the boundary before the step's
            # loss is logged.
            wait_for(lambda: client.state()["paused"], "the pause at PAUSE_AT")
            held_at = client.state()["step"]
            assert held_at == PAUSE_AT and (held_at - 1) % SAVE_STEPS != 0
            wait_for(lambda: any(c["source"] == "trainer" for c in client.commands()), "a Trainer checkpoint")
            applied = client.wait(client.set_lr(1e-3)["uuid"])
            holding = client.send("hold")["uuid"]  # the training thread blocks in it until `release` ...
            wait_for(lambda: client.command(holding)["status"] == "running", "the hold to start")
            waiting = [
                client.set_lr(2e-3)["uuid"],
                client.save_checkpoint("never")["uuid"],
            ]  # ... so these wait, and the kill comes first: `release` is never created
    finally:
        trainer.send_signal(signal.SIGKILL)
        assert trainer.wait(30) == -signal.SIGKILL
    assert not release.exists()

    with Store(db) as store:  # as the crash left it: the run claims to be running
        assert store.get_run(run_id)["status"] == "running"
        assert store.get_command(holding)["status"] == "running"
        assert {store.get_command(uuid)["status"] for uuid in waiting} == {"pending"}
        trained_before_the_kill = [(m["step"], m["value"]) for m in store.get_metrics(run_id, names=["loss"])]
    assert max(trained_before_the_kill)[0] == held_at - 1  # the held step logs nothing

    resumed = selfsteer_train("--resume", run_id, "--db", str(db))
    try:
        with BridgeClient(url_of(resumed), source="test") as client:
            assert client.state()["run_id"] == run_id
            after = client.wait(client.set_lr(5e-4)["uuid"])  # the journal goes on in the same run
    finally:
        assert resumed.wait(120) == 0

    with Store(db) as store:
        run = store.get_run(run_id)
        commands = {c["uuid"]: c for c in store.list_commands(run_id)}
        branches = {b["name"]: b for b in client_branches(store, run_id)}
        metrics = store.get_metrics(run_id, names=["loss"])
    assert run["status"] == "finished" and run["pid"] == resumed.pid
    assert [c for c in commands.values() if c["status"] in ("pending", "running")] == []
    assert commands[applied["uuid"]]["status"] == "success" and commands[applied["uuid"]]["step"] > 0
    assert commands[holding]["status"] == "failed" and commands[holding]["step"] == held_at
    assert "crashed" in commands[holding]["error"]
    assert "while this command was being applied" in commands[holding]["error"]
    for uuid in waiting:
        assert (
            commands[uuid]["status"] == "failed"
            and "before this command was applied" in commands[uuid]["error"]
        )
    assert commands[after["uuid"]]["status"] == "success" and commands[after["uuid"]]["step"] >= after["step"]

    # The resumed steps are a branch forked at the checkpoint; the old branch keeps what it trained.
    resume = branches["resume-1"]
    assert resume["parent"] == "main" and resume["fork_step"] == resume["checkpoint_step"]
    assert resume["checkpoint"] == f"checkpoint-{resume['checkpoint_step']}"
    assert (
        resume["checkpoint_step"] == (held_at - 1) // SAVE_STEPS * SAVE_STEPS
    )  # the latest save before the kill
    resumed_losses = {m["step"]: m["value"] for m in metrics if m["branch"] == "resume-1"}
    assert sorted(resumed_losses) == list(range(resume["checkpoint_step"] + 1, MAX_STEPS + 1))
    main = [(m["step"], m["value"]) for m in metrics if m["branch"] == "main"]
    assert main == trained_before_the_kill
    # The weights came from the checkpoint (and the data order with them): the first step after it has
    # the loss the killed run had there (the loss is computed before that step's update).
    first = resume["checkpoint_step"] + 1
    assert resumed_losses[first] == pytest.approx(dict(main)[first], rel=1e-5)
    assert resumed_losses[first] != pytest.approx(dict(main)[first - 1], rel=1e-3)  # not the same batch
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_id"] == run_id and summary["steps"] == MAX_STEPS and summary["branch"] == "resume-1"


def client_branches(store: Store, run_id: str) -> list[dict]:
    from selfsteer.trainer_bridge.checkpoints import list_branches

    return list_branches(store, run_id)


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    from selfsteer.cli.main import main
    from selfsteer.trainer_bridge.recipe import load_recipe

    db = str(tmp_path / "store.sqlite")
    with Store(db) as store:
        no_checkpoint = store.create_run("tiny", config={"recipe": load_recipe("tiny")})
        store.finish_run(no_checkpoint, "stopped")
        finished = store.create_run("tiny", config={"recipe": load_recipe("tiny")})
        store.finish_run(finished, "finished")
        running = store.create_run("tiny", config={"recipe": load_recipe("tiny")})  # this process: alive
    for run_id, why in [
        (no_checkpoint, "left no Trainer checkpoint to resume from: make runs resumable with"),
        (finished, "finished; there is nothing to resume"),
        (running, f"is still running (process {os.getpid()}"),
        ("no-such-run", "no run 'no-such-run'"),
    ]:
        assert main(["train", "--resume", run_id, "--db", db]) == 2
        assert why in capsys.readouterr().err
    assert main(["train", "--resume", finished, "--db", db, "--set", "training.max_steps=5"]) == 2
    assert "no --set or --seed" in capsys.readouterr().err
    with Store(db) as store:  # refusals change nothing
        assert [r["status"] for r in store.list_runs()] == ["running", "finished", "stopped"]

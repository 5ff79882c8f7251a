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
import time

from selfsteer.trainer_bridge.client import BridgeClient
from selfsteer.trainer_bridge.store import Store

MAX_STEPS = 80
RECIPE = [
    "--recipe", "tiny",
    "--set", f"training.max_steps={MAX_STEPS}",
    "--set", "training.save_strategy=steps", "--set", "training.save_steps=20",
    "--set", "training.eval_steps=1000",  # evaluations only when asked ...
    "--set", "data.eval_blocks=3000",  # ... and each takes a while: a command stays `running` meanwhile
]  # fmt: skip


def selfsteer_train(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "selfsteer.cli.main", "train", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip


def url_of(process: subprocess.Popen) -> str:
    for line in process.stdout:
        if match := re.search(r"(http://127\.0\.0\.1:\d+)/", line):
            return match.group(1)
    raise AssertionError(f"no URL line (exit code {process.wait()})")


def wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
    return value


def test_a_killed_trainer_loses_no_command_and_resumes_the_same_run(tmp_path):
    db, out = tmp_path / "store.sqlite", tmp_path / "run"
    trainer = selfsteer_train(*RECIPE, "--db", str(db), "--out", str(out))
    try:
        with BridgeClient(url_of(trainer), source="test") as client:
            run_id = client.state()["run_id"]
            wait_for(lambda: any(c["source"] == "trainer" for c in client.commands()), "a Trainer checkpoint")
            applied = client.wait(client.set_lr(1e-3)["uuid"])
            evaluating = client.evaluate()["uuid"]  # long: the training thread is busy in it ...
            wait_for(lambda: client.command(evaluating)["status"] == "running", "the evaluation to start")
            waiting = [
                client.set_lr(2e-3)["uuid"],
                client.save_checkpoint("never")["uuid"],
            ]  # ... so these wait
    finally:
        trainer.send_signal(signal.SIGKILL)
        assert trainer.wait(30) == -signal.SIGKILL

    with Store(db) as store:  # as the crash left it: the run claims to be running
        assert store.get_run(run_id)["status"] == "running"
        assert {store.get_command(uuid)["status"] for uuid in waiting} == {"pending"}
        trained_before_the_kill = [(m["step"], m["value"]) for m in store.get_metrics(run_id, names=["loss"])]

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
    assert (
        "crashed" in commands[evaluating]["error"]
        and "while this command was being applied" in (commands[evaluating]["error"])
    )
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
    resumed_steps = sorted(m["step"] for m in metrics if m["branch"] == "resume-1")
    assert resumed_steps == list(range(resume["checkpoint_step"] + 1, MAX_STEPS + 1))
    main = [(m["step"], m["value"]) for m in metrics if m["branch"] == "main"]
    assert main == trained_before_the_kill and max(main)[0] >= resume["checkpoint_step"]
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

"""Each command takes effect at the step the journal says, on real tiny Trainer runs over real HTTP."""

from __future__ import annotations

import time

import pytest
from helpers.live_run import LiveRun

from selfsteer.trainer_bridge.commands import Args, CommandRegistry
from selfsteer.trainer_bridge.handlers import default_registry
from selfsteer.trainer_bridge.store import Store


def metric(db, run_id: str, name: str) -> dict[int, float]:
    with Store(db) as store:
        return {row["step"]: row["value"] for row in store.get_metrics(run_id, names=[name])}


def test_lr_change_survives_a_linear_schedule(tmp_path):
    overrides = ["training.lr_scheduler_type=linear", "training.max_steps=30", "training.learning_rate=0.003"]
    with LiveRun(tmp_path, overrides, gates=[10]) as live:
        live.gate.wait(10)
        uuid = live.client.set_lr(0.01)["uuid"]
        live.gate.release(10)
        live.join()
        row = live.client.command(uuid)
        tail = live.client.metrics(since=28, names=["learning_rate"])
    assert row["status"] == "success" and row["step"] == 10
    assert [(m["step"], m["name"], m["branch"]) for m in tail] == [
        (29, "learning_rate", "main"),
        (30, "learning_rate", "main"),
    ]
    assert row["result"]["before"]["lr"] == pytest.approx(0.003 * 20 / 30)
    assert row["result"]["after"]["lr"] == pytest.approx(0.01)

    # The lr each optimizer step used: the old schedule up to step 10, then the same linear decay
    # scaled so that step 11 runs at exactly 0.01 (not back to the old curve one step later).
    used = live.recorder.lr
    for step in range(1, 11):
        assert used[step] == pytest.approx(0.003 * (30 - (step - 1)) / 30)
    base = 0.01 * 30 / 20
    for step in range(11, 31):
        assert used[step] == pytest.approx(base * (30 - (step - 1)) / 30)
    # The logged learning_rate agrees, step by step.
    logged = metric(live.db, live.run.run_id, "learning_rate")
    assert all(logged[step] == pytest.approx(used[step]) for step in range(1, 31))


def test_optimizer_hyperparameters_and_grad_norm(tmp_path):
    with LiveRun(tmp_path, ["training.max_steps=12"], gates=[4]) as live:
        live.gate.wait(4)
        a = live.client.set_optimizer(weight_decay=0.2, betas=(0.8, 0.95), eps=1e-6)["uuid"]
        b = live.client.set_max_grad_norm(0.25)["uuid"]
        live.gate.release(4)
        live.join()
        rows = [live.client.command(u) for u in (a, b)]
        optimizer = live.run.trainer.optimizer
        assert live.run.trainer.args.max_grad_norm == 0.25
    assert [(r["status"], r["step"]) for r in rows] == [("success", 4), ("success", 4)]
    groups = optimizer.param_groups
    # Only the decaying group changes its weight decay; biases and norms keep 0.
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.2]
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in groups)
    assert rows[1]["result"] == {"before": 1.0, "after": 0.25}


def test_pause_holds_training_until_resume(tmp_path):
    with LiveRun(tmp_path, ["training.max_steps=20"], gates=[5]) as live:
        live.gate.wait(5)
        pause = live.client.pause()["uuid"]
        live.gate.release(5)
        assert live.client.wait(pause)["step"] == 5
        time.sleep(0.5)
        state = live.client.state()
        assert state["paused"] and state["step"] == 5 and state["phase"] == "paused"
        # Commands sent while paused apply at the paused step.
        lr = live.client.set_lr(0.002)["uuid"]
        assert live.client.wait(lr)["step"] == 5
        assert live.client.state()["step"] == 5
        resume = live.client.resume()["uuid"]
        assert live.client.wait(resume)["step"] == 5
        summary = live.join()
    assert summary["steps"] == 20 and not live.bridge.paused


def test_stop_evaluate_reload_and_failures(tmp_path):
    registry = default_registry()

    class Scale(Args):
        factor: float

    @registry.register("scale_lr", Scale, "multiply the lr")
    def scale_lr(ctx, args):
        for group in ctx.optimizer.param_groups:
            group["lr"] *= args.factor
        return {"lr": ctx.optimizer.param_groups[0]["lr"]}

    with LiveRun(tmp_path, ["training.max_steps=40"], gates=[3, 6]) as live:
        live.bridge.registry = registry  # user-defined commands: registered, allow-listed
        live.gate.wait(3)
        ev = live.client.evaluate()["uuid"]
        missing = live.client.load_checkpoint("no-such-checkpoint")["uuid"]
        reload = live.client.reload_data()["uuid"]
        unknown_data = live.client.reload_data("nope")["uuid"]
        custom = live.client.send("scale_lr", factor=0.5)["uuid"]
        live.gate.release(3)
        live.gate.wait(6)
        stop = live.client.stop()["uuid"]
        live.gate.release(6)
        summary = live.join()
        rows = {u: live.client.command(u) for u in (ev, missing, reload, unknown_data, custom, stop)}

    assert rows[ev]["status"] == "success" and rows[ev]["step"] == 3
    assert rows[ev]["result"]["eval_loss"] == pytest.approx(metric(live.db, live.run.run_id, "eval_loss")[3])
    assert (
        rows[missing]["status"] == "failed" and "no checkpoint 'no-such-checkpoint'" in rows[missing]["error"]
    )
    assert rows[reload]["status"] == "success" and rows[reload]["result"]["dataset"] == "train"
    assert (
        rows[unknown_data]["status"] == "failed" and "no data factory 'nope'" in rows[unknown_data]["error"]
    )
    assert rows[custom]["status"] == "success" and rows[custom]["result"]["lr"] == pytest.approx(0.0015)
    # Training went on after the failures, and stopped where the stop command says.
    assert rows[stop]["step"] == 6 and summary["steps"] == 6
    with Store(live.db) as store:
        assert store.get_run(live.run.run_id)["status"] == "stopped"


def test_registry_refuses_odd_names():
    with pytest.raises(ValueError):
        CommandRegistry().register("os.system")


def test_a_command_the_run_does_not_apply_in_time_is_the_runs_delay_not_a_models(tmp_path):
    from selfsteer.agents.chat_models import describe_llm_error
    from selfsteer.trainer_bridge.client import CommandTimeout

    with LiveRun(tmp_path, gates=[3]) as live:
        live.gate.wait(3)  # held inside step 3's boundary: nothing is applied until released
        sent = live.client.set_lr(1e-3)
        with pytest.raises(CommandTimeout) as late:
            live.client.wait(sent["uuid"], timeout=0.2)
        live.gate.release(3)
        assert live.client.wait(sent["uuid"])["status"] == "success"
    said = describe_llm_error(late.value)
    assert said.startswith("the training run did not apply a command in time") and "model" not in said

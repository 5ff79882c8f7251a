"""PyTorch Lightning steered through `SteerCallback`: real Lightning fits on CPU, a real control server on
loopback, a real SQLite store. Commands are sent over HTTP from a callback at a chosen optimizer step,
so each applies at the next boundary, whatever the machine's speed."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from selfsteer.integrations.lightning import SteerCallback, eval_metrics
from selfsteer.trainer_bridge.client import BridgeClient
from selfsteer.trainer_bridge.store import Store
from tests.helpers.polling import wait_for

ROOT = Path(__file__).resolve().parents[1]
PEAK, WARMUP, STEPS = 0.01, 4, 16


def factor(step: int) -> float:
    return (step + 1) / WARMUP if step < WARMUP else 1 - 0.04 * (step - WARMUP)


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=PEAK)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Actions(L.Callback):
    """Runs `actions[step](client, trainer)` once the optimizer step `step` is done."""

    def __init__(self, client: BridgeClient, actions: dict):
        self.client, self.actions = client, actions

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.actions:
            self.actions.pop(trainer.global_step)(self.client, trainer)


def fit(tmp_path: Path, actions: dict, module=None, **trainer_kwargs) -> tuple[SteerCallback, dict, Store]:
    """`module`: the LightningModule's class (default Regression), made after the seed."""
    torch.manual_seed(0)
    target = torch.randn(8, 1)
    x = torch.randn(STEPS * 8, 8)
    data = DataLoader(TensorDataset(x, x @ target), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(x[:32], x[:32] @ target), batch_size=32)
    steer = SteerCallback(port=0, db=tmp_path / "runs.db", announce=False)
    client = BridgeClient(steer.url)
    trainer = L.Trainer(
        max_steps=STEPS, callbacks=[steer, Actions(client, actions)], default_root_dir=tmp_path,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, accelerator="cpu", devices=1, limit_val_batches=1,
        **{"gradient_clip_val": 1.0, "val_check_interval": 100, "check_val_every_n_epoch": None, **trainer_kwargs},
    )  # a quiet CPU Trainer for the test # fmt: skip
    try:
        trainer.fit((module or Regression)(), data, val)
    finally:
        client.close()
    assert not actions, f"steps never reached: {sorted(actions)}"
    store = Store(tmp_path / "runs.db")
    metrics: dict[str, dict[str, dict[int, float]]] = {}
    for row in store.get_metrics(steer.bridge.run_id):
        metrics.setdefault(row["branch"], {}).setdefault(row["name"], {})[row["step"]] = row["value"]
    steer.trainer = trainer
    return steer, metrics, store


def test_a_new_lr_scales_the_lightning_schedule_and_sticks(tmp_path):
    sent = {}
    steer, metrics, store = fit(tmp_path, {3: lambda c, t: sent.setdefault("lr", c.set_lr(0.004)["uuid"])})
    command = store.get_command(sent["lr"])
    assert command["status"] == "success" and command["step"] == 4
    ratio = command["result"]["schedule"]["factor"]
    # The next step uses exactly the new lr; the rest of the schedule moves by the same factor.
    assert ratio == pytest.approx(0.004 / (PEAK * factor(4)))
    lrs = metrics["main"]["learning_rate"]  # at step s, as the HF Trainer logs it: the lr the next step uses
    for step in range(1, 5):
        assert lrs[step] == pytest.approx(PEAK * factor(step), rel=1e-9)
    for step in range(5, STEPS + 1):
        assert lrs[step] == pytest.approx(PEAK * factor(step) * ratio, rel=1e-9)
    assert store.get_run(steer.bridge.run_id)["status"] == "finished"


def test_pause_evaluate_clip_rollback_and_stop(tmp_path):
    seen = {}

    def while_paused(client):
        seen["paused"] = wait_for(lambda: (s := client.state())["paused"] and s, "the pause")
        seen["norm"] = client.wait(client.set_max_grad_norm(0.25)["uuid"])
        seen["eval"] = client.wait(client.evaluate()["uuid"])
        client.resume()

    def pause(client, trainer):
        client.pause()
        threading.Thread(target=while_paused, args=(BridgeClient(client.url),), daemon=True).start()

    def save(client, trainer):
        client.save_checkpoint("at-6")
        seen["eval_at_save"] = client.evaluate()["uuid"]

    def load(client, trainer):
        seen["load"] = client.load_checkpoint("at-6", branch="retry")["uuid"]
        seen["eval_at_load"] = client.evaluate()["uuid"]

    actions = {2: pause, 5: save, 9: load, 12: lambda client, trainer: client.stop()}
    steer, metrics, store = fit(tmp_path, actions)
    assert seen["paused"]["step"] == 3 and seen["norm"]["step"] == 3 and seen["eval"]["step"] == 3
    assert steer.trainer.gradient_clip_val == 0.25
    assert metrics["main"]["eval_loss"][3] == pytest.approx(seen["eval"]["result"]["eval_loss"])
    load = store.get_command(seen["load"])
    assert load["status"] == "success" and load["step"] == 10 and load["result"]["checkpoint_step"] == 6
    # The weights came back: the evaluation right after the rollback is the one right after the save.
    at_save, at_load = store.get_command(seen["eval_at_save"]), store.get_command(seen["eval_at_load"])
    assert at_load["result"]["eval_loss"] == at_save["result"]["eval_loss"]
    assert min(metrics["retry"]["loss"]) == 11  # the step counter keeps counting on the new branch
    assert steer.trainer.global_step == 13  # stopped at the boundary after step 12
    state = steer.bridge.state()
    assert state["branch"] == "retry" and state["step"] == 13
    assert store.get_run(steer.bridge.run_id)["status"] == "stopped"


class Logging(Regression):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_mse", loss)
        return {"loss": loss}


def test_a_probe_trains_its_arms_with_the_modules_own_step_and_the_fit_goes_on_bit_for_bit(tmp_path):
    sent = {}

    def probe(client, trainer):
        sent["probe"] = client.probe([0.5, 1.0, 2.0], 3, 8)["uuid"]

    plain, plain_metrics, _ = fit(tmp_path / "a", {}, module=Logging)
    steer, metrics, store = fit(tmp_path / "b", {6: probe}, module=Logging)
    row = store.get_command(sent["probe"])
    assert row["status"] == "success", row
    result = row["result"]
    assert row["step"] == 7 and result["cost_steps"] == 9
    assert [a["lr"] for a in result["arms"]] == pytest.approx([result["lr"] * f for f in (0.5, 1.0, 2.0)])
    assert result["lr"] == pytest.approx(PEAK * factor(7))  # the scheduled lr in force
    assert len({a["train_loss"][0] for a in result["arms"]}) == 1  # the same first batch, before any update
    assert len({a["train_loss"][1] for a in result["arms"]}) == 3  # then each its own lr
    assert all(math.isfinite(a["estimate"]) for a in result["arms"])
    # Put back bit for bit: the same losses, lrs and weights as the fit without a probe, and nothing the
    # module logged in the probe reached the run's metrics.
    assert metrics == plain_metrics
    for key, value in plain.trainer.lightning_module.state_dict().items():
        assert torch.equal(steer.trainer.lightning_module.state_dict()[key], value)
    assert steer.trainer.callback_metrics["train_mse"] == plain.trainer.callback_metrics["train_mse"]


def test_validation_metrics_are_named_as_the_api_names_them():
    assert eval_metrics({"val_loss": torch.tensor(1.5), "val/acc": 0.5, "train_loss": 2.0}) == {
        "eval_loss": 1.5,
        "eval_acc": 0.5,
    }


def test_the_example_lightning_loop_runs_and_obeys_commands(tmp_path):
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "lightning_loop.py"), "--port", "0", "--max-steps", "20",
         "--eval-interval", "10", "--start-paused", "--out", str(tmp_path / "out"), "--db", str(tmp_path / "r.db")],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=tmp_path,
    )  # the example's command line as typed # fmt: skip
    try:
        line = process.stderr.readline()
        assert " is served at http://127.0.0.1:" in line, line
        client = BridgeClient(line.rsplit(" ", 1)[1].strip().rstrip("/"))
        wait_for(lambda: client.state()["phase"] == "paused", "the hold at step 0")
        uuids = [
            client.set_lr(0.001, schedule="constant")["uuid"],
            client.save_checkpoint("start")["uuid"],
            client.set_max_grad_norm(0.5)["uuid"],
            client.resume()["uuid"],
        ]
        assert process.wait(timeout=180) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    store = Store(tmp_path / "r.db")
    (run,) = store.list_runs()
    assert run["status"] == "finished"
    journal = {c["uuid"]: c for c in store.list_commands(run["id"])}
    assert all(journal[u]["status"] == "success" and journal[u]["step"] == 0 for u in uuids)
    lrs = [row["value"] for row in store.get_metrics(run["id"], names=["learning_rate"])]
    assert len(lrs) == 20 and all(math.isclose(v, 0.001) for v in lrs)
    assert [row["step"] for row in store.get_metrics(run["id"], names=["eval_loss"])] == [10, 20]
    assert {row["name"] for row in store.get_metrics(run["id"])} >= {"loss", "eval_loss", "learning_rate"}

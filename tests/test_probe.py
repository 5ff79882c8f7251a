"""Probes (trainer_bridge/probe.py): each arm trains from the same exact snapshot on the same batches, and
the run goes on bit for bit as if no probe had happened, in a plain PyTorch loop and under the HF
Trainer (real runs, real store). The extrapolation is checked on curves whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import TrainerCallback

import selfsteer
from selfsteer.trainer_bridge.commands import InvalidCommand
from selfsteer.trainer_bridge.probe import extrapolate
from selfsteer.trainer_bridge.recipe import load_recipe
from selfsteer.trainer_bridge.runner import RecipeRun
from selfsteer.trainer_bridge.store import Store


def test_extrapolate_recovers_an_exponential_and_keeps_a_rise_rising():
    curve = [(t, 2.0 + 3.0 * math.exp(-0.3 * t)) for t in (0, 4, 8)]
    assert extrapolate(curve, 30) == pytest.approx(2.0 + 3.0 * math.exp(-9.0), rel=1e-2)
    assert extrapolate([(0, 5.0), (4, 5.5), (8, 6.0)], 16) == pytest.approx(7.0)  # on at its rate
    assert extrapolate([(0, 5.0), (4, math.nan), (8, 4.0)], 16) == math.inf
    assert extrapolate([(0, 5.0), (8, 4.0)], 8) == 4.0  # nothing to extrapolate
    # A falling curve never ends above its last point, nor below zero.
    assert 0.0 <= extrapolate([(0, 5.0), (4, 1.0), (8, 0.1)], 1000) <= 0.1


def plain_loop(tmp_path, probe_at: int | None, steps: int = 12, probe_args: dict | None = None):
    """A nanoGPT-style loop over a tiny regression model whose batches come from the global RNG; with
    `probe_at`, a probe is sent from inside iteration `probe_at`'s body (it applies at the next
    boundary). Returns the losses logged per step, the final weights and the probe's journal row."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    target = torch.randn(8, 1)
    losses: dict[int, float] = {}

    def train_step(it: int) -> float:
        x = torch.randn(16, 8)  # the RNG the snapshot restores: every arm draws the same batches
        loss = F.mse_loss(model(x), x @ target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steer.log(loss=loss.item())  # dropped while a probe trains
        return loss.item()

    def evaluate():
        model.eval()
        with torch.no_grad():
            x = torch.randn(32, 8)  # random, as nanoGPT's estimate_loss: a probe fixes its seed
            loss = F.mse_loss(model(x), x @ target).item()
        model.train()
        return {"loss": loss}

    steer = selfsteer.attach(
        model, optimizer, max_steps=steps, evaluate=evaluate, train_step=train_step,
        port=None, db=tmp_path / "runs.db", output_dir=tmp_path / "out", announce=False,
    )  # fmt: skip
    uuid = None
    for it in steer.steps():
        losses[it] = train_step(it)
        if it == probe_at:
            uuid = steer.bridge.submit("probe", probe_args or {"steps": 4}, "test", None)["uuid"]
    row = Store(tmp_path / "runs.db").get_command(uuid) if uuid else None
    return losses, {k: v.clone() for k, v in model.state_dict().items()}, row, steer


def test_a_probe_in_a_plain_loop_measures_every_arm_and_leaves_the_run_bit_for_bit(tmp_path):
    plain, weights, _, _ = plain_loop(tmp_path / "a", probe_at=None)
    probed, probed_weights, row, steer = plain_loop(tmp_path / "b", probe_at=5)
    assert row["status"] == "success", row
    result = row["result"]
    assert row["step"] == 6 and result["step"] == 6
    assert [arm["factor"] for arm in result["arms"]] == [0.5, 1.0, 2.0]
    assert result["cost_steps"] == 12 and result["horizon"] == 8
    keep = result["arms"][1]
    # The x1 arm is the run's own future: same state, same RNG, same batches, same losses.
    assert keep["train_loss"] == [plain[it] for it in range(6, 10)]
    for arm in result["arms"]:
        assert arm["lr"] == pytest.approx(0.01 * arm["factor"])
        assert arm["train_loss"][0] == keep["train_loss"][0]  # the same first batch, before any update
        assert [t for t, _ in arm["eval_loss"]] == [0, 2, 4]
        assert arm["eval_loss"][0][1] == result["start"]
        assert math.isfinite(arm["estimate"])
    assert len({arm["train_loss"][1] for arm in result["arms"]}) == 3  # then each its own lr
    assert result["best_factor"] == min(result["arms"], key=lambda a: a["estimate"])["factor"]
    # The run went on as if nothing had happened, and logged nothing of the arms.
    assert probed == plain
    for key, value in weights.items():
        assert torch.equal(probed_weights[key], value)
    logged = [m for m in Store(tmp_path / "b" / "runs.db").get_metrics(steer.bridge.run_id) if m["name"] == "loss"]
    assert sorted(m["step"] for m in logged) == list(range(12))


def test_a_probe_is_refused_whole_when_its_arguments_are_wrong_and_fails_clearly_without_train_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steer = selfsteer.attach(model, optimizer, max_steps=3, port=None, db=tmp_path / "runs.db",
                             output_dir=tmp_path / "out", announce=False)  # fmt: skip
    for bad in ({"factors": [1.0, 1.0]}, {"factors": []}, {"steps": 0}, {"factors": [100.0]},
                {"steps": 8, "horizon": 4}, {"factors": ["2"]}):  # fmt: skip
        with pytest.raises(InvalidCommand):
            steer.bridge.submit("probe", bad, "test", None)
    assert steer.bridge.commands() == []  # nothing queued
    uuid = steer.bridge.submit("probe", {}, "test", None)["uuid"]
    for _ in steer.steps():
        loss = model(torch.randn(2, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    row = Store(tmp_path / "runs.db").get_command(uuid)
    assert row["status"] == "failed" and "train_step" in row["error"]
    assert steer.step == 3  # the run went on


class SendAt(TrainerCallback):
    def __init__(self, run, step, args):
        self.run, self.step, self.args, self.uuid = run, step, args, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and self.uuid is None:
            self.uuid = self.run.bridge.submit("probe", self.args, "test", None)["uuid"]


def trainer_run(tmp_path, probe: dict | None):
    overrides = ["training.max_steps=12", "training.eval_steps=6", "training.logging_steps=1",
                 "training.learning_rate=5e-3", "training.seed=1"]  # fmt: skip
    run = RecipeRun(load_recipe("tiny", overrides), out_dir=tmp_path / "out", db=tmp_path / "runs.db", port=None)
    sender = SendAt(run, 5, probe) if probe is not None else None
    if sender is not None:
        run.trainer.add_callback(sender)
    try:
        run.train()
        metrics = sorted(
            (m["name"], m["step"], m["value"]) for m in run.bridge.store.get_metrics(run.run_id)
            if m["name"] in ("loss", "eval_loss", "grad_norm", "learning_rate")
        )  # fmt: skip
        weights = {k: v.clone() for k, v in run.trainer.model.state_dict().items()}
        return metrics, weights, run.bridge.command(sender.uuid) if sender else None
    finally:
        run.close()


def test_a_probe_under_the_hf_trainer_measures_its_arms_and_the_run_goes_on_bit_for_bit(tmp_path, one_torch_thread):
    metrics, weights, _ = trainer_run(tmp_path / "a", None)
    probed_metrics, probed_weights, row = trainer_run(tmp_path / "b", {"factors": [0.25, 1.0, 4.0], "steps": 3})
    assert row["status"] == "success", row
    result = row["result"]
    assert result["cost_steps"] == 9 and [a["factor"] for a in result["arms"]] == [0.25, 1.0, 4.0]
    assert result["lr"] > 0 and all(a["lr"] == pytest.approx(result["lr"] * a["factor"]) for a in result["arms"])
    firsts = {a["train_loss"][0] for a in result["arms"]}
    assert len(firsts) == 1  # the same first batch and weights in every arm
    assert all(len(a["eval_loss"]) == 3 and a["eval_loss"][0][1] == result["start"] for a in result["arms"])
    assert probed_metrics == metrics
    for key, value in weights.items():
        assert torch.equal(probed_weights[key], value)

"""The update alignment (trainer_bridge/alignment.py): logged by the core for every loop, at the step it
belongs to, right against a hand computation (SGD: the cosine of successive gradients; AdamW: of the
gradient and the opposite of the last update), untouched by a probe's arms, forgotten after a rollback;
the Observation's view of it; and the `hypergradient` supervisor that decides from it (real runs)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import selfsteer
from selfsteer.agents.hypergradient_supervisor import HypergradientSupervisor
from selfsteer.agents.observation import Observation
from selfsteer.agents.registry import make_supervisor
from selfsteer.integrations.lightning import SteerCallback
from selfsteer.trainer_bridge.recipe import load_recipe
from selfsteer.trainer_bridge.runner import RecipeRun
from selfsteer.trainer_bridge.store import Store


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).clone() for t in tensors])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.double(), b.double()) / (a.double().norm() * b.double().norm()))


def plain_run(tmp_path, optimizer_class, steps=6, probe_at=None, rollback=None, **attach):
    """A plain loop on a small regression; records by hand each iteration's gradient and update.
    rollback: (save_at, load_at): an in-memory checkpoint taken after iteration `save_at`'s step and
    loaded after iteration `load_at`'s."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))
    optimizer = optimizer_class(model.parameters())
    target = torch.randn(6, 1)
    seen = []  # (iteration, gradient, update) of each of the loop's own steps

    def train_step(it):
        x = torch.randn(16, 6)
        loss = F.mse_loss(model(x), x @ target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    steer = selfsteer.attach(
        model, optimizer, max_steps=steps, train_step=train_step, evaluate=lambda: {"loss": 0.0},
        port=None, db=tmp_path / "runs.db", output_dir=tmp_path / "out", announce=False, **attach,
    )  # the alignment loop's attach settings # fmt: skip
    for it in steer.steps():
        before = flat(model.parameters())
        loss = train_step(it)
        seen.append((it, flat(p.grad for p in model.parameters()), flat(model.parameters()) - before))
        steer.log(loss=loss)
        if it == probe_at:
            steer.bridge.submit("probe", {"steps": 3}, "test", None)
        if rollback and it == rollback[0]:
            steer.bridge.submit("save_checkpoint", {"name": "here", "memory": True}, "test", None)
        if rollback and it == rollback[1]:
            steer.bridge.submit("load_checkpoint", {"checkpoint": "here", "branch": "again"}, "test", None)
    rows = Store(tmp_path / "runs.db").get_metrics(steer.bridge.run_id, names=["update_alignment"])
    return seen, [(r["step"], r["branch"], r["value"]) for r in rows]


def test_sgd_alignment_in_a_plain_loop_is_the_cosine_of_successive_gradients(tmp_path):
    seen, logged = plain_run(tmp_path, lambda params: torch.optim.SGD(params, lr=0.05), steps=4)
    # Logged at the iteration that took the step, as the loop logs that step's loss; none for the first.
    assert [(step, branch) for step, branch, _ in logged] == [(1, "main"), (2, "main"), (3, "main")]
    for (step, _, value), (it, grad, _), (_, previous, _) in zip(logged, seen[1:], seen[:-1], strict=True):
        assert it == step
        assert value == pytest.approx(cosine(grad, previous), abs=1e-5)


def test_adamw_alignment_is_against_the_last_update_and_a_probe_leaves_it_alone(tmp_path):
    def adamw(params):
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)

    seen, logged = plain_run(tmp_path / "a", adamw, probe_at=2)
    assert [step for step, _, _ in logged] == [1, 2, 3, 4, 5]
    for (step, _, value), (it, grad, _), (_, _, update) in zip(logged, seen[1:], seen[:-1], strict=True):
        assert it == step and value == pytest.approx(cosine(grad, -update), abs=1e-5)
    assert len({round(value, 3) for _, _, value in logged}) > 1  # not a constant
    # The probe's 3 x 3 optimizer steps from a snapshot were not the run's: the same values as without it.
    _, unprobed = plain_run(tmp_path / "b", adamw)
    assert logged == unprobed


def test_a_rollback_forgets_the_last_update_and_the_switch_turns_it_off(tmp_path):
    sgd = lambda params: torch.optim.SGD(params, lr=0.05)  # noqa: E731
    seen, logged = plain_run(tmp_path / "a", sgd, steps=6, rollback=(1, 3))
    # Saved at step 2 (after iteration 1), loaded at step 4: the loop goes on from iteration 2, on a new
    # branch, whose first step has no previous update of its own to be compared with.
    assert [(step, branch) for step, branch, _ in logged] == [
        (1, "main"),
        (2, "main"),
        (3, "main"),
        (3, "again"),
        (4, "again"),
        (5, "again"),
    ]
    again = [entry for entry in seen if entry[0] >= 2][-4:]  # iterations 2..5 of the new branch
    assert [entry[0] for entry in again] == [2, 3, 4, 5]
    for (step, _, value), (it, grad, _), (_, previous, _) in zip(
        logged[3:], again[1:], again[:-1], strict=True
    ):
        assert it == step and value == pytest.approx(cosine(grad, previous), abs=1e-5)
    _, off = plain_run(tmp_path / "b", sgd, steps=3, update_alignment=False)
    assert off == []


def test_by_default_a_model_past_the_size_limit_pays_no_copy_unless_asked(tmp_path, monkeypatch):
    from selfsteer.trainer_bridge import bridge

    sgd = lambda params: torch.optim.SGD(params, lr=0.05)  # noqa: E731
    monkeypatch.setattr(bridge, "ALIGNMENT_AUTO_MAX_PARAMS", 97)  # the loop's model trains 97 parameters
    _, at_limit = plain_run(tmp_path / "a", sgd, steps=3)
    assert len(at_limit) == 2
    monkeypatch.setattr(bridge, "ALIGNMENT_AUTO_MAX_PARAMS", 96)
    _, past = plain_run(tmp_path / "b", sgd, steps=3)
    assert past == []
    _, asked = plain_run(tmp_path / "c", sgd, steps=3, update_alignment=True)
    assert len(asked) == 2


def test_the_hf_trainer_logs_it_at_every_step_where_the_api_reads_it(tmp_path, one_torch_thread):
    overrides = [
        "training.max_steps=12",
        "training.eval_steps=6",
        "training.logging_steps=1",
        "training.seed=1",
    ]
    run = RecipeRun(
        load_recipe("tiny", overrides), out_dir=tmp_path / "out", db=tmp_path / "runs.db", port=None
    )
    try:
        run.train()
        rows = run.bridge.metrics(names=["update_alignment"])  # what GET /api/metrics answers
        losses = run.bridge.metrics(names=["loss"])
        state = run.bridge.state()
    finally:
        run.close()
    # At the step the Trainer logs that step's loss at; the first step has no previous update.
    assert [r["step"] for r in rows] == list(range(2, 13))
    assert {r["step"] for r in losses} >= set(range(2, 13))
    assert all(r["branch"] == "main" and -1 <= r["value"] <= 1 for r in rows)
    assert len({round(r["value"], 4) for r in rows}) > 1
    assert state["metrics"]["update_alignment"] == rows[-1]["value"]


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))
        self.grads: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def on_before_optimizer_step(self, optimizer):
        self.grads[self.trainer.global_step + 1] = flat(p.grad for p in self.parameters())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_lightning_passes_its_gradient_through_a_closure_and_is_measured_all_the_same(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    data = DataLoader(TensorDataset(x, x @ torch.randn(6, 1)), batch_size=16)
    module = Regression()
    steer = SteerCallback(port=None, db=tmp_path / "runs.db", announce=False)
    trainer = L.Trainer(max_steps=5, callbacks=[steer], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # a quiet Trainer for five steps # fmt: skip
    trainer.fit(module, data)
    rows = Store(tmp_path / "runs.db").get_metrics(steer.bridge.run_id, names=["update_alignment"])
    assert [r["step"] for r in rows] == [2, 3, 4, 5]  # as Lightning logs the loss: the step count after it
    for row in rows:
        step = row["step"]
        assert row["value"] == pytest.approx(cosine(module.grads[step], module.grads[step - 1]), abs=1e-5)


def observed(alignment, evals=((10, 4.0), (20, 3.8)), step=20, train=None, avoid=()):
    return Observation(
        step=step,
        lr=0.01,
        max_steps=60,
        eval_loss=list(evals),
        avoid=list(avoid),
        train_loss=train if train is not None else [(s, 4.0) for s in range(1, step + 1)],
        update_alignment=[(s, v) for s, v in alignment],
    )


def test_the_hypergradient_supervisor_reads_the_mean_alignment_of_the_last_interval():
    supervisor = make_supervisor("hypergradient")
    assert isinstance(supervisor, HypergradientSupervisor)
    early = [(s, -0.5) for s in range(1, 11)]  # before the previous evaluation: not this interval's
    agree = supervisor.decide(observed(early + [(s, 0.2) for s in range(11, 21)]))
    assert (
        agree.action == "double"
        and "+0.200" in agree.explanation
        and "10 steps after step 10" in agree.explanation
    )
    oppose = supervisor.decide(observed(early + [(s, -0.04) for s in range(11, 21)]))
    assert oppose.action == "halve" and "-0.040" in oppose.explanation
    assert supervisor.decide(observed(early + [(s, 0.01) for s in range(11, 21)])).action == "keep"
    # Noisy per step, the mean decides: +0.3 and -0.1 alternating is +0.1.
    assert (
        supervisor.decide(observed([(s, 0.3 if s % 2 else -0.1) for s in range(11, 21)])).action == "double"
    )
    # A step after the last evaluation (read or not yet, as the store had it) is not in the interval: the
    # same run gives the same decision.
    late = observed(early + [(s, 0.02) for s in range(11, 21)] + [(21, -0.9)], step=21)
    assert late.mean_alignment() == pytest.approx(0.02) and "10 steps" in supervisor.decide(late).explanation
    # The first evaluation: everything since the start.
    first = observed([(s, 0.3) for s in range(2, 11)], evals=[(10, 4.0)], step=10)
    assert first.signals().splitlines()[-1].startswith("Update alignment over the last interval: mean +0.30")
    assert supervisor.decide(first).action == "double"
    # A non-finite loss halves, whatever the alignment; nothing logged keeps; a rolled-back action keeps.
    broken = observed([(s, 0.3) for s in range(11, 21)], train=[(19, 4.0), (20, math.nan)])
    assert supervisor.decide(broken).action == "halve"
    assert supervisor.decide(observed([])).action == "keep"
    assert supervisor.decide(observed([(s, 0.3) for s in range(11, 21)], avoid=["double"])).action == "keep"


def test_the_observation_carries_the_series_from_the_metrics_and_back_from_its_record():
    rows = [{"step": s, "name": "loss", "value": 4.0 - 0.01 * s} for s in range(1, 21)]
    rows += [{"step": s, "name": "update_alignment", "value": -0.05} for s in range(2, 21)]
    rows += [{"step": s, "name": "eval_loss", "value": 4.0 - 0.01 * s} for s in (10, 20)]
    observation = Observation.from_metrics(rows, step=20, lr=0.01, max_steps=60)
    assert observation.update_alignment == [(s, -0.05) for s in range(2, 21)]
    assert observation.mean_alignment() == pytest.approx(-0.05)
    assert (
        "Update alignment over the last interval: mean -0.05 (positive: successive steps agree"
        in observation.signals()
    )
    assert Observation.from_record(observation.record()).update_alignment == observation.update_alignment


def test_a_tiny_run_under_the_hypergradient_supervisor_decides_from_the_alignment(tmp_path, one_torch_thread):
    from selfsteer.graphs.supervise import run_supervision

    def supervise(control, stop):
        run_supervision(
            control,
            make_supervisor("hypergradient"),
            db=str(tmp_path / "graph.sqlite"),
            stop_event=stop,
            pause_while_deciding=True,
        )

    # lr 1e-4 is far too low for tiny: successive steps agree.
    recipe = load_recipe("tiny", ["training.learning_rate=1e-4", "training.max_steps=30"])
    run = RecipeRun(recipe, tmp_path / "out", db=tmp_path / "runs.sqlite", port=0, supervisor=supervise,
                    hold_for_supervisor=True)  # the held run of test_probe's # fmt: skip
    try:
        summary = run.train()
    finally:
        run.close()
    decisions = summary["decisions"]
    assert len(decisions) >= 2
    assert decisions[0]["action"] == "double" and "mean update alignment +" in decisions[0]["explanation"]
    assert decisions[0]["lr_after"] == pytest.approx(2e-4)


def test_under_ddp_each_step_is_logged_once_by_rank_0_and_a_rollback_starts_afresh(tmp_path):
    from tests.test_plain_loop_ddp import launch

    ranks = launch(tmp_path, "ddp")  # main 0..10, rolled back to step 6 on "retry", stopped after 15
    with Store(tmp_path / "runs.db") as store:
        rows = store.get_metrics(ranks[0]["run_id"], names=["update_alignment"])
    assert sorted((r["branch"], r["step"]) for r in rows) == [
        *(("main", s) for s in range(1, 11)),
        *(("retry", s) for s in range(7, 16)),
    ]
    # The branch's first steps repeat main's from the same weights, optimizer and batches.
    values = {(r["branch"], r["step"]): r["value"] for r in rows}
    assert values["retry", 7] == pytest.approx(values["main", 7], abs=1e-6)

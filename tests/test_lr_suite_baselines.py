"""Fair baselines in the lr-suite, on real tiny Trainer runs: every row's `compute_steps` (a probing
supervisor pays for its probes' arms, a self-correcting run's abandoned branches are among the Trainer's
steps), and the optimizers a user would pick instead of a supervisor: schedule-free AdamW, evaluated in
its eval mode, and Prodigy at lr 1.0, one run for every start."""

import json

import pytest
import torch
from helpers.self_correct import AlwaysDouble, supervised_run
from transformers import TrainerCallback

from selfsteer.evals.lr_suite import (
    PRODIGY_LR,
    Cell,
    SuiteConfig,
    baseline_optimizer,
    load_results,
    workload,
)
from selfsteer.evals.lr_suite_run import main
from selfsteer.graphs.supervise import SelfCorrection
from selfsteer.trainer_bridge.recipe import load_recipe
from selfsteer.trainer_bridge.runner import RecipeRun, extra_compute_steps
from selfsteer.trainer_bridge.store import Store


@pytest.fixture(scope="module")
def suite(tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("baselines")
    config = SuiteConfig(
        recipes=["tiny"],
        lrs={"tiny": {"too_low": 1e-4, "good": 1e-2}},
        grid_lrs={},
        seeds=[0],
        supervisors=["static", "probe", "schedulefree", "prodigy"],
        max_steps={"tiny": 30},
        eval_steps={"tiny": 10},
    )
    report = main(config, out)
    return out, load_results(out / "results.jsonl"), report


def test_a_probing_supervisor_pays_for_every_arm_of_its_probes(suite):
    out, rows, report = suite
    assert all("error" not in r for r in rows.values()), rows
    for name, lr in (("too_low", 1e-4), ("good", 1e-2)):
        static, probed = (
            rows[Cell("tiny", name, lr, 0, "static").id],
            rows[Cell("tiny", name, lr, 0, "probe").id],
        )
        assert static["compute_steps"] == static["max_steps"] == 30
        with Store(out / "suite.sqlite") as store:
            probes = [c for c in store.list_commands(probed["run_id"]) if c["type"] == "probe"]
        assert probes and all(c["status"] == "success" for c in probes)
        arms = sum(len(arm["train_loss"]) for c in probes for arm in c["result"]["arms"])
        assert arms == sum(c["result"]["cost_steps"] for c in probes) > 0
        assert probed["compute_steps"] == probed["max_steps"] + arms
        # summary.json says the same (selfsteer train writes it there too).
        summary = json.loads(
            (out / "runs" / Cell("tiny", name, lr, 0, "probe").id / "summary.json").read_text()
        )
        assert summary["compute_steps"] == probed["compute_steps"]
        ratio = probed["compute_steps"] / static["compute_steps"]
        line = next(line for line in report.splitlines() if line.startswith(f"| {name} | probe | no |"))
        assert f"| {ratio:.2f}x |" in line
    static_line = next(line for line in report.splitlines() if line.startswith("| too_low | static | no |"))
    assert "| 1.00x |" in static_line


def test_prodigy_runs_at_lr_one_once_for_every_start_and_adapts_its_step(suite):
    out, rows, report = suite
    first, second = rows["tiny-too_low-0.0001-s0-prodigy"], rows["tiny-good-0.01-s0-prodigy"]
    assert second["same_run_as"] == "tiny-too_low-0.0001-s0-prodigy" and "same_run_as" not in first
    assert second["run_id"] == first["run_id"] and second["final_eval_loss"] == first["final_eval_loss"]
    assert first["compute_steps"] == 30
    with Store(out / "suite.sqlite") as store:
        lrs = {m["value"] for m in store.get_metrics(first["run_id"], names=["learning_rate"])}
    assert lrs == {PRODIGY_LR}  # not the cell's start lr
    assert first["prodigy_d"] > 1e-6  # its estimate grew from d0
    assert first["effective_lr"] == pytest.approx(first["prodigy_d"] * PRODIGY_LR)
    # Better than the too-low start left alone: it found a step size of its own.
    assert first["final_eval_loss"] < rows["tiny-too_low-0.0001-s0-static"]["final_eval_loss"]
    assert "| too_low | prodigy | no |" in report and "- prodigy: Prodigy" in report


def test_schedule_free_adamw_is_evaluated_in_its_eval_mode(tmp_path, one_torch_thread):
    class Modes(TrainerCallback):
        def __init__(self):
            self.at_eval, self.at_step = [], []

        def on_evaluate(self, args, state, control, **kwargs):
            self.at_eval.append(optimizer_of(run).param_groups[0]["train_mode"])

        def on_step_end(self, args, state, control, **kwargs):
            self.at_step.append(optimizer_of(run).param_groups[0]["train_mode"])

    cell = Cell("tiny", "good", 1e-2, 0, "schedulefree")
    config = SuiteConfig(max_steps={"tiny": 30}, eval_steps={"tiny": 10})
    recipe, overrides = workload(cell, config)
    more, optimizer = baseline_optimizer("schedulefree", cell, config)
    assert optimizer is None  # the Trainer builds it
    modes = Modes()
    run = RecipeRun(
        load_recipe(recipe, overrides + more),
        out_dir=tmp_path / "out",
        db=tmp_path / "db.sqlite",
        port=None,
        callbacks=[modes],
    )
    try:
        summary = run.train()
        schedule_free = optimizer_of(run)
        assert type(schedule_free).__name__ == "AdamWScheduleFree"
        assert schedule_free.param_groups[0]["warmup_steps"] == 3  # 10% of 30
        assert modes.at_step and not any(not m for m in modes.at_step)  # trained in train mode
        assert len(modes.at_eval) == 4 and not any(modes.at_eval)  # 3 evaluations and the final one
        assert summary["compute_steps"] == summary["steps"] == 30
        eval_mode = eval_loss(run)
        assert eval_mode == pytest.approx(summary["final_eval_loss"], rel=1e-5)
        schedule_free.train()  # the weights it trains (y), not those it is evaluated at (x)
        train_mode = eval_loss(run)
        assert abs(train_mode - eval_mode) > 1e-3, (train_mode, eval_mode)
    finally:
        run.close()


def optimizer_of(run):
    return getattr(run.trainer.optimizer, "optimizer", run.trainer.optimizer)  # the Trainer's is wrapped


@torch.no_grad()
def eval_loss(run) -> float:
    """The model's mean loss on the eval set as its weights are now: the Trainer's own loss of each batch
    (`prediction_step`), but no optimizer mode switched, as its evaluation loop would."""
    trainer = run.trainer
    trainer.model.eval()
    total = count = 0
    for batch in trainer.get_eval_dataloader():
        rows = len(batch["input_ids"])
        total += float(trainer.prediction_step(trainer.model, batch, prediction_loss_only=True)[0]) * rows
        count += rows
    return total / count


def test_a_self_correcting_runs_abandoned_branches_are_among_the_trainers_steps(tmp_path):
    summary, _, db = supervised_run(tmp_path, AlwaysDouble(), 0.1, SelfCorrection())
    assert summary["self_correction"]["extra_steps"] > 0  # a branch was rolled back from
    assert summary["steps"] == 60  # the Trainer kept counting through the rollback
    with Store(db) as store:
        journal = store.list_commands(summary["run_id"])
    assert any(c["type"] == "load_checkpoint" and c["status"] == "success" for c in journal)
    assert summary["compute_steps"] == 60 and extra_compute_steps(journal) == 0


def test_a_loop_that_counts_back_after_a_rollback_pays_for_the_branch_it_left():
    journal = [
        {"type": "load_checkpoint", "status": "success", "result": {"fork_step": 30, "continues_at": 20}},
        {"type": "load_checkpoint", "status": "success", "result": {"fork_step": 30, "checkpoint_step": 20}},
        {"type": "probe", "status": "success", "result": {"cost_steps": 12}},
        {"type": "probe", "status": "failed", "result": None},
    ]
    assert extra_compute_steps(journal) == 10 + 12

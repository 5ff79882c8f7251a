"""Probes (trainer_bridge/probe.py): each arm trains from the same exact snapshot on the same batches, and
the run goes on bit for bit as if no probe had happened, in a plain PyTorch loop and under the HF
Trainer (real runs, real store). The extrapolation is checked on curves whose answer is known."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import TrainerCallback

import selfsteer
from selfsteer.trainer_bridge.commands import LR_BOUNDS, InvalidCommand
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
    # A falling curve never ends above its last point.
    assert extrapolate([(0, 5.0), (4, 1.0), (8, 0.1)], 1000) <= 0.1
    # Two steep drops that barely bend (lr 1.0 recovering) stay apart, the steeper lower, even where
    # both extrapolate below zero (clamped at 0 they tied, and the probe kept the lr).
    steep, steeper = [(0, 24.0), (2, 20.0), (4, 16.5)], [(0, 24.0), (2, 18.0), (4, 13.0)]
    assert extrapolate(steeper, 40) < extrapolate(steep, 40) < 0


def plain_loop(
    tmp_path,
    probe_at: int | None,
    steps: int = 12,
    probe_args: dict | None = None,
    lr: float = 0.01,
    keep_start: bool = False,
):
    """A nanoGPT-style loop over a tiny regression model whose batches come from the global RNG; with
    `probe_at`, a probe is sent from inside iteration `probe_at`'s body (it applies at the next
    boundary). Returns the losses logged per step, the final weights and the probe's journal row."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
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
        port=None, db=tmp_path / "runs.db", output_dir=tmp_path / "out", announce=False, keep_start=keep_start,
    )  # the probe loop's attach settings # fmt: skip
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
    logged = [
        m for m in Store(tmp_path / "b" / "runs.db").get_metrics(steer.bridge.run_id) if m["name"] == "loss"
    ]
    assert sorted(m["step"] for m in logged) == list(range(12))


def test_a_restart_arm_trains_from_the_start_at_its_multiple_and_ends_a_checkpoint(tmp_path):
    # The loop's batches come from the global RNG, which the start's snapshot restores: an arm from the
    # start at x0.25 is the run started at lr 0.0025, to the step.
    lower, *_ = plain_loop(tmp_path / "a", probe_at=None, lr=0.0025)
    plain, weights, _, _ = plain_loop(tmp_path / "b", probe_at=None)
    probed, probed_weights, row, steer = plain_loop(
        tmp_path / "c", probe_at=5, probe_args={"steps": 2, "restart": [0.25]}, keep_start=True
    )
    assert row["status"] == "success", row
    (arm,) = row["result"]["restarts"]
    assert arm["train_loss"] == [lower[it] for it in range(6)]  # 6 steps: as many as the run had done
    assert arm["lr"] == pytest.approx(0.0025) and math.isfinite(arm["final"])
    assert row["result"]["cost_steps"] == 3 * 2 + 6
    assert steer.bridge.checkpoints[arm["checkpoint"]]["memory"]
    assert arm["checkpoint"] in steer.bridge.memory_checkpoints
    # The run itself went on as if nothing had happened.
    assert probed == plain
    for key, value in weights.items():
        assert torch.equal(probed_weights[key], value)
    # Without the start kept, the probe is refused whole, and says why.
    *_, refused, _ = plain_loop(tmp_path / "d", probe_at=5, probe_args={"restart": [0.25]})
    assert refused["status"] == "failed" and "keep_start" in refused["error"]


def test_a_run_above_the_lr_bounds_is_probed_at_its_own_lr_and_other_arms_at_the_bound(tmp_path):
    # A start above every lr command's bound (plain SGD's lrs reach 10): x1 is still the run's own future;
    # clamped with the others, every arm trained at the bound alike and the probe kept the lr for good.
    plain, *_ = plain_loop(tmp_path / "a", probe_at=None, lr=3.0)
    _, _, row, _ = plain_loop(tmp_path / "b", probe_at=5, lr=3.0)
    arms = {arm["factor"]: arm for arm in row["result"]["arms"]}
    assert row["result"]["lr"] == 3.0
    assert [arms[f]["lr"] for f in (0.5, 1.0, 2.0)] == [LR_BOUNDS[1], 3.0, LR_BOUNDS[1]]
    assert arms[1.0]["train_loss"] == [plain[it] for it in range(6, 10)]
    assert arms[0.5]["train_loss"][1] != arms[1.0]["train_loss"][1]


def test_a_probe_is_refused_whole_when_its_arguments_are_wrong_and_fails_clearly_without_train_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steer = selfsteer.attach(model, optimizer, max_steps=3, port=None, db=tmp_path / "runs.db",
                             output_dir=tmp_path / "out", announce=False)  # a three-step loop's attach settings # fmt: skip
    for bad in ({"factors": [1.0, 1.0]}, {"factors": []}, {"steps": 0}, {"factors": [100.0]},
                {"steps": 8, "horizon": 4}, {"factors": ["2"]}):  # the refused probe arguments, side by side # fmt: skip
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


def trainer_run(tmp_path, probe: dict | None, *more: str):
    overrides = [
        "training.max_steps=12",
        "training.eval_steps=6",
        "training.logging_steps=1",
        "training.learning_rate=5e-3",
        "training.seed=1",
        *more,
    ]
    run = RecipeRun(
        load_recipe("tiny", overrides), out_dir=tmp_path / "out", db=tmp_path / "runs.db", port=None
    )
    sender = SendAt(run, 5, probe) if probe is not None else None
    if sender is not None:
        run.trainer.add_callback(sender)
    try:
        run.train()
        metrics = sorted(
            (m["name"], m["step"], m["value"])
            for m in run.bridge.store.get_metrics(run.run_id)
            if m["name"] in ("loss", "eval_loss", "grad_norm", "learning_rate")
        )
        weights = {k: v.clone() for k, v in run.trainer.model.state_dict().items()}
        return metrics, weights, run.bridge.command(sender.uuid) if sender else None
    finally:
        run.close()


def test_a_probe_under_the_hf_trainer_measures_its_arms_and_the_run_goes_on_bit_for_bit(
    tmp_path, one_torch_thread
):
    metrics, weights, _ = trainer_run(tmp_path / "a", None)
    probed_metrics, probed_weights, row = trainer_run(
        tmp_path / "b", {"factors": [0.25, 1.0, 4.0], "steps": 3}
    )
    assert row["status"] == "success", row
    result = row["result"]
    assert result["cost_steps"] == 9 and [a["factor"] for a in result["arms"]] == [0.25, 1.0, 4.0]
    assert result["lr"] > 0 and all(
        a["lr"] == pytest.approx(result["lr"] * a["factor"]) for a in result["arms"]
    )
    firsts = {a["train_loss"][0] for a in result["arms"]}
    assert len(firsts) == 1  # the same first batch and weights in every arm
    assert all(len(a["eval_loss"]) == 3 and a["eval_loss"][0][1] == result["start"] for a in result["arms"])
    assert probed_metrics == metrics
    for key, value in weights.items():
        assert torch.equal(probed_weights[key], value)


def test_a_probe_under_a_plateau_scheduler_leaves_it_to_the_evaluations(tmp_path, one_torch_thread):
    # ReduceLROnPlateau steps on an evaluation's metric: the Trainer never steps it per step, nor may a probe.
    plateau = "training.lr_scheduler_type=reduce_lr_on_plateau"
    metrics, weights, _ = trainer_run(tmp_path / "a", None, plateau)
    probed_metrics, probed_weights, row = trainer_run(
        tmp_path / "b", {"factors": [0.5, 1.0], "steps": 2}, plateau
    )
    assert row["status"] == "success", row
    assert [a["lr"] for a in row["result"]["arms"]] == [pytest.approx(2.5e-3), 5e-3]
    assert probed_metrics == metrics
    for key, value in weights.items():
        assert torch.equal(probed_weights[key], value)


def arm(factor, final, estimate):
    return {"factor": factor, "lr": 0.01 * factor, "train_loss": [], "eval_loss": [], "final": final,
            "estimate": estimate, "diverged": estimate is None}  # an arm as the probe reports it # fmt: skip


def probed(*arms, avoid=()):
    from selfsteer.agents.observation import Observation

    observation = Observation(step=20, lr=0.01, max_steps=60, eval_loss=[(10, 4.0), (20, 3.8)])
    observation.probe = {"steps": 4, "horizon": 20, "arms": list(arms)}
    observation.avoid = list(avoid)
    return observation


def test_the_probe_supervisor_takes_the_best_measured_arm_beyond_its_margin_and_never_a_barred_one():
    from selfsteer.agents.observation import Observation
    from selfsteer.agents.probe_supervisor import ProbeSupervisor

    supervisor = ProbeSupervisor(factors=(0.25, 0.5, 2.0, 4.0), margin=0.01, directed=False, budget=None)
    assert supervisor.factors == (0.25, 0.5, 1.0, 2.0, 4.0)  # x1 is always probed: the arm to beat
    evidence = supervisor.evidence(probed())
    assert evidence == {"factors": [0.25, 0.5, 1.0, 2.0, 4.0], "steps": 4, "horizon": 20}  # 2 x the interval
    near_end = Observation(step=55, lr=0.01, max_steps=60, eval_loss=[(40, 4.0), (50, 3.8)])
    assert supervisor.evidence(near_end)["horizon"] == 5  # never past the run's end
    decision = supervisor.decide(probed(arm(0.5, 3.7, 3.6), arm(1.0, 3.6, 3.5), arm(4.0, 3.4, 3.2)))
    assert (decision.action, decision.factor, decision.apply(0.01)) == ("double", 4.0, pytest.approx(0.04))
    assert "x4 measured 3.400" in decision.explanation  # clearly better measured: no estimate needed
    close = supervisor.decide(probed(arm(1.0, 3.60, 3.5), arm(2.0, 3.59, 3.4)))  # measured alike
    assert (close.action, close.factor) == ("double", 2.0) and "2.9% lower" in close.explanation
    # A steep straight drop at x1 extrapolates far below x0.5, but x0.5 measured clearly better: halve
    # (tiny from lr 1.0, step 11, as the lr-suite journaled it).
    steep = supervisor.decide(probed(arm(0.5, 21.67, 15.33), arm(1.0, 26.03, -31.08)))
    assert (steep.action, steep.factor) == ("halve", 0.5)
    within = supervisor.decide(probed(arm(1.0, 3.6, 3.5), arm(2.0, 3.6, 3.47)))  # 0.86%: noise
    assert within.action == "keep" and within.factor is None
    # The journal stores a diverged arm's numbers as null: never the winner.
    spiky = supervisor.decide(probed(arm(1.0, 3.6, 3.5), arm(2.0, None, None), arm(0.5, 3.3, 3.3)))
    assert (spiky.action, spiky.factor) == ("halve", 0.5)
    assert (
        supervisor.decide(probed(arm(1.0, None, None), arm(2.0, None, None), arm(0.5, None, None))).action
        == "halve"
    )
    # From above the bounds (lr 9.6), the lower arm trained at the bound: its move is the factor measured.
    above = probed(arm(0.5, 23.0, 2.3), arm(1.0, 71.0, 60.0))
    above.probe["lr"], above.probe["arms"][0]["lr"], above.probe["arms"][1]["lr"] = 9.6, LR_BOUNDS[1], 9.6
    down = supervisor.decide(above)
    assert (down.action, down.apply(9.6)) == ("halve", pytest.approx(LR_BOUNDS[1]))
    assert "at the lr bound 1: x0.104" in down.explanation
    barred = supervisor.decide(probed(arm(1.0, 3.6, 3.5), arm(2.0, 3.4, 3.2), avoid=["double"]))
    assert barred.action == "keep"  # double was rolled back from this state
    assert supervisor.decide(Observation(step=5, lr=0.01)).action == "keep"  # no evidence: keep
    with pytest.raises(ValueError):
        from selfsteer.agents.supervisors import Decision

        Decision("double", "", factor=0.5)  # a factor must move the lr the action's way


def test_the_probe_asks_for_a_restart_arm_once_and_goes_on_from_it_only_when_it_measured_lower():
    from selfsteer.agents.registry import make_supervisor

    supervisor = make_supervisor("probe")
    assert "restart" not in supervisor.evidence(aligned(11, -0.1))  # a run that kept no start: no arm
    kept = partial(aligned, start_kept=True)

    # The first decision, lowering proposed: one arm from the start at x1/16, its steps out of the budget.
    first = supervisor.evidence(kept(11, -0.1))
    assert first["restart"] == [1 / 16] and first["factors"] == [0.5, 1.0] and first["steps"] == 2
    assert "restart" not in supervisor.evidence(kept(11, 0.3))  # a raise proposed: no restart arm
    assert "restart" not in (supervisor.evidence(kept(21, -0.1)) or {})  # not the first decision

    def restarted(final):
        observation = probed_at(11, arm(0.5, 20.0, 18.0), arm(1.0, 30.0, 40.0))
        restart = {"factor": 1 / 16, "lr": 0.01 / 16, "final": final, "checkpoint": "restart-x0.0625-at-11"}
        observation.probe.update(start=33.0, lr=0.01, step=11, restarts=[restart])
        return observation

    supervisor.evidence(kept(11, -0.1))
    decision = supervisor.decide(restarted(3.4))
    assert (decision.action, decision.restart) == ("halve", "restart-x0.0625-at-11")
    assert decision.factor == pytest.approx(1 / 16) and "restart" in decision.explanation
    # The restart arm's 11 steps came out of the budget: every other decision is probed now.
    assert supervisor.evidence(kept(21, -0.1)) is None
    assert "one decision in 2 is probed" in supervisor.decide(kept(21, -0.1)).explanation
    assert supervisor.evidence(kept(31, -0.1))["factors"] == [0.5, 1.0]  # a lowering won: lower still
    supervisor.evidence(kept(11, -0.1))  # a new run
    worse = supervisor.decide(restarted(33.0))  # no lower than the run now: the probe's own move
    assert (worse.action, worse.restart, worse.factor) == ("halve", None, 0.5)


def aligned(step, alignment, max_steps=60, interval=10, start_kept=False):
    """An observation at `step` whose update alignment since the evaluation before last is `alignment`
    (None: none logged), of a run that keeps its start or not."""
    from selfsteer.agents.observation import Observation

    evals = list(range(interval, step, interval))
    points = [] if alignment is None else [(s, alignment) for s in range(1, step + 1)]
    evals = [(s, 4.0) for s in evals]
    return Observation(
        step=step,
        lr=0.01,
        max_steps=max_steps,
        eval_loss=evals,
        update_alignment=points,
        start_kept=start_kept,
    )


def test_the_directed_probe_follows_the_alignment_escalates_raises_only_and_keeps_to_its_budget():
    from selfsteer.agents.probe_supervisor import ProbeSupervisor
    from selfsteer.agents.registry import make_supervisor

    supervisor = make_supervisor("probe")
    # 60 steps, an evaluation every 10: 5 decisions share 30 steps, 6 each, so 2 arms of 3 steps.
    assert supervisor.evidence(aligned(11, 0.3)) == {"factors": [1.0, 2.0], "steps": 3, "horizon": 20}
    assert supervisor.evidence(aligned(11, -0.1))["factors"] == [0.5, 1.0]
    assert supervisor.evidence(aligned(11, None)) == {"factors": [0.5, 1.0, 2.0], "steps": 2, "horizon": 20}
    # Raises that win are followed by ones twice as large while the alignment agrees, up to x8.
    for step, factor in ((11, 2.0), (21, 4.0), (31, 8.0)):
        probe = supervisor.evidence(aligned(step, 0.3))
        assert probe["factors"][-1] == factor
        decision = supervisor.decide(probed_at(step, arm(1.0, 3.6, 3.5), arm(factor, 3.3, 3.1)))
        assert (decision.action, decision.factor) == ("double", factor)
    assert supervisor.evidence(aligned(41, 0.3))["factors"] == [1.0, 8.0]  # x8 at most
    assert supervisor.evidence(aligned(41, -0.2))["factors"] == [0.5, 1.0]  # the alignment turned
    # A rollback to step 21 (or a new run) forgets the moves from there on: x4 again after the x2 at 11.
    assert supervisor.evidence(aligned(21, 0.3))["factors"] == [1.0, 4.0]
    # A lowering that won is followed by another try lower, whatever the alignment; never escalated.
    supervisor.decide(probed_at(21, arm(0.5, 3.3, 3.1), arm(1.0, 3.6, 3.5)))
    assert supervisor.evidence(aligned(31, 0.3))["factors"] == [0.5, 1.0]
    supervisor.decide(probed_at(31, arm(0.5, 3.3, 3.1), arm(1.0, 3.6, 3.5)))
    assert supervisor.evidence(aligned(41, 0.3))["factors"] == [0.5, 1.0]
    supervisor.decide(probed_at(41, arm(0.5, 3.6, 3.5), arm(1.0, 3.6, 3.5)))  # x1 holds: keep
    assert supervisor.evidence(aligned(51, 0.3))["factors"] == [1.0, 2.0]
    # Self-correction's retry (an action rolled back from this state): the other way only, or nothing.
    retry = aligned(51, 0.3)
    retry.avoid = ["double"]
    assert supervisor.evidence(retry)["factors"] == [0.5, 1.0]
    retry.avoid = ["double", "halve"]
    assert supervisor.evidence(retry) is None
    # A budget too small for 2 steps an arm at every decision probes every k-th decision only.
    thrifty = ProbeSupervisor(budget=0.1)  # 6 steps for 5 decisions: 4 a probe, every 4th decision
    probed_steps = [s for s in (11, 21, 31, 41, 51) if thrifty.evidence(aligned(s, 0.3)) is not None]
    assert probed_steps == [11, 51] and thrifty.evidence(aligned(11, 0.3))["steps"] == 2
    # probe:full, the 3-arm probe measured before the budget: every factor, 4 steps, no limit.
    full = make_supervisor("probe:full")
    assert full.evidence(aligned(11, 0.3)) == {"factors": [0.5, 1.0, 2.0], "steps": 4, "horizon": 20}
    with pytest.raises(ValueError, match="probe:full"):
        make_supervisor("probe:cheap")


def probed_at(step, *arms):
    observation = probed(*arms)
    observation.step = step
    return observation


def probed_run(tmp_path, lr: float) -> tuple[dict, Store, list]:
    """A tiny run of 30 steps (an evaluation every 10) from `lr`, held at each evaluation for the probe
    supervisor, which pauses it while deciding. Returns its summary, its store and its recipe."""
    from selfsteer.agents.registry import make_supervisor
    from selfsteer.graphs.supervise import run_supervision

    def supervise(control, stop):
        run_supervision(
            control, make_supervisor("probe"), db=str(tmp_path / "graph.sqlite"), stop_event=stop,
            pause_while_deciding=True,
        )  # the held probe # fmt: skip

    recipe = load_recipe(
        "tiny", [f"training.learning_rate={lr:e}", "training.max_steps=30", "training.eval_steps=10"]
    )
    run = RecipeRun(recipe, tmp_path / "out", db=tmp_path / "runs.sqlite", port=0, supervisor=supervise,
                    hold_for_supervisor=True)  # the held run of test_run_control's # fmt: skip
    try:
        summary = run.train()
    finally:
        run.close()
    return summary, Store(tmp_path / "runs.sqlite"), recipe


def test_the_probe_supervisor_steers_a_real_run_from_a_too_low_start(tmp_path, one_torch_thread):
    summary, store, _ = probed_run(tmp_path, 1e-4)
    run_id = summary["run_id"]
    probes = [c for c in store.list_commands(run_id) if c["type"] == "probe"]
    decisions = store.list_decisions(run_id)
    losses = [m for m in store.get_metrics(run_id) if m["name"] == "loss"]
    assert (
        len(decisions) == 2 and len(probes) == 2
    )  # an evaluation at 10 and 20, a probe before each decision
    # The budget, half the run's 30 steps over its 2 decisions: 7.5 steps a probe, so 3 for each of 2 arms.
    assert all(p["status"] == "success" and p["result"]["cost_steps"] == 6 for p in probes)
    for decision, probe in zip(decisions, probes, strict=True):
        seen = decision["observation"]["probe"]
        assert seen["arms"] == probe["result"]["arms"]  # the decision saw what the probe measured
        assert "Probe: each lr trained 3 steps" in decision["observation"]["views"]["probe"]
    # Far too low: successive steps agree, so x2 is probed; it wins, and the lr doubles. The next probe
    # tries a raise twice as large.
    assert [a["factor"] for a in probes[0]["result"]["arms"]] == [1.0, 2.0]
    assert decisions[0]["action"] == "double" and decisions[0]["lr_after"] == pytest.approx(2e-4)
    assert [a["factor"] for a in probes[1]["result"]["arms"]] == [1.0, 4.0]
    assert sorted(m["step"] for m in losses) == list(range(1, 31))  # the arms trained off the record
    assert summary["steps"] == 30


def test_from_a_far_too_high_start_the_probe_measures_a_restart_and_goes_on_from_it(
    tmp_path, one_torch_thread
):
    summary, store, recipe = probed_run(tmp_path, 1.0)
    journal = store.list_commands(summary["run_id"])
    decisions = store.list_decisions(summary["run_id"])
    eval_loss = {(m["branch"], m["step"]): m["value"] for m in store.get_metrics(summary["run_id"])
                 if m["name"] == "eval_loss"}  # by branch and step # fmt: skip
    # lr 1.0 wrecks tiny within its first 10 steps. At the first decision the probe lowers, and an arm
    # trained from the start at x1/16 for as many steps measures far lower than the run: the run goes on
    # from that arm, in a new branch.
    probe = next(c for c in journal if c["type"] == "probe")
    (arm,) = probe["result"]["restarts"]
    assert arm["factor"] == 1 / 16 and arm["final"] < probe["result"]["start"] / 2
    first = decisions[0]
    assert first["action"] == "halve" and first["explanation"].startswith("restart:")
    assert first["lr_after"] == pytest.approx(1 / 16, rel=0.01)
    load = next(c for c in journal if c["type"] == "load_checkpoint")
    assert (
        load["args"] == {"checkpoint": arm["checkpoint"], "branch": "restart-1"}
        and load["status"] == "success"
    )
    assert eval_loss[("restart-1", 20)] < eval_loss[("main", 10)] / 2
    assert summary["final_eval_loss"] < 5  # left at 1.0, tiny ends above 17 (the lr-suite's static rows)
    # A replay runs the restart arm again, to the bit, and forks to it at the same step.
    replay = RecipeRun(
        recipe, tmp_path / "replay", db=tmp_path / "runs.sqlite", port=None, replay_of=summary["run_id"]
    )
    try:
        again = replay.train()
        replayed = [
            c["type"] for c in replay.bridge.store.list_commands(replay.run_id) if c["source"] == "replay"
        ]
    finally:
        replay.close()
    assert replayed == ["probe", "load_checkpoint"]  # the restart's probe, then the fork; no plain probe
    assert again["final_eval_loss"] == summary["final_eval_loss"]
    assert summary["compute_steps"] == 30 + sum(
        c["result"]["cost_steps"] for c in journal if c["type"] == "probe"
    )


class Answers:
    """A scripted chat model (it stands for any model, remote ones included): each call answers the next
    JSON text of the script and records the prompt it was sent."""

    model_name = "scripted"

    def __init__(self, *answers):
        self.answers, self.prompts = list(answers), []

    def with_structured_output(self, schema, include_raw=False):
        from langchain_core.messages import AIMessage

        def invoke(messages):
            self.prompts.append(messages)
            text = self.answers.pop(0)
            try:
                parsed, error = schema.model_validate_json(text), None
            except ValueError as failure:
                parsed, error = None, failure
            return {"raw": AIMessage(content=text), "parsed": parsed, "parsing_error": error}

        return type("Runnable", (), {"invoke": staticmethod(invoke)})()


def test_the_hybrid_asks_the_model_only_about_a_measured_move_and_the_model_can_veto_it():
    from selfsteer.agents.decision import ModelAnswerError
    from selfsteer.agents.probe_supervisor import VettedProbeSupervisor

    model = Answers(
        '{"action": "double", "explanation": "x2 wins clearly"}',
        '{"action": "keep", "explanation": "too small a gain"}',
        '{"action": "halve", "explanation": "the loss rises"}',
        "not json",
    )
    hybrid = VettedProbeSupervisor(model)
    assert hybrid.decide(probed(arm(1.0, 3.6, 3.5), arm(2.0, 3.6, 3.49))).action == "keep"
    assert model.prompts == []  # a keep needs no model
    wins = probed(arm(0.5, 3.7, 3.6), arm(1.0, 3.6, 3.5), arm(2.0, 3.4, 3.2))
    confirmed = hybrid.decide(wins)
    assert (confirmed.action, confirmed.factor) == (
        "double",
        2.0,
    ) and "confirmed: x2 wins" in confirmed.explanation
    user = model.prompts[0][1][1]
    assert "x2: fell 5.6% now, fell 8.6% extrapolated" in user
    assert not any(lr in user for lr in ("0.005", "0.01", "0.02", "1e-2"))  # relative only: no absolute lr
    vetoed = hybrid.decide(wins)
    assert vetoed.action == "keep" and vetoed.explanation.startswith("vetoed x2 (keep): too small a gain")
    assert hybrid.decide(wins).action == "keep"  # the opposite move is a veto too
    with pytest.raises(ModelAnswerError) as failed:  # asked once: the graph's decide node retries
        hybrid.decide(wins)
    kept = hybrid.fallback(wins, failed.value)  # no valid answer after the retries: the proposal stands
    assert (kept.action, kept.factor, kept.fallback) == ("double", 2.0, True)
    assert kept.raw_output == "not json" and "the measured proposal stands" in kept.explanation
    assert hybrid.fallback(probed(arm(1.0, 3.6, 3.5)), failed.value).action == "keep"  # nothing measured

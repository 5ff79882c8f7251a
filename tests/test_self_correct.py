"""Self-correction: the judgement of a decision, the reflections, and a real tiny run in which a
scripted bad decision is checked, reflected on, rolled back into a new branch and retried."""

from __future__ import annotations

import math
import threading

import pytest
from helpers.live_run import LiveRun
from helpers.polling import wait_for
from helpers.self_correct import AlwaysDouble, supervised_run

from selfsteer.agents.decision_data import decision_rows
from selfsteer.agents.llm.chat import LocalChatModel
from selfsteer.agents.observation import Observation
from selfsteer.agents.self_correct import MAX_REFLECTION_CHARS, factual_reflection, judge
from selfsteer.agents.supervisors import Decision, LLMSupervisor, RuleSupervisor, Supervisor
from selfsteer.graphs.supervise import SelfCorrection, run_supervision
from selfsteer.trainer_bridge.store import Store


def observed(eval_loss, step=None):
    step = step or eval_loss[-1][0]
    return Observation(step=step, lr=0.1, max_steps=60, train_loss=[(1, 5.5)], eval_loss=eval_loss)


def test_a_decision_fails_when_the_next_eval_loss_rises_past_the_margin():
    assert judge(3.0, 11, observed([(10, 3.0)])) is None  # no evaluation since the decision: no verdict
    held = judge(3.0, 11, observed([(10, 3.0), (20, 3.0 * 1.019)]))
    assert not held.failed and held.step == 20 and held.expected == 3.0
    rose = judge(3.0, 11, observed([(10, 3.0), (20, 3.0 * 1.021), (30, 2.0)]))
    assert rose.failed and rose.loss_after == pytest.approx(3.063)  # the first evaluation after it
    assert judge(3.0, 11, observed([(10, 3.0), (20, math.nan)])).failed
    assert not judge(3.0, 11, observed([(10, 3.0), (20, 3.06)]), margin=0.05).failed
    text = factual_reflection("double", 0.1, 0.2, 11, rose)
    assert "double" in text and "3.000" in text and "3.063" in text and "3.060" in text


def test_a_bad_decision_is_rolled_back_into_a_new_branch_and_retried(tmp_path):
    # At lr 0.1 the tiny model takes one doubling (0.2) and not a second (0.4): its eval loss rises.
    supervisor = AlwaysDouble()
    summary, final, db = supervised_run(tmp_path, supervisor, 0.1, SelfCorrection())
    with Store(db) as store:
        run_id = summary["run_id"]
        decisions = store.list_decisions(run_id)
        journal = [c for c in store.list_commands(run_id) if c["source"] != "trainer"]
        branches = {m["branch"] for m in store.get_metrics(run_id)}
        rows = decision_rows(store, run_id)

    # One decision per evaluation, rollback or not (the evaluations of the branch left behind are no news).
    assert [d["step"] for d in decisions] == [11, 21, 31, 41, 51]
    failed = next(d for d in decisions if d["rolled_back"])
    iteration = decisions.index(failed) + 1
    # Journal: the rollback point is saved before the lr change, at the step of the decision ...
    types = [(c["type"], c["args"]) for c in journal]
    point = f"rollback-{iteration}-{run_id[:8]}"
    save = types.index(("save_checkpoint", {"name": point}))
    assert types[save + 1] == ("set_optimizer", {"lr": failed["lr_after"]})
    assert journal[save]["step"] == journal[save + 1]["step"] and journal[save]["status"] == "success"
    # ... and, after the check, loaded into a new branch; the abandoned branch stays in the metrics.
    load = types.index(("load_checkpoint", {"checkpoint": point, "branch": f"retry-{iteration}"}))
    assert load > save + 1 and journal[load]["status"] == "success"
    assert {"main", f"retry-{iteration}"} <= branches
    assert journal[load]["result"]["checkpoint_step"] == journal[save]["step"]
    # The verdict and the reflection are stored with the failed decision.
    verdict = failed["outcome"]["verdict"]
    assert verdict["failed"] and verdict["loss_after"] > verdict["loss_before"] * 1.02
    assert failed["outcome"]["extra_steps"] == journal[load]["step"] - journal[save]["step"] > 0
    assert failed["reflection"].startswith(f"At step {failed['step']} I chose to double")
    # The retry: made in its place, from the rollback point, it differs and saw why.
    retry = decisions[iteration]
    assert retry["retry_of"] == failed["id"] and retry["action"] != "double"
    assert retry["lr_before"] == pytest.approx(failed["lr_before"])  # the checkpoint's lr is back
    shown = supervisor.seen[iteration]
    assert shown.avoid == ["double"] and shown.reflections[-1] == failed["reflection"]
    assert "do not double" in " ".join(shown.warnings())
    # Later decisions remember it; decision data and the summary say what happened.
    assert all(failed["reflection"] in o.reflections for o in supervisor.seen[iteration + 1 :])
    row = next(r for r in rows if r["rolled_back"])
    assert row["reflection"] == failed["reflection"] and rows[iteration]["retry_of"] == failed["id"]
    # A later failure would overrun the budget of abandoned steps (25%): its lr change is given back.
    reverted = [d for d in decisions if d["reflection"] and not d["rolled_back"]]
    assert reverted and all(
        d["outcome"]["why_not_rolled_back"] == "over the budget of extra steps" for d in reverted
    )
    for d in reverted:
        undo = next(c for c in journal if c["type"] == "set_optimizer" and c["step"] > d["step"])
        assert undo["args"] == {"lr": d["lr_before"]}
    sc = summary["self_correction"]
    assert sc["rollbacks"] == final["rollbacks"] >= 1 and sc["extra_steps"] == final["extra_steps"]
    assert sc["extra_steps"] <= 0.25 * 60 and summary["steps"] == 60


def test_without_self_correction_nothing_is_checked(tmp_path):
    summary, final, db = supervised_run(tmp_path, AlwaysDouble(), 0.1, None)
    with Store(db) as store:
        journal = store.list_commands(summary["run_id"])
    assert not any(
        c["type"] in ("save_checkpoint", "load_checkpoint") for c in journal if c["source"] != "trainer"
    )
    assert summary["self_correction"] == {"failed": 0, "rollbacks": 0, "extra_steps": 0}
    # Doubled every time, up to the bound the run accepts (1.0): nothing stopped it.
    assert [d["action"] for d in summary["decisions"]] == ["double"] * 5
    assert summary["decisions"][-1]["lr_after"] == 1.0


def test_a_retry_of_the_embedded_model_cannot_repeat_the_rolled_back_action():
    rising = observed([(10, 3.0), (20, 3.4)], step=21)
    supervisor = LLMSupervisor(LocalChatModel(field_max_chars=40), "compact_stats")
    assert supervisor.decide(rising).action == "double"  # the untrained model's habit
    rising.avoid = ["double"]
    rising.reflections = ["doubling at step 11 made the eval loss rise from 3.0 to 3.4"]
    retry = supervisor.decide(rising)
    assert retry.action in ("halve", "keep") and not retry.fallback
    assert "do not double" in supervisor.messages(rising)[-1][1]
    facts = "At step 11 I chose to double the learning rate (0.1 -> 0.2); the eval loss rose."
    text = supervisor.reflect(rising, "double", facts)
    # The model's own words: a failing model reflects with the facts verbatim, so equal means fallback.
    assert text and text != facts and len(text) <= MAX_REFLECTION_CHARS
    assert RuleSupervisor().reflect(rising, "double", facts) == facts  # no model: the facts


def test_reflections_of_earlier_runs_are_remembered_when_asked(tmp_path):
    first, _, db = supervised_run(tmp_path, AlwaysDouble(), 0.1, SelfCorrection())
    with Store(db) as store:
        learned = [d["reflection"] for d in store.list_decisions(first["run_id"]) if d["reflection"]]
    assert learned
    remembering, forgetting = AlwaysDouble(), AlwaysDouble()
    supervised_run(tmp_path, remembering, 0.1, SelfCorrection(remember_runs=True, memory=2))
    supervised_run(tmp_path, forgetting, 0.1, SelfCorrection())
    assert remembering.seen[0].reflections == learned[-2:]  # the latest two, oldest first
    assert forgetting.seen[0].reflections == []


class DecidesLate(Supervisor):
    """Doubles, but answers its first question only once training has reached step 25 (a gate the test
    holds): a supervisor that does not hold the run, slower than the run's next evaluation. It looks
    while the run is held at step 11, so it sees the first evaluation only."""

    name = "decides-late"

    def __init__(self, gate):
        self.gate = gate

    def decide(self, observation):
        self.gate.release(11)
        self.gate.wait(25)
        return Decision("double", f"scripted at step {observation.step}")


def test_in_the_unheld_loop_a_change_is_judged_by_an_evaluation_after_it_took_effect(tmp_path):
    """The run goes on while the supervisor decides (the default loop): the decision seen at the first
    evaluation takes effect at step 25, after the evaluation at step 20, which saw the old lr. Its check
    must wait for the evaluation at step 30."""
    overrides = ["training.learning_rate=0.01", "training.max_steps=50"]
    with LiveRun(tmp_path, overrides, gates=[11, 25, 35]) as live, Store(live.db) as store:
        thread = threading.Thread(
            target=run_supervision,
            args=(live.run.url, DecidesLate(live.gate)),
            kwargs={"db": str(live.db), "max_iterations": 2, "self_correct": SelfCorrection(margin=5.0)},
            daemon=True,
        )
        thread.start()
        run_id = live.run.run_id
        lr_commands = lambda: [c for c in store.list_commands(run_id) if c["type"] == "set_optimizer"]  # noqa: E731
        wait_for(lambda: len(lr_commands()) == 1)
        live.gate.release(25)  # the first change takes effect at step 25
        wait_for(lambda: len(lr_commands()) == 2)
        live.gate.release(35)  # the second before step 35: the run cannot end without it
        summary = live.join()
        thread.join(60)
        first, second = store.list_decisions(run_id)
        eval_20 = next(m["value"] for m in store.get_metrics(run_id, names=["eval_loss"]) if m["step"] == 20)
    assert first["step"] < 20 and first["applied_step"] == 25  # observed before step 20, applied at 25
    assert first["command"] is not None
    verdict = first["outcome"]["verdict"]
    assert verdict["step"] == 30 and not verdict["failed"]  # not the evaluation at step 20
    # Its loss before: the latest evaluation before it took effect (step 20's), not the one it saw.
    assert verdict["loss_before"] == pytest.approx(eval_20)
    # No new decision over an unjudged one: the second comes after the verdict.
    assert second["step"] >= 30 and 30 < second["applied_step"] <= 35
    assert [d["applied_step"] for d in summary["decisions"]] == [25, second["applied_step"]]


class Raises(Supervisor):
    name = "raises"

    def decide(self, observation):
        raise RuntimeError("a bug in a plug-in")


def test_a_supervisor_that_raises_while_holding_the_run_leaves_it_running(tmp_path):
    """Held while deciding (`--pause-while-deciding`): each failure is journaled as a fallback keep and
    the run goes on to the end; a crash of the loop itself resumes the held run and journals why."""
    summary, final, db = supervised_run(tmp_path, Raises(), 0.003, None)
    assert summary["steps"] == 60 and summary["status"] == "finished"
    decisions = summary["decisions"]
    assert len(decisions) == 5 and {d["action"] for d in decisions} == {"keep"}
    assert all("a bug in a plug-in" in d["explanation"] for d in decisions)
    assert all(d["applied_step"] is None for d in decisions)  # nothing was sent

    def crash_after_deciding(decision):
        raise RuntimeError("the loop itself crashed")

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    summary, _, db = supervised_run(crashed, AlwaysDouble(), 0.003, None, on_decision=crash_after_deciding)
    assert summary["steps"] == 60 and summary["status"] == "finished"  # not held forever
    with Store(db) as store:
        pauses = [c for c in store.list_commands(summary["run_id"]) if c["type"] in ("pause", "resume")]
    assert [c["type"] for c in pauses] == ["pause", "resume"]
    decided, journaled = summary["decisions"]
    assert decided["action"] == "double" and decided["applied_step"] is None  # it crashed before acting
    assert journaled["action"] == "keep" and "the loop itself crashed" in journaled["explanation"]


def test_with_every_steps_no_decision_is_made_over_an_unjudged_one(tmp_path):
    """`every_steps` wakes the loop between evaluations; a change not yet judged (no evaluation after it
    took effect) is neither overwritten by a new decision nor checked in a loop that pauses the run at
    every wake-up: the loop waits for the evaluation, and ends within its cap."""
    summary, final, db = supervised_run(
        tmp_path, AlwaysDouble(), 1e-4, SelfCorrection(margin=5.0), every_steps=3, max_iterations=20
    )
    with Store(db) as store:
        run_id = summary["run_id"]
        evals = [m["step"] for m in store.get_metrics(run_id, names=["eval_loss"])]
        pauses = [c for c in store.list_commands(run_id) if c["type"] == "pause"]
    decisions = summary["decisions"]
    assert summary["steps"] == 60 and len(decisions) >= 3
    assert all(d["action"] == "double" and d["applied_step"] is not None for d in decisions)
    for made, following in zip(decisions, decisions[1:], strict=False):
        # the next decision came only after an evaluation judged this one
        assert any(made["applied_step"] < step <= following["step"] for step in evals), (made, following)
    assert len(pauses) <= 2 * len(decisions) + 2  # a wake-up is a pause only when it can decide or judge


class StopsTheRunWhileReflecting(AlwaysDouble):
    """Doubles; asked to reflect on a failure, first stops the run and waits until it has ended: the
    rollback that follows finds a run that trains no more."""

    name = "stops-while-reflecting"

    def __init__(self, live):
        super().__init__()
        self.live = live

    def reflect(self, observation, action, facts):
        self.live.client.stop()
        self.live.join()
        return facts


def test_a_failure_judged_as_the_run_ends_is_recorded_without_a_rollback(tmp_path):
    """A check that fails a change when the run has no steps left (it ended while the supervisor
    judged) records the failure and ends the loop: no rollback into a run that will not apply it, no
    crash of the supervisor on the finished run."""
    overrides = ["training.max_steps=100000", "training.eval_steps=10", "training.learning_rate=0.3"]
    with LiveRun(tmp_path, overrides) as live, Store(live.db) as store:
        final = run_supervision(
            live.run.url,
            StopsTheRunWhileReflecting(live),
            db=str(live.db),
            max_iterations=5,
            pause_while_deciding=True,
            self_correct=SelfCorrection(margin=0.0),
        )
        run_id = live.run.run_id
        decisions = store.list_decisions(run_id)
        types = [c["type"] for c in store.list_commands(run_id) if c["source"] == "stops-while-reflecting"]
    assert final["finished"]
    failed = decisions[-1]
    assert failed["reflection"] and failed["outcome"]["why_not_rolled_back"] == "the run ended first"
    assert failed["outcome"]["verdict"]["failed"] and not failed["rolled_back"]
    assert "load_checkpoint" not in types

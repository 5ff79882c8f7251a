"""Self-correction: the judgement of a decision, the reflections, and a real tiny run in which a
scripted bad decision is checked, reflected on, rolled back into a new branch and retried."""

from __future__ import annotations

import math

import pytest
from helpers.self_correct import AlwaysDouble, supervised_run

from selfsteer.agents.decision_data import decision_rows
from selfsteer.agents.local_chat import LocalChatModel
from selfsteer.agents.observation import Observation
from selfsteer.agents.self_correct import MAX_REFLECTION_CHARS, factual_reflection, judge
from selfsteer.agents.supervisors import LLMSupervisor, RuleSupervisor
from selfsteer.graphs.supervise import SelfCorrection
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
    assert text and len(text) <= MAX_REFLECTION_CHARS
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

"""The decisions task (`decisions:DIR`): a supervisor's lr decisions as self-correction items, over real
counterfactual rows (the shipped intervener's training rows, agents/intervener/counterfactual.tar.gz).

- a decision passes when its regret is within the noise margin; a failure's reason is what the run
  showed after it (its own eval loss), never which action was best;
- the split is by workload, and the evaluation-only workload is always test;
- the first try is the policy's decision, cached; the model is asked only to reflect;
- the retry is the frozen actor's (the embedded model), and never the barred failed action;
- GRPO's reward asks the actor, not the policy being trained."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

import pytest

from selfsteer.agents.counterfactual_rows import CounterfactualRow
from selfsteer.agents.intervener_data import noise_margin, read_rows, regret
from selfsteer.agents.reflector import outcome_reason
from selfsteer.cli.main import main
from selfsteer.evals import reflector_eval
from selfsteer.evals.counterfactual import workload_key
from selfsteer.evals.held_out import EVALUATION_WORKLOADS
from selfsteer.evals.tasks import decisions, load_task
from selfsteer.graphs.reflect import ReflectConfig, reflection_reward, run_episodes
from selfsteer.trainer_bridge.records import ACTIONS

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_torch_thread")]

ARCHIVE = Path(decisions.__file__).parents[2] / "agents" / "intervener" / "counterfactual.tar.gz"
TRAIN_WORKLOAD, TEST_WORKLOAD = "tiny-adamw-constant", "tiny-sgd-constant"


def evaluation_spec(spec: dict) -> dict:
    """A row's spec moved to the evaluation-only workload (reflector-heldout), as its collection stores it."""
    held = EVALUATION_WORKLOADS["reflector-heldout"]
    return {
        **spec,
        "shape": "tiny[n_embd=48,n_head=3,n_layer=2]",
        "optimizer": "adafactor",
        "schedule": "linear",
        "base_recipe": held["recipe"],
        "overrides": list(held["overrides"]),
    }


@pytest.fixture(scope="module")
def rows_dir(tmp_path_factory) -> Path:
    """12 rows of a train workload, 12 of a test workload, 4 of the evaluation-only one."""
    with tarfile.open(ARCHIVE) as archive:
        member = archive.getmember("cf-r0dev/A/rows.jsonl")
        lines = archive.extractfile(member).read().decode().splitlines()
    every: dict[str, list[CounterfactualRow]] = {TRAIN_WORKLOAD: [], TEST_WORKLOAD: []}
    for line in lines:
        row = CounterfactualRow.from_json(line)
        every.get(workload_key(row.spec), []).append(row)
    picked = {key: rows[:: len(rows) // 16][:16] for key, rows in every.items()}  # start lrs of every kind
    held = [row.model_copy(update={"spec": evaluation_spec(row.spec)}) for row in picked[TRAIN_WORKLOAD][12:]]
    directory = tmp_path_factory.mktemp("decisions")
    rows = picked[TRAIN_WORKLOAD][:12] + picked[TEST_WORKLOAD][:12] + held
    (directory / "rows.jsonl").write_text("".join(row.to_json() + "\n" for row in rows))
    return directory


def task(directory: Path) -> str:
    return f"decisions:{directory}"


def test_a_decision_passes_within_the_margin_and_a_failure_says_what_the_run_showed(rows_dir):
    rows = read_rows([rows_dir])
    margin = noise_margin(rows)
    failures = 0
    for row in rows:
        validate = decisions.validator(row, margin)
        for action in ACTIONS:
            verdict = validate(f'{{"action": "{action}", "explanation": "x"}}')
            assert verdict.passed == (regret(row, action) <= margin)
            assert verdict.cost == pytest.approx(regret(row, action))
            if not verdict.passed:
                failures += 1
                after = row.outcomes[action]
                assert f"after you chose {action}" in verdict.reason and f"{after:.3f}" in verdict.reason
                assert not any(other in verdict.reason for other in ACTIONS if other != action)
    assert failures > 0
    assert not decisions.validator(rows[0], margin)("no idea").passed


def test_the_split_is_by_workload_and_the_evaluation_workload_is_test_only(rows_dir):
    keys = {split: set() for split in ("train", "test")}
    for split in keys:
        for problem in load_task(task(rows_dir), split=split, policy="keep"):
            row = next(r for r in read_rows([rows_dir]) if decisions.item_id(r) == problem.id)
            keys[split].add(workload_key(row.spec))
    assert keys["train"] == {TRAIN_WORKLOAD}
    assert keys["test"] == {TEST_WORKLOAD, "tiny[n_embd=48,n_head=3,n_layer=2]-adafactor-linear"}


def test_validation_rows_are_the_train_items_no_training_draw_took(rows_dir):
    load = decisions.loader(str(rows_dir))
    train = {p.id for p in load(split="train", policy="keep")}
    drawn = {s: {p.id for p in load(split="train", n=5, seed=s, policy="keep")} for s in (0, 1)}
    assert drawn[0] != drawn[1]  # the two seeds draw different items
    unseen = {p.id for p in load(split="train", policy="keep", not_drawn_by=(5, (0, 1)))}
    assert unseen == train - drawn[0] - drawn[1] and unseen
    # The evaluation's option: N:SEEDS, and a clear error for anything else.
    assert reflector_eval.unseen_by("1000:0,1") == (1000, (0, 1))
    for bad in (["--unseen-by", "0,1"], ["--conditions", "trained,good"]):
        with pytest.raises(SystemExit):
            reflector_eval.main(["--tasks", task(rows_dir), "--reflector", "x", "--out", "o", *bad])


def test_reflector_eval_runs_only_the_conditions_asked_on_validation_rows(rows_dir, tmp_path):
    args = ["--tasks", task(rows_dir), "--reflector", "unused", "--policy", "keep", "--unseen-by", "5:0,1"]
    summary = reflector_eval.main([*args, "--conditions", "plain", "--out", str(tmp_path)])["summaries"][0]
    unseen = decisions.loader(str(rows_dir))(split="train", policy="keep", not_drawn_by=(5, (0, 1)))
    failed = [p for p in unseen if not p.validate("keep").passed]
    assert summary["n_items"] == len(unseen) and summary["n_failed_first"] == len(failed) > 0
    assert "plain" in summary and "trained" not in summary and "trained_minus_plain" not in summary
    assert "| - | - | " in (tmp_path / "report.md").read_text()  # trained and untrained: not run


def test_the_retry_table_learns_from_training_failures_and_scores_test_failures_by_the_reason_alone(
    rows_dir, tmp_path
):
    # The cell is what the reason says: the failed action, and whether the loss rose (or diverged).
    assert decisions.failure_cell("keep", "went from 3.100 to 3.200 (+3.2%) in 10 steps") == ("keep", "rose")
    assert decisions.failure_cell("double", "went from 3.100 to 3.000 (-3.2%) in 10 steps") == (
        "double",
        "fell",
    )
    assert decisions.failure_cell("double", "the loss diverged (NaN) within 10 steps.") == ("double", "rose")
    # ... as the task's own reasons word it (agents/reflector.outcome_reason), which the cell parses.
    assert decisions.failure_cell("halve", outcome_reason("halve", 3.1, 3.2, 10)) == ("halve", "rose")
    assert decisions.failure_cell("halve", outcome_reason("halve", 3.1, 3.0, 10)) == ("halve", "fell")
    assert decisions.failure_cell("keep", outcome_reason("keep", 3.1, float("nan"), 10)) == ("keep", "rose")

    train = decisions.loader(str(rows_dir))(split="train", policy="keep")
    table = decisions.fit_retry_table(train)
    expected: dict = {}
    for problem in train:
        verdict = problem.validate("keep")
        if not verdict.passed:
            cell = expected.setdefault(
                decisions.failure_cell("keep", verdict.reason), {"double": 0, "halve": 0}
            )
            for retry in cell:
                cell[retry] += problem.validate(retry).passed
    assert expected and set(table) == set(expected)
    for cell, counts in expected.items():
        assert table[cell] != "keep" and counts[table[cell]] == max(counts.values())
    assert (
        decisions.table_retry({}, "double", "x") == "keep"
        and decisions.table_retry({}, "keep", "x") == "halve"
    )

    # On test rows the table runs with no model loaded (--reflector is never read), scored as the others.
    args = ["--tasks", task(rows_dir), "--reflector", "unused", "--policy", "keep", "--out", str(tmp_path)]
    summary = reflector_eval.main([*args, "--conditions", "table", "--table-from", str(rows_dir)])[
        "summaries"
    ][0]
    failed = [
        p for p in load_task(task(rows_dir), split="test", policy="keep") if not p.validate("keep").passed
    ]
    retries = [decisions.table_retry(table, "keep", p.validate("keep").reason) for p in failed]
    passed = [p.validate(r).passed for p, r in zip(failed, retries, strict=True)]
    assert summary["table"]["retry_acc"] == pytest.approx(sum(passed) / len(passed))
    assert "trained" not in summary and "plain" not in summary
    with pytest.raises(SystemExit):
        reflector_eval.main([*args, "--conditions", "table"])  # no --table-from: nothing to fit it on


def test_first_tries_are_the_policys_decisions_and_are_cached(rows_dir):
    problems = load_task(task(rows_dir), split="test", policy="keep")
    assert {p.first_answer for p in problems} == {"keep"} and all(p.actor for p in problems)
    assert (rows_dir / "first-tries" / "keep.jsonl").is_file()
    cached = {
        json.loads(line)["id"] for line in (rows_dir / "first-tries" / "keep.jsonl").read_text().splitlines()
    }
    assert {p.id for p in problems} <= cached
    # Decided before: the policy is not even loaded again.
    (rows_dir / "first-tries" / "nonexistent_Policy.jsonl").write_text(
        "".join(json.dumps({"id": p.id, "action": "halve"}) + "\n" for p in problems)
    )
    again = load_task(task(rows_dir), split="test", policy="nonexistent:Policy")
    assert [p.first_answer for p in again] == ["halve"] * len(problems)


def test_an_episode_reflects_on_the_given_first_try_and_the_actor_retries_without_the_barred_action(
    rows_dir,
):
    from selfsteer.agents.llm.chat import LocalChatModel

    problems = load_task(task(rows_dir), split="test", n=8, seed=1, policy="keep")
    failed = [p for p in problems if not p.validate(p.first_answer).passed]
    assert failed and len(failed) < len(problems), "the fixture must hold keep decisions that fail and pass"
    results = run_episodes(LocalChatModel(max_new_tokens=16), problems, ReflectConfig(), concurrency=8)
    for result in results:
        assert result.attempts[0]["response"] == "keep"  # given, not the model's
        if result.passed_first:
            assert len(result.attempts) == 1 and not result.reflections
            continue
        retry = result.attempts[1]
        assert retry["response"] in ("double", "halve")  # the failed action is barred
        assert result.rewards == [float(retry["passed"])]
        # system, the decision point, the failed decision, the reflect instruction, the reflection, "again"
        assert retry["prompt"][2]["content"] == "keep"
        assert "That decision was wrong: after you chose keep" in retry["prompt"][3]["content"]
        assert retry["prompt"][4]["content"] == result.reflections[0]["text"]

    from selfsteer.evals.tasks.metrics import summarize

    summary = summarize(results)
    assert summary["n_failed_first"] == len(failed)
    # A retry can land worse than the first try (a halve that helped a little, then a double that diverged).
    by_id = {p.id: p for p in problems}
    finals = [by_id[r.problem_id].validate(r.attempts[-1]["response"]).cost for r in results]
    assert summary["regret_final_mean"] == pytest.approx(sum(finals) / len(finals))


def test_the_grpo_reward_asks_the_actor_not_the_policy(rows_dir):
    from selfsteer.graphs.reflect import mine_failures, retry_messages

    problems = load_task(task(rows_dir), split="test", n=6, seed=1, policy="keep")
    rows = mine_failures(None, problems)  # every first try is given: no model is asked
    assert rows and all(row["failed_attempt"] == "keep" for row in rows)
    assert all("after you chose keep" in row["prompt"][-1]["content"] for row in rows)

    def policy_generate(conversations):
        raise AssertionError("the retries of a task with an actor are the actor's")

    asked: dict[str, tuple[list, str]] = {}  # what each problem's (real) actor was shown and answered

    def recording(problem):
        def actor(messages):
            asked[problem.id] = (messages, problem.actor(messages))
            return asked[problem.id][1]

        return dataclasses.replace(problem, actor=actor)

    problems = [recording(problem) for problem in problems]
    columns = {key: [row[key] for row in rows] for key in ("problem_id", "failed_attempt", "reason")}
    reflections = ["The loss fell fast; the learning rate should double."] * len(rows)
    rewards = reflection_reward(problems)(reflections, columns, policy_generate)
    by_id = {p.id: p for p in problems}
    assert sorted(asked) == sorted(row["problem_id"] for row in rows)
    for reward, row, reflection in zip(rewards, rows, reflections, strict=True):
        problem = by_id[row["problem_id"]]
        shown, answer = asked[problem.id]
        assert shown == retry_messages(
            problem, "reflect_attempt", ["keep"], [reflection], version="decisions", reasons=[row["reason"]]
        )
        assert answer != "keep" and reward == float(problem.validate(answer).passed)


def test_reflect_eval_on_decisions_writes_regret_and_refuses_what_does_not_apply(rows_dir, tmp_path):
    out = tmp_path / "eval"
    code = main([
        "reflect", "eval", "--task", task(rows_dir), "--policy", "keep", "--reflector", "none", "--n", "6",
        "--max-tokens", "16", "--out", str(out), "--db", str(tmp_path / "s.sqlite"),
    ])  # the command as a user types it # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 6 and summary["task"] == task(rows_dir)
    for key in ("regret_first_mean", "regret_final_mean", "n_failed_first", "retry_acc", "retry_ci95"):
        assert key in summary
    db = str(tmp_path / "s.sqlite")
    assert main(["reflect", "eval", "--task", "countdown", "--reflector", "none", "--db", db]) == 2
    assert (
        main(["reflect", "eval", "--task", task(rows_dir), "--reflector", str(tmp_path / "nope"), "--db", db])
        == 2
    )
    # train trains a reflector from --model: --reflector is not one of its flags
    with pytest.raises(SystemExit) as exit_:
        main(["reflect", "train", "--task", task(rows_dir), "--reflector", "none"])
    assert exit_.value.code == 2


def test_the_task_and_a_live_run_show_the_reflector_the_same_conversation(rows_dir):
    from selfsteer.agents.reflector import conversation
    from selfsteer.graphs.reflect import reflect_messages, retry_messages

    problems = load_task(task(rows_dir), split="test", policy="keep")
    problem = next(p for p in problems if not p.validate("keep").passed)
    reason = problem.validate("keep").reason
    shown = reflect_messages(problem, ["keep"], version="decisions", reasons=[reason])
    assert shown == conversation(problem.prompt, "keep", reason)
    retry = retry_messages(
        problem, "reflect_attempt", ["keep"], ["Too slow."], version="decisions", reasons=[reason]
    )
    assert retry == conversation(problem.prompt, "keep", reason, "Too slow.")


def test_a_reflector_supervisor_reflects_on_the_loops_facts_and_retries_without_the_barred_actions(rows_dir):
    """Self-correction of a live run by the reflector: the base supervisor decides; the loop's facts
    about a failed decision become the reflector's conversation; the retry is the actor's, never an
    action rolled back from this state."""
    from selfsteer.agents.intervener_data import observation_of
    from selfsteer.agents.reflector import ReflectorSupervisor
    from selfsteer.agents.self_correct import Verdict as LoopVerdict
    from selfsteer.agents.self_correct import factual_reflection
    from selfsteer.agents.supervisors import Decision, Supervisor

    class AlwaysDouble(Supervisor):
        name = "always-double"

        def decide(self, observation):
            return Decision("double", "a plug-in's own rule")

    supervisor = ReflectorSupervisor(AlwaysDouble(), reflector="none")
    assert supervisor.name == "always-double+reflector"
    observation = observation_of(read_rows([rows_dir])[3])
    assert supervisor.decide(observation).action == "double"  # no failure yet: the base decides
    verdict = LoopVerdict(True, observation.step + 10, 3.2, 3.5, 3.2, 0.02)
    facts = factual_reflection("double", 0.01, 0.02, observation.step, verdict)
    reflection = supervisor.reflect(observation, "double", facts)
    assert reflection and reflection != facts
    shown = supervisor._failed[3]["content"]
    assert "after you chose double, the eval loss went from 3.200 to 3.500 (+9.4%) in 10 steps" in shown
    observation.avoid = ["double"]
    assert supervisor.decide(observation).action in ("halve", "keep")
    observation.avoid = ["double", "keep"]
    assert supervisor.decide(observation).action == "halve"


def test_lr_suite_names_self_correction_by_the_reflector():
    from selfsteer.evals.lr_suite import by_reflector, self_correcting

    assert self_correcting("intervener+rsc") == ("intervener", True) and by_reflector("intervener+rsc")
    assert self_correcting("intervener+sc") == ("intervener", True) and not by_reflector("intervener+sc")
    with pytest.raises(ValueError, match=r"\+rsc"):
        self_correcting("intervener+xyz")
    assert main(["eval", "lr-suite", "--supervisors", "static+rsc", "--out", "/nonexistent"]) == 2


def test_the_shipped_reflector_is_small_and_its_card_quotes_its_own_figures():
    """The card describes these very weights (the hash in metrics.json is the file's) and quotes the
    held-out figures metrics.json records, as the card spells them."""
    import hashlib

    from selfsteer.agents.reflector import REFLECTOR_DIR, is_shipped

    assert is_shipped()
    weights = REFLECTOR_DIR / "adapter_model.safetensors"
    assert weights.stat().st_size < 12 * 2**20
    metrics = json.loads((REFLECTOR_DIR / "metrics.json").read_text())
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == metrics["adapter_sha256"]
    assert json.loads((REFLECTOR_DIR / "adapter_config.json").read_text())["r"] == metrics["lora_r"] == 8
    card = (REFLECTOR_DIR / "README.md").read_text()
    assert "selfsteer reflect train --task decisions:runs/cf" in card and "seed 0" in card
    for row in metrics["evaluation"]:
        assert f"| {row['n_failed_first']} |" in card
        for condition in ("trained", "untrained", "plain"):
            low, high = row[condition]["retry_ci95"]
            assert f"{row[condition]['retry_acc']:.3f} [{low:.3f}, {high:.3f}]" in card, (
                row["rows"],
                condition,
            )
        for other in ("plain", "untrained"):
            low, high = row[f"trained_minus_{other}_ci95"]
            assert f"{row[f'trained_minus_{other}']:+.3f} [{low:.3f}, {high:.3f}]" in card
    assert f"{metrics['train_failures']} failed first tries" in card

"""`selfsteer train --supervisor ...` end to end, through the command line's entry point in the test
process: a real tiny run, the real embedded model, the plot."""

import json
from pathlib import Path

import pytest
from helpers.cli import selfsteer_here

from selfsteer.trainer_bridge.store import Store


def train(tmp_path: Path, *extra: str) -> tuple[str, dict]:
    """`selfsteer train` through its entry point in this process (helpers.cli.selfsteer_here); what it
    printed, and its summary.json."""
    out = tmp_path / "out"
    # Long enough (a few seconds) for the supervisor to start and catch the evaluations (every 10 steps).
    args = ["train", "--recipe", "tiny", "--set", "training.max_steps=200", "--port", "0"]
    said = selfsteer_here(*args, "--out", str(out), "--db", str(tmp_path / "s.sqlite"), *extra)
    return said, json.loads((out / "summary.json").read_text())


def test_the_embedded_llm_supervises_a_real_run(tmp_path):
    said, summary = train(
        tmp_path,
        "--supervisor",
        "llm",
        "--strategy",
        "compact_stats",
        "--pause-while-deciding",
        "--max-iterations",
        "2",
    )
    assert 1 <= len(summary["decisions"]) <= 2
    assert_decisions_were_applied(tmp_path, summary)
    with Store(tmp_path / "s.sqlite") as store:
        stored = store.list_decisions(summary["run_id"])
    assert all(d["model"] == "SmolLM2-135M-Instruct" and d["strategy"] == "compact_stats@v1" for d in stored)
    assert all(d["raw_output"].startswith('{"action":') and d["latency_s"] > 0 for d in stored)
    assert "decisions" in said and (tmp_path / "out" / "plot.png").stat().st_size > 10_000


def assert_decisions_were_applied(tmp_path: Path, summary: dict, give_backs: int = 0) -> None:
    """Each decision that changes the lr is in the run's command journal as a set_optimizer with that lr,
    succeeded at its `applied_step`, at or after the step it was decided at. The `learning_rate` metric
    (the lr each optimizer step used) follows the journal: decisions[0]'s lr_before until the first
    set_optimizer took effect, then each one's lr up to and including the step the next took effect at.
    `give_backs`: the set_optimizer commands self-correction sent to give a failed change back."""
    decisions = summary["decisions"]
    with Store(tmp_path / "s.sqlite") as store:
        commands = store.list_commands(summary["run_id"])
        used = {m["step"]: m["value"] for m in store.get_metrics(summary["run_id"], names=["learning_rate"])}
    assert summary["commands"] == len(commands)
    assert sorted(used) == list(range(1, summary["steps"] + 1))  # the lr of every step
    changes = [d for d in decisions if d["action"] != "keep"]
    assert changes, "no decision changed the lr: nothing here shows a decision acting on the run"
    journal = [c for c in commands if c["type"] == "set_optimizer"]
    assert len(journal) == len(changes) + give_backs, journal
    assert all(c["status"] == "success" and isinstance(c["step"], int) for c in journal), journal
    for decision in changes:
        sent = [c for c in journal if c["step"] == decision["applied_step"]]
        assert any(c["args"] == {"lr": decision["lr_after"]} for c in sent), (decision, journal)
        assert decision["step"] <= decision["applied_step"] < summary["steps"], decision
    expected, lr = [], decisions[0]["lr_before"]
    for step in range(1, summary["steps"] + 1):
        expected.append(lr)
        lr = next((c["args"]["lr"] for c in reversed(journal) if c["step"] == step), lr)
    assert [used[step] for step in sorted(used)] == pytest.approx(expected, rel=1e-9)
    for decision in changes:  # the lr it saw is the one in use from its step to the step it took effect at
        seen = expected[decision["step"] - 1 : decision["applied_step"]]
        assert seen == pytest.approx([decision["lr_before"]] * len(seen), rel=1e-9), decision


def test_a_custom_supervisor_by_module_and_class_and_the_self_correct_flags(tmp_path, monkeypatch):
    """A user's supervisor, named module:Class, drives a real run: its decisions are applied as it asked.
    --self-correct saves a rollback point before each lr change; with --self-correct-budget 0 no
    rollback may abandon a step, so a failed change can only be given back. With --reflector shipped the
    trained reflector writes the reflection on a failed change and its actor retries (agents/reflector.py)."""
    module = tmp_path / "my_supervisors.py"
    module.write_text(
        "from selfsteer.agents.supervisors import Decision, Supervisor\n"
        "class AlwaysDouble(Supervisor):\n"
        "    name = 'always-double'\n"
        "    def decide(self, observation):\n"
        "        return Decision('double', 'scripted')\n"
    )
    monkeypatch.syspath_prepend(tmp_path)  # where the user's module lives
    _, summary = train(
        tmp_path, "--set", "training.learning_rate=0.1", "--supervisor", "my_supervisors:AlwaysDouble",
        "--pause-while-deciding", "--max-iterations", "3", "--self-correct", "--self-correct-budget", "0",
        "--reflector", "shipped",
    )  # the train flags as a user types them # fmt: skip
    with Store(tmp_path / "s.sqlite") as store:
        journal = [c for c in store.list_commands(summary["run_id"]) if c["source"] == "always-double"]
    kinds = [c["type"] for c in journal if c["type"] not in ("pause", "resume")]
    assert kinds[:2] == ["save_checkpoint", "set_optimizer"] and "load_checkpoint" not in kinds
    save = next(c for c in journal if c["type"] == "save_checkpoint")
    assert save["args"]["name"].startswith("rollback-1-") and save["status"] == "success"
    assert summary["self_correction"]["rollbacks"] == 0 and summary["self_correction"]["extra_steps"] == 0
    # Doubling from 0.1 three times fails before lr 0.8 (the tiny model blows up at 1.0).
    with Store(tmp_path / "s.sqlite") as store:
        failed = store.list_reflections(summary["run_id"])
    assert failed and all(r["agent"] == "always-double+reflector" for r in failed)
    assert all(r["outcome"]["reflection_source"] == "model" and r["reflection"] for r in failed)
    retries = [d for d in summary["decisions"] if d["step"] > failed[-1]["step"]]
    assert retries and retries[0]["explanation"].startswith("retried after the reflection")
    assert retries[0]["action"] != "double"  # the failed action is barred
    first = summary["decisions"][0]
    assert (first["action"], first["explanation"], first["lr_before"]) == ("double", "scripted", 0.1)
    # Each failed change was given back (a set_optimizer to the lr before it), none rolled back.
    assert_decisions_were_applied(tmp_path, summary, give_backs=len(failed))

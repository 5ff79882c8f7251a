"""`selfsteer train --supervisor ...` end to end: a real tiny run, the real embedded model, the plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from selfsteer.trainer_bridge.store import Store

CLI = [sys.executable, "-m", "selfsteer.cli.main"]


def train(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    # Long enough (a few seconds) for the supervisor to start and catch the evaluations (every 10 steps).
    args = ["train", "--recipe", "tiny", "--set", "training.max_steps=200", "--port", "0"]
    done = subprocess.run(
        [*CLI, *args, "--out", str(out), "--db", str(tmp_path / "s.sqlite"), *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done, json.loads((out / "summary.json").read_text())


def test_the_embedded_llm_supervises_a_real_run(tmp_path):
    done, summary = train(
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
    assert "decisions" in done.stdout and (tmp_path / "out" / "plot.png").stat().st_size > 10_000


def test_a_custom_supervisor_by_module_and_class(tmp_path, monkeypatch):
    module = tmp_path / "my_supervisors.py"
    module.write_text(
        "from selfsteer.agents.supervisors import Decision, Supervisor\n"
        "class AlwaysHalve(Supervisor):\n"
        "    name = 'always-halve'\n"
        "    def decide(self, observation):\n"
        "        return Decision('halve', 'scripted')\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # where the user's module lives
    # Three decisions: halving at every evaluation of 200 steps would take the lr below what the server
    # accepts, which is not what this test is about.
    _, summary = train(
        tmp_path,
        "--supervisor",
        "my_supervisors:AlwaysHalve",
        "--pause-while-deciding",
        "--max-iterations",
        "3",
    )
    assert len(summary["decisions"]) == 3 and all(d["action"] == "halve" for d in summary["decisions"])
    assert_decisions_were_applied(tmp_path, summary)


def assert_decisions_were_applied(tmp_path: Path, summary: dict) -> None:
    """Each decision that changes the lr is in the run's command journal as a set_optimizer with that lr,
    succeeded at a step after the decision, and the steps that follow trained at that lr (the
    `learning_rate` metric is the lr each optimizer step used); until then the run used lr_before."""
    decisions = summary["decisions"]
    with Store(tmp_path / "s.sqlite") as store:
        commands = store.list_commands(summary["run_id"])
        used = {m["step"]: m["value"] for m in store.get_metrics(summary["run_id"], names=["learning_rate"])}
    assert summary["commands"] == len(commands)
    assert sorted(used) == list(range(1, summary["steps"] + 1))  # the lr of every step
    assert used[1] == decisions[0]["lr_before"]
    changes = [d for d in decisions if d["action"] != "keep"]
    assert changes, "no decision changed the lr: nothing here shows a decision acting on the run"
    journal = [c for c in commands if c["type"] == "set_optimizer"]
    assert [c["args"] for c in journal] == [{"lr": d["lr_after"]} for d in changes], journal
    for decision, command, following in zip(changes, journal, [*journal[1:], None], strict=True):
        assert command["status"] == "success", command
        step = command["step"]
        assert isinstance(step, int) and decision["step"] <= step < summary["steps"], (decision, command)
        # The old lr up to and including the step the command took effect at; the new one after it.
        assert used[decision["step"]] == used[step] == pytest.approx(decision["lr_before"], rel=1e-9)
        until = following["step"] if following else summary["steps"]
        after = [used[s] for s in range(step + 1, until + 1)]
        assert after == pytest.approx([decision["lr_after"]] * len(after), rel=1e-9), (step, until, after)


def test_self_correct_flags_reach_the_loop(tmp_path, monkeypatch):
    """--self-correct saves a rollback point before each lr change; with --self-correct-budget 0 no
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
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
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

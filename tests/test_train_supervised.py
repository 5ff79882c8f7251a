"""`selfsteer train --supervisor ...` end to end: a real tiny run, the real embedded model, the plot."""

import json
import subprocess
import sys
from pathlib import Path

from selfsteer.trainer_bridge.store import Store

CLI = [sys.executable, "-m", "selfsteer.cli.main"]


def train(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    # Long enough (a few seconds) for the supervisor to start and catch the evaluations (every 10 steps).
    args = ["train", "--recipe", "tiny", "--set", "training.max_steps=200", "--port", "0"]
    done = subprocess.run(
        [*CLI, *args, "--out", str(out), "--db", str(tmp_path / "s.sqlite"), *extra],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
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
    for decision in summary["decisions"]:
        factor = {"double": 2.0, "halve": 0.5, "keep": 1.0}[decision["action"]]
        assert abs(decision["lr_after"] - decision["lr_before"] * factor) < 1e-12
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
    _, summary = train(tmp_path, "--supervisor", "my_supervisors:AlwaysHalve", "--pause-while-deciding")
    assert summary["decisions"] and all(d["action"] == "halve" for d in summary["decisions"])
    assert summary["commands"] >= 1

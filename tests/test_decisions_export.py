"""Decision data out of the store: jsonl and a Hugging Face dataset that load back."""

import json
import math
import subprocess
import sys

from datasets import load_from_disk

from selfsteer.agents.observation import Observation
from selfsteer.graphs.supervise import _finite
from selfsteer.trainer_bridge.records import NewDecision
from selfsteer.trainer_bridge.store import Store


def fill(store):
    run = store.create_run("r")
    rows = [{"step": 10 * i, "name": "eval_loss", "value": v} for i, v in enumerate([3.0, 2.9, math.nan], 1)]
    observation = Observation.from_metrics(rows, step=30, lr=1e-3, max_steps=100)
    first = store.add_decision(run, NewDecision(
        step=30, agent="llm", action="halve", explanation="nan loss", strategy="json_history@v1",
        model="SmolLM2-135M-Instruct", observation=_finite(observation.to_dict()),
        raw_output='{"action": "halve", "explanation": "nan loss"}', lr_before=1e-3, lr_after=5e-4, latency_s=0.2,
    ))  # fmt: skip
    store.set_decision_outcome(first, {"loss_change": -0.5, "steps": 10})
    store.add_decision(
        run, NewDecision(step=40, agent="rule", action="keep", strategy="rules", observation={"step": 40})
    )
    return run


def test_export_jsonl_and_hf(tmp_path):
    db = tmp_path / "s.sqlite"
    with Store(db) as store:
        fill(store)
    out = tmp_path / "d.jsonl"
    cli = [sys.executable, "-m", "selfsteer.cli.main", "decisions", "export", "--db", str(db)]
    done = subprocess.run([*cli, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["action"] for r in rows] == ["halve", "keep"]
    llm = rows[0]
    assert llm["outcome"] == {"loss_change": -0.5, "steps": 10}
    assert [m["role"] for m in llm["messages"]] == ["system", "user", "assistant"]
    assert "WARNING" in llm["messages"][1]["content"] and llm["messages"][2]["content"] == llm["raw_output"]
    assert rows[1]["messages"] is None  # rules have no prompt

    done = subprocess.run(
        [*cli, "--format", "hf", "--out", str(tmp_path / "hf")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    dataset = load_from_disk(str(tmp_path / "hf"))
    assert len(dataset) == 2 and dataset[0]["action"] == "halve"
    assert json.loads(dataset[0]["outcome"])["loss_change"] == -0.5

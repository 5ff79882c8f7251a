"""Decision data out of the store: jsonl and a Hugging Face dataset that load back."""

import json
import math
import subprocess
import sys

from datasets import load_from_disk

from selfsteer.agents.observation import SERIES, Observation
from selfsteer.trainer_bridge.records import NewDecision, finite_or_null
from selfsteer.trainer_bridge.store import Store


def fill(store):
    run = store.create_run("r")
    rows = [{"step": 10 * i, "name": "eval_loss", "value": v} for i, v in enumerate([3.0, 2.9, math.nan], 1)]
    observation = Observation.from_metrics(rows, step=30, lr=1e-3, max_steps=100)
    first = store.add_decision(run, NewDecision(
        step=30, agent="llm", action="halve", explanation="nan loss", strategy="json_history@v1",
        model="SmolLM2-135M-Instruct", observation=finite_or_null(observation.to_dict()),
        raw_output='{"action": "halve", "explanation": "nan loss"}', lr_before=1e-3, lr_after=5e-4, latency_s=0.2,
    ))  # the exported decision, field by field # fmt: skip
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


def test_a_decision_stores_what_it_used_not_the_whole_history(tmp_path):
    """A decision late in a long run stores the views its prompt was rendered from and a recent window:
    its size does not grow with the run, and the exported chat is the one the agent was shown."""
    from selfsteer.agents.decision_data import decision_rows

    def observation_at(steps: int) -> Observation:
        rows = []
        for step in range(1, steps + 1):
            rows += [
                {"step": step, "name": "loss", "value": 4.0 - step / steps + 0.1 * math.sin(step)},
                {"step": step, "name": "grad_norm", "value": 1.0 + 0.01 * (step % 7)},
                {"step": step, "name": "learning_rate", "value": 1e-3 * (2 if step > steps // 2 else 1)},
            ]
            if step % 50 == 0:
                rows.append({"step": step, "name": "eval_loss", "value": 4.1 - step / steps})
        return Observation.from_metrics(rows, step=steps, lr=2e-3, max_steps=2 * steps)

    short, long = observation_at(1_000), observation_at(20_000)
    assert len(json.dumps(short.to_dict())) > 50_000  # what a decision stored before
    sizes = [len(json.dumps(finite_or_null(o.record()))) for o in (short, long)]
    assert sizes[1] < 1.2 * sizes[0] < 50_000  # bounded by the recent window: not 20x for 20x the history
    db = tmp_path / "s.sqlite"
    with Store(db) as store:
        run = store.create_run("r")
        store.add_decision(run, NewDecision(
            step=20_000, agent="llm", action="keep", strategy="intervener_signals@v1",
            observation=finite_or_null(long.record()), raw_output="{}",
        ))  # a decision with a long observation # fmt: skip
        (row,) = decision_rows(store, run)
    stored = Observation.from_record(row["observation"])
    assert stored.eval_loss == long.eval_loss[-8:]  # and the train loss from the first of them on:
    assert stored.train_loss == [(s, v) for s, v in long.train_loss if s >= long.eval_loss[-8][0]]
    shown = row["messages"][1]["content"]
    from selfsteer.prompts import load_strategy

    assert shown == load_strategy("intervener_signals").render_user(**long.prompt_values())


def test_a_stored_observation_reads_back_with_null_or_spelled_out_non_finite_losses(tmp_path):
    """One NaN rule: an observation persisted as JSON has null for a non-finite number
    (records.finite_or_null); older decisions spell it "nan" or "inf". Both read back as not finite (null as
    NaN, as the journal's metrics do), and the export is strict JSON."""
    from selfsteer.agents.decision_data import decision_rows, write_rows
    from selfsteer.trainer_bridge.records import finite_or_null

    rows = [
        {"step": 10 * i, "name": "eval_loss", "value": v} for i, v in enumerate([3.0, math.inf, math.nan], 1)
    ]
    rows += [{"step": s, "name": "loss", "value": math.nan if s == 30 else 3.1} for s in range(1, 31)]
    observation = Observation.from_metrics(rows, step=30, lr=1e-3, max_steps=100)
    as_null = finite_or_null(observation.record())
    # As decisions stored it before (graphs.supervise._finite): "nan", "inf".
    spelled = {
        k: [[step, v if math.isfinite(v) else str(v)] for step, v in getattr(observation, k)] for k in SERIES
    }
    as_text = {**observation.record(), **spelled}
    assert as_null["eval_loss"] == [[10, 3.0], [20, None], [30, None]]
    for stored in (as_null, as_text):
        back = Observation.from_record(json.loads(json.dumps(stored)))
        assert back.eval_loss[0] == (10, 3.0) and not any(math.isfinite(v) for _, v in back.eval_loss[1:])
        assert math.isnan(back.train_loss[-1][1]) and back.nonfinite
    with Store(tmp_path / "s.sqlite") as store:
        run = store.create_run("r")
        store.add_decision(
            run, NewDecision(step=30, agent="rule", action="halve", strategy="rules", observation=as_null)
        )
        exported = decision_rows(store, run)
    assert math.isnan(Observation.from_record(exported[0]["observation"]).eval_loss[-1][1])
    write_rows([{**exported[0], "lr": math.nan}], tmp_path / "d.jsonl", "jsonl", ("observation",))
    (line,) = (tmp_path / "d.jsonl").read_text().splitlines()

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    assert json.loads(line, parse_constant=refuse)["lr"] is None

"""Probe evidence in counterfactual rows (`decisions collect --probe`), the evidence prompt's explanations, and
supervisors scored on labelled rows (`intervener validate`)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from selfsteer.agents.intervener_data import EVIDENCE, explain, grounded, label, noise_margin, prompt_messages
from selfsteer.agents.probe_supervisor import ProbeSupervisor
from selfsteer.cli.main import main
from selfsteer.evals.counterfactual import RunSpec, collect_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def collected(one_torch_thread):
    """tiny from 100x too low, 30 steps, kept throughout: collected plain and probed."""
    spec = RunSpec(shape="tiny", lr=1e-4, policy="keep", max_steps=30)
    plain_rows, probed_rows = [], []
    plain = collect_run(spec, on_row=plain_rows.append)
    probed = collect_run(replace(spec, probe=True), on_row=probed_rows.append)
    return plain, plain_rows, probed, probed_rows


def test_a_probed_collection_is_the_same_run_and_its_rows_carry_the_probe(collected):
    plain, plain_rows, probed, probed_rows = collected
    # The probe trains its arms from an exact snapshot and puts it back: nothing downstream moves.
    assert probed["eval_loss"] == plain["eval_loss"]
    assert [(r.outcomes, r.probe) for r in probed_rows] == [(r.outcomes, r.probe) for r in plain_rows]
    assert probed["run"] != plain["run"]  # both can be collected into one folder
    for row in probed_rows:
        table = row.observation["probe"]
        assert table["step"] == row.step and table["lr"] == pytest.approx(row.lr)
        assert [arm["factor"] for arm in table["arms"]] == [0.5, 1.0, 2.0]
        assert table["cost_steps"] == 12  # 3 arms x 4 steps
        assert table["horizon"] == min(20, 30 - row.step)  # two evaluation intervals, at most the steps left
        assert all(len(arm["train_loss"]) == 4 for arm in table["arms"])
        # Logged as the core logs it, so the hypergradient rule and the directed probe can read the rows.
        assert row.observed.mean_alignment() is not None
    assert all(row.observation.get("probe") is None for row in plain_rows)


def test_the_evidence_prompts_explanation_cites_the_probe(collected):
    *_, probed_rows = collected
    observation = probed_rows[0].observed
    prompt = prompt_messages(observation, EVIDENCE)[-1]["content"]
    assert "x2:" in prompt and "x0.5:" in prompt and "extrapolated" in prompt
    for action, arm in (("double", "x2 "), ("halve", "x0.5 ")):
        said = explain(observation, action, EVIDENCE)
        assert said.startswith(f"In the probe {arm}") and said.endswith(f"so {action} the rate.")
        assert grounded(said, prompt) and len(said.split()) <= 30
    assert "x1" in explain(observation, "keep", EVIDENCE)


def test_validate_scores_each_policy_from_the_rows_own_evidence(collected, tmp_path, capsys):
    _, plain_rows, _, probed_rows = collected
    for name, rows in (("plain", plain_rows), ("probed", probed_rows)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "rows.jsonl").write_text("".join(row.to_json() + "\n" for row in rows))
    scores = {}
    for name in ("plain", "probed"):
        out = tmp_path / f"{name}.json"
        args = ["--data", str(tmp_path / name), "--adapter", "none", "--policies", "keep,probe:full"]
        assert main(["intervener", "validate", *args, "--out", str(out)]) == 0
        scores[name] = json.loads(out.read_text())
    assert "| probe:full |" in capsys.readouterr().out
    # Without a probe table the probe has no evidence and keeps; with one it decides as the probe decides.
    assert scores["plain"]["probe:full"]["actions"] == {"keep": len(plain_rows)}
    margin = noise_margin(probed_rows)
    chosen = [ProbeSupervisor(directed=False, budget=None).decide(r.observed).action for r in probed_rows]
    assert scores["probed"]["probe:full"]["actions"] == {a: chosen.count(a) for a in set(chosen)}
    assert "double" in chosen  # 100x too low: the probe measures the raise
    hits = sum(a == label(r, margin) for a, r in zip(chosen, probed_rows, strict=True))
    assert scores["probed"]["probe:full"]["accuracy"] == hits / len(probed_rows)
    assert scores["probed"]["keep"]["actions"] == {"keep": len(probed_rows)}
    assert scores["probed"]["rows"] == len(probed_rows) and scores["probed"]["margin"] == margin


def test_validate_refuses_what_it_cannot_score(tmp_path, capsys):
    assert main(["intervener", "validate", "--data", str(tmp_path / "nothing"), "--adapter", "none"]) == 2
    assert "no collected data" in capsys.readouterr().err
    assert main(["intervener", "validate", "--data", str(tmp_path), "--adapter", str(tmp_path)]) == 2
    assert "not an adapter folder" in capsys.readouterr().err


def test_an_evidence_adapter_asks_for_the_probe_its_rows_carried(collected, tmp_path):
    from selfsteer.agents.intervener import ADAPTER_DIR, IntervenerSupervisor

    *_, probed_rows = collected
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER_DIR, adapter)
    metrics = json.loads((adapter / "metrics.json").read_text())
    (adapter / "metrics.json").write_text(json.dumps({**metrics, "strategy": EVIDENCE}))
    table_reader, evidence_reader = IntervenerSupervisor(), IntervenerSupervisor(adapter)
    for row in probed_rows:
        observation = row.observed
        assert table_reader.evidence(observation) is None  # the shipped adapter reads the table: no probe
        wanted = evidence_reader.evidence(observation)
        table = observation.probe  # what collection ran at this decision point
        assert wanted == {"factors": [0.5, 1.0, 2.0], "steps": table["steps"], "horizon": table["horizon"]}
        prompt = evidence_reader.messages(observation)[-1][1]
        assert observation.probe_text() in prompt and "Learning rate:" in prompt
        decision = evidence_reader.decide(observation)
        assert decision.action in ("double", "halve", "keep") and not decision.fallback
        assert grounded(decision.explanation, prompt)

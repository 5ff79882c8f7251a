"""Counterfactual decision data: a branch is exactly what the run would have done, held-out workloads are
never collected, labels follow the measured noise margin, and the CLI collects, resumes and exports.
Real training runs of the tiny workload."""

import json
import math
import tarfile

import pytest
from datasets import load_from_disk
from helpers.cli import selfsteer_here

from selfsteer.agents.counterfactual_rows import Behaviour, CounterfactualRow, IntervenerExample
from selfsteer.agents.intervener_data import (
    STRATEGIES,
    examples,
    explain,
    grounded,
    label,
    noise_margin,
    numbers,
    observation_of,
    prompt_messages,
    read_rows,
    regret,
)
from selfsteer.agents.observation import Observation
from selfsteer.evals.check_calibration import SHIPPED
from selfsteer.evals.counterfactual import RunSpec, collect_run, default_specs
from selfsteer.evals.held_out import HELD_OUT, HELD_OUT_2, HELD_OUT_3, HELD_OUT_4, HELD_OUT_5
from selfsteer.evals.lr_suite import DEFAULT_LRS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    "spec",
    [
        RunSpec(shape="tiny", policy="keep", max_steps=30),
        RunSpec(shape="tiny", optimizer="sgd", schedule="warmup_decay", lr=0.1, policy="keep", max_steps=30),
    ],
    ids=["adamw-constant", "sgd-warmup-decay"],
)
def test_the_keep_branch_is_the_run_that_kept_to_the_last_digit(spec):
    rows = []
    forked = collect_run(spec, forks=True, on_row=rows.append)
    plain = collect_run(spec, forks=False)
    assert forked["eval_loss"] == plain["eval_loss"]  # every evaluation, bit for bit
    assert [r.step for r in rows] == [10, 20]
    for row in rows:
        # Each fork starts from the state the run was in: the keep branch lands where the run went next.
        after = dict(plain["eval_loss"])[row.step + row.horizon]
        assert row.outcomes["keep"] == after
        assert len(set(row.outcomes.values())) == 3  # the actions really differ
        assert row.probe != row.outcomes["keep"]  # another data order lands elsewhere
    assert forked["snapshot_s"] > 0 and forked["restore_s"] > 0


def test_a_branch_other_than_keep_is_the_live_run_under_that_policy():
    rows = []
    doubling = collect_run(RunSpec(shape="tiny", policy="random", max_steps=30, seed=1), on_row=rows.append)
    taken = doubling["actions"]
    for row, action in zip(rows, taken, strict=True):
        assert row.behaviour.action == action
        after = dict(doubling["eval_loss"])[row.step + row.horizon]
        assert row.outcomes[action] == after


def test_held_out_workloads_are_never_collected():
    # The start lr of every held-out cell of the lr-suite (too low, good, too high), on a collected
    # shape and optimizer: the lr alone makes a spec held out.
    held_lrs = sorted(DEFAULT_LRS["deep-rmsprop"].values())
    assert len(held_lrs) == 3
    for held in (
        {"shape": HELD_OUT["shape"]},
        {"optimizer": HELD_OUT["optimizer"]},
        {"shape": HELD_OUT_2["shape"]},  # the second held-out workload: shape, optimizer, schedule each
        {"optimizer": HELD_OUT_2["optimizer"]},
        {"schedule": HELD_OUT_2["schedule"]},
        {"shape": HELD_OUT_3["shape"]},  # the third: its shape and schedule (Adafactor is no grid optimizer)
        {"schedule": HELD_OUT_3["schedule"]},
        {"shape": HELD_OUT_4["shape"]},  # the fourth: its shape and schedule (plain SGD is no grid optimizer)
        {"schedule": HELD_OUT_4["schedule"]},
        {"shape": HELD_OUT_5["shape"]},  # the fifth: its shape and schedule
        {"schedule": HELD_OUT_5["schedule"]},
        *({"lr": lr} for lr in held_lrs),
        *({"lr": lr * 1.0005} for lr in held_lrs),  # the same cell, written with rounding
    ):
        with pytest.raises(ValueError, match="held out for evaluation"):
            RunSpec(**held)
    for lr in held_lrs:
        assert RunSpec(lr=lr * 1.01).lr == lr * 1.01  # a neighbour of a held-out lr is collected
    specs = default_specs(seeds=range(5), shapes=("tiny", "tiny-wide", "small-narrow", "small"))
    assert not any(s.shape == HELD_OUT["shape"] or s.optimizer == HELD_OUT["optimizer"] for s in specs)
    assert not any(
        HELD_OUT_2[k] in (s.shape, s.optimizer, s.schedule)
        for s in specs
        for k in ("shape", "optimizer", "schedule")
    )
    assert {s.optimizer for s in specs} == {"adamw", "sgd"}
    assert {s.schedule for s in specs} == {"constant", "warmup_decay"}


def row(keep, double, halve, probe, observation=None):
    """A row with these outcomes (None: the branch diverged), by hand."""
    return CounterfactualRow(
        spec=RunSpec().to_dict(),
        run=RunSpec().id,
        step=20,
        lr=1e-2,
        observation=observation or Observation(step=20, lr=1e-2, max_steps=60).to_dict(),
        behaviour=Behaviour(action="keep", explanation="keep behaviour policy"),
        horizon=10,
        outcomes={"keep": keep, "double": double, "halve": halve},
        probe=probe,
    )


def test_labels_need_a_gain_beyond_the_noise_margin():
    rows = [row(2.0, 2.1, 2.2, 2.0 * (1 + spread)) for spread in (0.01, 0.02, 0.03, 0.04, 0.05)]
    assert noise_margin(rows) == pytest.approx(0.03)  # the median spread
    assert label(row(2.0, 1.95, 2.1, None), 0.03) == "keep"  # 2.5% better: within the noise
    assert label(row(2.0, 1.90, 2.1, None), 0.03) == "double"  # 5% better
    assert label(row(2.0, 2.1, 1.90, None), 0.03) == "halve"
    assert label(row(None, None, 4.0, None), 0.03) == "halve"  # keep diverged (NaN stored as null)
    assert label(row(None, None, None, None), 0.03) == "keep"
    with pytest.raises(ValueError, match="no noise probes"):
        noise_margin([row(2.0, 2.0, 2.0, None)])


def refuse(token):
    raise ValueError(f"not JSON: {token}")


def test_a_diverged_branch_is_null_on_disk_and_diverged_when_read_back(tmp_path):
    """One NaN rule: a non-finite outcome, probe or observed loss is written as null (strict JSON), and
    reads back as a diverged branch (None, counted as an infinite loss) and a NaN loss."""
    metrics = [
        {"step": 10, "name": "eval_loss", "value": 3.0},
        {"step": 20, "name": "eval_loss", "value": math.nan},
    ]
    metrics += [{"step": s, "name": "loss", "value": math.inf if s == 20 else 3.1} for s in range(1, 21)]
    observation = Observation.from_metrics(metrics, step=20, lr=1e-2, max_steps=60)
    collected = row(math.nan, math.inf, 2.5, math.nan, observation=observation.to_dict())
    assert collected.outcomes == {"keep": None, "double": None, "halve": 2.5} and collected.probe is None
    path = tmp_path / "rows.jsonl"
    path.write_text(collected.to_json() + "\n")
    line = json.loads(path.read_text(), parse_constant=refuse)  # strict JSON: no NaN or Infinity tokens
    assert line["outcomes"] == {"keep": None, "double": None, "halve": 2.5} and line["probe"] is None
    assert line["observation"]["eval_loss"] == [[10, 3.0], [20, None]]
    (back,) = read_rows([tmp_path])
    assert back == collected and back.to_json() == collected.to_json()
    assert label(back, 0.01) == "halve" and regret(back, "keep") == math.inf and regret(back, "halve") == 0
    seen = observation_of(back)
    assert math.isnan(seen.eval_loss[-1][1]) and math.isnan(seen.train_loss[-1][1]) and seen.nonfinite
    (example,) = examples([back], 0.01)
    assert example.label == "halve" and example.regret["keep"] == math.inf
    assert json.loads(example.to_json(), parse_constant=refuse)["regret"]["keep"] is None
    # A row as older collections wrote it (json.dumps: NaN tokens in the observation) reads the same.
    old = {**line, "observation": {**observation.to_dict(), "eval_loss": [[10, 3.0], [20, math.nan]]}}
    (path := tmp_path / "old" / "rows.jsonl").parent.mkdir()
    path.write_text(json.dumps(old) + "\n")
    (legacy,) = read_rows([path])
    assert legacy.outcomes == back.outcomes and math.isnan(observation_of(legacy).eval_loss[-1][1])
    assert prompt_messages(observation_of(legacy)) == prompt_messages(seen)


def test_every_shipped_row_loads_as_a_row_and_is_written_back_byte_for_byte():
    """The rows collected before the type (the shipped archive, the adapter's examples) read through it
    unchanged: the same line comes back out."""
    with tarfile.open(SHIPPED) as archive:
        files = [
            archive.extractfile(m).read().decode()
            for m in archive.getmembers()
            if m.name.endswith("rows.jsonl")
        ]
    files.append((SHIPPED.parent / "examples.jsonl").read_text())
    lines = [line for text in files for line in text.splitlines() if line.strip()]
    assert len(lines) > 3000
    assert all(CounterfactualRow.from_json(line).to_json() == line for line in lines)


def test_collect_writes_strict_json_when_a_loss_is_not_finite(tmp_path, monkeypatch):
    """rows.jsonl and runs.jsonl are strict JSON whatever the losses: a run whose branches and final
    evaluation diverged is written with nulls, and a second call reads them to resume."""
    from selfsteer.evals import collect as collect_module

    spec = RunSpec(shape="tiny", policy="keep", max_steps=20)

    def diverged(spec, on_row):
        on_row(row(math.nan, math.inf, math.nan, math.nan))
        return {"run": spec.id, "spec": spec.to_dict(), "rows": 1, "final_eval_loss": math.nan}

    monkeypatch.setattr(collect_module, "collect_run", diverged)
    out = tmp_path / "cf"
    collect_module.collect(collect_module.CollectConfig(out=str(out), specs=[spec]), progress=False)
    for name in ("rows.jsonl", "runs.jsonl"):
        for text in (out / name).read_text().splitlines():
            json.loads(text, parse_constant=refuse)
    (summary,) = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert summary["final_eval_loss"] is None
    (collected,) = read_rows([out])
    assert collected.outcomes == {"keep": None, "double": None, "halve": None} and collected.probe is None
    assert (
        collect_module.collect(collect_module.CollectConfig(out=str(out), specs=[spec]), progress=False) == []
    )


def test_collect_resumes_and_export_labels_with_grounded_explanations(tmp_path):
    out = tmp_path / "cf"
    collect = ["decisions", "collect", "--out", str(out), "--shapes", "tiny", "--seeds", "0", "--limit", "2"]
    selfsteer_here(*collect)
    rows = read_rows([out])
    assert len(rows) == 2 * 5 and {r.run for r in rows} == {s.id for s in default_specs((0,), ("tiny",))[:2]}
    for r in rows:
        assert set(r.outcomes) == {"double", "halve", "keep"} and r.horizon == 10
    selfsteer_here(*collect)  # done already: nothing is collected twice
    assert len(read_rows([out])) == 10

    jsonl, hf = tmp_path / "cf.jsonl", tmp_path / "cf-hf"
    said = selfsteer_here("decisions", "export", "--counterfactual", str(out), "--out", str(jsonl))
    assert "10 labelled decision points" in said
    exported = [IntervenerExample.from_json(line) for line in jsonl.read_text().splitlines()]
    margin = noise_margin(rows)
    for original, example in zip(rows, exported, strict=True):
        assert example.label == label(original, margin)
        assert example.regret[example.label] == min(example.regret.values()) or example.label == "keep"
        prompt = example.prompt[-1]["content"]
        assert prompt == prompt_messages(observation_of(original))[-1]["content"]
        answer = json.loads(example.completion[0]["content"])
        assert answer["action"] == example.label and len(answer["explanation"].split()) <= 30
        assert grounded(answer["explanation"], prompt) and any(ch.isdigit() for ch in answer["explanation"])
    selfsteer_here("decisions", "export", "--counterfactual", str(out), "--out", str(hf), "--format", "hf")
    dataset = load_from_disk(str(hf))
    assert len(dataset) == 10 and "noise margin" in (hf / "README.md").read_text()


def test_grounding_catches_a_number_that_is_not_in_the_prompt():
    prompt = "step | lr | train loss | eval loss\n10 | 0.01 | 3.512 | 3.498"
    assert grounded("Eval loss fell from 3.512 to 3.498 at 0.01.", prompt)
    assert not grounded("Eval loss fell to 3.4 at 0.01.", prompt)
    assert grounded("No numbers at all.", prompt)
    # Numbers are compared as values, not as spellings: every cell of the table is read, once each.
    assert numbers(prompt) == {"10.0", "0.01", "3.512", "3.498"}
    assert grounded("Eval loss fell to 3.4980 at 1e-2 by step 10.", prompt)
    assert not grounded("Eval loss fell to 3.49 at 0.01.", prompt)  # a prefix of 3.498 is another number


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategys_template_explanation_is_grounded_in_its_prompt(strategy):
    rows = [{"step": s, "name": "loss", "value": 5.0 - 0.01 * s} for s in range(1, 31)]
    rows += [{"step": s, "name": "learning_rate", "value": 1e-3} for s in range(1, 31)]
    evals = {10: 4.9, 20: 4.8, 30: 4.85}
    for step in (1, 10, 20, 30):
        points = [r for r in rows if r["step"] <= step]
        points += [{"step": s, "name": "eval_loss", "value": v} for s, v in evals.items() if s <= step]
        observation = Observation.from_metrics(points, step=step, lr=1e-3, max_steps=60)
        prompt = prompt_messages(observation, strategy)[-1]["content"]
        for action in ("double", "halve", "keep"):
            said = explain(observation, action, strategy)
            assert grounded(said, prompt) and len(said.split()) <= 30, (said, prompt)
            if step >= 10:
                assert action in said and any(ch.isdigit() for ch in said)

"""Counterfactual collection on Ray Tune (the Ray files' one local Ray, one CPU: tests/conftest.py)
against the sequential collector, on tiny real runs: the same rows and runs in the same files, a failing
run retried then written to failed.jsonl while the others complete, an interrupted collection resumed.
One torch thread on both sides, so the runs match to the bit."""

import json

import pytest

from selfsteer.evals.collect import CollectConfig, collect
from selfsteer.evals.counterfactual import RunSpec

ray = pytest.importorskip("ray")

SPECS = [
    RunSpec(shape="tiny", policy="keep", max_steps=20),
    RunSpec(shape="tiny", policy="random", max_steps=20, seed=1),
    RunSpec(shape="tiny", policy="bogus", max_steps=20),  # no such behaviour policy: always fails
]


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def collections(tmp_path_factory, one_torch_thread, local_ray):
    sequential, on_ray = tmp_path_factory.mktemp("sequential"), tmp_path_factory.mktemp("ray")
    sequential_failures: list[dict] = []
    collect(CollectConfig(str(sequential), SPECS), progress=False, failures=sequential_failures)
    # Interrupted after its first run: runs.jsonl holds that one, rows.jsonl its rows and a cut-off run's.
    first = lines(sequential / "runs.jsonl")[0]
    kept = [r for r in lines(sequential / "rows.jsonl") if r["run"] == first["run"]]
    cut_off = {**lines(sequential / "rows.jsonl")[-1], "run": SPECS[1].id}
    (on_ray / "runs.jsonl").write_text(json.dumps(first) + "\n")
    (on_ray / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*kept, cut_off]))
    ray_failures: list[dict] = []
    summaries = collect(
        CollectConfig(str(on_ray), SPECS, ray=True, cpus_per_trial=1), progress=False, failures=ray_failures
    )
    return sequential, sequential_failures, on_ray, ray_failures, summaries


def by_run(runs: list[dict]) -> dict[str, dict]:
    return {
        r["run"]: {k: r[k] for k in ("spec", "rows", "actions", "eval_loss", "final_eval_loss")} for r in runs
    }


def by_point(rows: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["run"], r["step"]): r for r in rows}


def test_ray_gives_the_sequential_rows_and_runs(collections):
    sequential, _, on_ray, _, _ = collections
    runs = by_run(lines(sequential / "runs.jsonl"))
    assert runs.keys() == {SPECS[0].id, SPECS[1].id}
    assert by_run(lines(on_ray / "runs.jsonl")) == runs  # same runs, actions and losses, to the bit
    rows = by_point(lines(sequential / "rows.jsonl"))
    assert len(rows) == 2 * 1 and len(lines(on_ray / "rows.jsonl")) == len(rows)  # decision at step 10
    assert by_point(lines(on_ray / "rows.jsonl")) == rows  # decisions, outcomes (the labels), probes


def test_a_failing_run_is_retried_then_written_to_failed_jsonl(collections):
    sequential, sequential_failures, on_ray, ray_failures, _ = collections
    for out, failures in ((sequential, sequential_failures), (on_ray, ray_failures)):
        (failed,) = lines(out / "failed.jsonl")
        assert failures == [failed]
        assert failed["run"] == SPECS[2].id and failed["attempts"] == 2
        assert "bogus" in failed["error"], failed["error"]
    assert (on_ray / lines(on_ray / "failed.jsonl")[0]["trial_dir"]).exists()


def test_an_interrupted_collection_collects_only_the_rest(collections):
    sequential, _, on_ray, _, summaries = collections
    assert lines(on_ray / "runs.jsonl")[0] == lines(sequential / "runs.jsonl")[0]  # kept, not run again
    assert [s["run"] for s in summaries] == [SPECS[1].id]
    (experiment,) = (on_ray / "ray").iterdir()  # the Tune experiment: one trial per run left
    assert sorted(p.name for p in experiment.iterdir() if p.is_dir()) == sorted([SPECS[1].id, SPECS[2].id])

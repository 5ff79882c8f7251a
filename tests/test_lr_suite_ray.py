"""The lr-suite on Ray Tune (the Ray files' one local Ray, one CPU: tests/conftest.py) against the
sequential runner, on the same miniature suite of real tiny runs: the same rows, a failing run retried
then reported, an interrupted suite resumed. One torch thread on both sides, so the runs match to the
bit."""

import json
import shutil

import pytest

from selfsteer.evals.lr_suite import Cell, SuiteConfig, load_results
from selfsteer.evals.lr_suite_run import main

ray = pytest.importorskip("ray")


def config(**ray_options) -> SuiteConfig:
    return SuiteConfig(
        recipes=["tiny"],
        lrs={"tiny": {"too_high": 3.0}},
        grid_lrs={},
        seeds=[0],
        supervisors=["static", "rule", "bogus"],  # bogus: no such supervisor, so that run always fails
        max_steps={"tiny": 20},
        eval_steps={"tiny": 5},
        retries=1,
        **ray_options,
    )


@pytest.fixture(scope="module")
def suites(tmp_path_factory, one_torch_thread, local_ray):
    sequential, on_ray = tmp_path_factory.mktemp("sequential"), tmp_path_factory.mktemp("ray")
    sequential_report = main(config(), sequential)
    # Interrupted after its first run: results.jsonl holds that one row.
    first = (sequential / "results.jsonl").read_text().splitlines()[0]
    (on_ray / "results.jsonl").write_text(first + "\n")
    shutil.copy(sequential / "suite.sqlite", on_ray / "suite.sqlite")  # its curve, for the report
    ray_report = main(config(ray=True, cpus_per_trial=1), on_ray)
    return sequential, sequential_report, on_ray, ray_report


def without_wall_times(report: str) -> list[str]:
    return [line.rsplit("|", 2)[0] for line in report.splitlines()]


def test_ray_gives_the_sequential_rows_and_report(suites):
    sequential, sequential_report, on_ray, ray_report = suites
    rows, ray_rows = load_results(sequential / "results.jsonl"), load_results(on_ray / "results.jsonl")
    assert rows.keys() == ray_rows.keys() and len(rows) == 3
    for cell_id, row in rows.items():
        if "error" in row:
            continue
        for key in ("final_eval_loss", "best_eval_loss", "decisions", "actions", "max_steps"):
            assert ray_rows[cell_id][key] == row[key], (cell_id, key)
    assert rows["tiny-too_high-3-s0-rule"]["interventions"] >= 1
    assert without_wall_times(ray_report) == without_wall_times(sequential_report)
    assert "| too_high | rule |" in ray_report


def test_a_failing_run_is_retried_then_reported(suites):
    sequential, sequential_report, on_ray, ray_report = suites
    for out, report in ((sequential, sequential_report), (on_ray, ray_report)):
        failed = load_results(out / "results.jsonl")["tiny-too_high-3-s0-bogus"]
        assert failed["attempts"] == 2 and "unknown supervisor 'bogus'" in failed["error"]
        assert "**Failed runs: 1**" in report and "tiny-too_high-3-s0-bogus, 2 attempts" in report
    # The others completed.
    assert sum("error" not in r for r in load_results(on_ray / "results.jsonl").values()) == 2


def test_an_interrupted_suite_runs_only_the_rest(suites):
    sequential, _, on_ray, _ = suites
    lines = [json.loads(line) for line in (on_ray / "results.jsonl").read_text().splitlines()]
    first = json.loads((sequential / "results.jsonl").read_text().splitlines()[0])
    assert lines[0] == first  # kept, not run again
    ran = {Cell(r["recipe"], r["lr_name"], r["lr"], r["seed"], r["supervisor"]).id for r in lines[1:]}
    assert ran == {"tiny-too_high-3-s0-rule", "tiny-too_high-3-s0-bogus"}
    (experiment,) = (on_ray / "ray").iterdir()  # the Tune experiment: one trial per run left
    assert sorted(p.name for p in experiment.iterdir() if p.is_dir()) == sorted(ran)


def test_a_result_of_no_known_experiment_is_an_error_not_a_guess(monkeypatch, caplog):
    """The driver hands each trial's result to its experiment's sink. A Recorder whose experiment is not
    running says so; with one experiment running (its folder moved since the save) it goes there, with a
    warning; with none or several, guessing would write into another experiment's files: an error."""
    from selfsteer.evals import ray_trials

    sink = (lambda result, trial: None, lambda trial, error: None, None)
    recorder = ray_trials.Recorder("/moved/experiment")
    monkeypatch.setattr(ray_trials, "_SINKS", {})
    with pytest.raises(RuntimeError, match="no experiment at /moved/experiment"):
        recorder._sink()
    monkeypatch.setattr(ray_trials, "_SINKS", {"/here/experiment": sink})
    with caplog.at_level("WARNING", logger="selfsteer.evals.ray_trials"):
        assert recorder._sink() is sink
    assert "results go to the one at /here/experiment" in caplog.text
    monkeypatch.setattr(ray_trials, "_SINKS", {"/a": sink, "/b": sink})
    with pytest.raises(RuntimeError, match="2 running"):
        recorder._sink()

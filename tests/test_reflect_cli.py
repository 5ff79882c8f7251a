"""`selfsteer reflect`: the command line end to end on the embedded model (tiny n and token budgets),
and what it leaves in the store and in OUT/summary.json. No mocks."""

from __future__ import annotations

import json

import pytest

from selfsteer.cli.main import build_parser, main
from selfsteer.trainer_bridge.store import Store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_help_lists_the_actions(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reflect", "--help"])
    out = capsys.readouterr().out
    assert "run,train,eval" in out.replace(" ", "") or "{run,train,eval}" in out
    assert "--strategy" in out and "--checkpoint" in out


def test_eval_writes_summary_and_stores_episodes(tmp_path):
    out, db = tmp_path / "eval", tmp_path / "s.sqlite"
    code = main(["reflect", "eval", "--task", "countdown", "--n", "2", "--max-tokens", "8",
                 "--out", str(out), "--db", str(db), "--seed", "1"])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "n",
        "first_try_acc",
        "second_try_acc",
        "mean_reflection_tokens",
        "first_try_ci95",
        "gain_ci95",
    ):
        assert key in summary
    assert summary["n"] == 2 and 0 <= summary["first_try_acc"] <= summary["second_try_acc"] <= 1
    assert (out / "episodes-model.jsonl").read_text().count("\n") == 2

    with Store(db) as store:
        episodes = store.list_episodes(task="countdown")
        assert len(episodes) == 2 and all(e["status"] == "finished" for e in episodes)
        assert {e["run_id"] for e in episodes} == {summary["run_id"]}
        for row in episodes:
            episode = store.get_episode(row["id"])
            assert 1 <= len(episode["attempts"]) <= 2
            assert all(a["reason"] for a in episode["attempts"])
            if not episode["passed_first"]:  # a failure was reflected upon, and the reflection rewarded
                [reflection] = episode["reflections"]
                assert reflection["reward"] == float(episode["passed_final"]) and reflection["n_tokens"] <= 8
        assert store.get_run(summary["run_id"])["status"] == "finished"


def test_unknown_task_is_one_line_error(tmp_path, capsys):
    assert main(["reflect", "run", "--task", "nope", "--db", str(tmp_path / "s.sqlite")]) == 2
    assert "unknown task" in capsys.readouterr().out


def test_eval_compare_runs_every_strategy_on_the_same_problems(tmp_path):
    out = tmp_path / "cmp"
    code = main(["reflect", "eval", "--task", "countdown", "--n", "1", "--max-tokens", "4", "--compare",
                 "--out", str(out), "--db", str(tmp_path / "s.sqlite")])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["strategies"]) == {"retry", "reflect", "reflect_attempt", "memory"}
    assert all(s["n"] == 1 for s in summary["strategies"].values())
    assert summary["strategies"]["retry"]["n_reflections"] == 0

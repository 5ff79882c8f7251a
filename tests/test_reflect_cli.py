"""`selfsteer reflect`: the command line end to end on the embedded model (tiny n and token budgets),
and what it leaves in the store and in OUT/summary.json. No mocks; `--call-mode` runs the real
langchain-openai client over HTTP against a scripted OpenAI-compatible endpoint (tests/helpers), which
stands for a remote model that calls tools."""

from __future__ import annotations

import json
import re

import pytest
from helpers.openai_endpoint import scripted_endpoints

from selfsteer.cli.main import build_parser, main
from selfsteer.evals.tasks import bfcl
from selfsteer.trainer_bridge.store import Store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_help_lists_the_actions(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reflect", "--help"])
    out = capsys.readouterr().out
    assert "run,train,eval" in out.replace(" ", "") or "{run,train,eval}" in out
    assert "--strategy" in out and "--checkpoint" in out
    assert "--call-mode" in out and "{tools,text}" in out


def test_eval_writes_summary_and_stores_episodes(tmp_path):
    out, db = tmp_path / "eval", tmp_path / "s.sqlite"
    code = main(["reflect", "eval", "--task", "countdown", "--n", "2", "--max-tokens", "8",
                 "--out", str(out), "--db", str(db), "--seed", "1"])  # reflect eval as a user types it # fmt: skip
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
                 "--out", str(out), "--db", str(tmp_path / "s.sqlite")])  # reflect eval --compare as typed # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["strategies"]) == {"retry", "reflect", "reflect_attempt", "memory"}
    assert all(s["n"] == 1 for s in summary["strategies"].values())
    assert summary["strategies"]["retry"]["n_reflections"] == 0


# -----------------------------------------------------------------------------
# --call-mode: BFCL through the real langchain-openai client against a scripted endpoint


@pytest.fixture
def endpoint():
    with scripted_endpoints() as start:
        yield start


def _bfcl_solver(requests_seen: list):
    """The scripted remote model: with tools offered, a wrong call first and the gold call once a
    reflection is in the conversation; without tools (the reflection), text."""
    gold = {}
    for question, truth in bfcl._records("simple_python"):
        [(name, params)] = truth[0].items()
        arguments = {k: next(v for v in values if v != "") for k, values in params.items() if values != [""]}
        request = "\n".join(m["content"] for m in question["question"][0] if m["role"] == "user")
        gold[request] = (bfcl.tool_name(name), arguments)

    def script(body):
        requests_seen.append(body)
        if "tools" not in body:
            return LESSON
        name, arguments = gold[body["messages"][1]["content"]]
        if any(m.get("content") == LESSON for m in body["messages"]):
            return [(name, arguments)]
        return [(name, {k: "wrong" for k in arguments})]

    return script


LESSON = "I passed made-up values; I will use the values the request states."


def test_eval_in_tools_mode_offers_the_functions_as_tools_over_http(tmp_path, endpoint):
    requests = []
    server = endpoint(_bfcl_solver(requests))
    out, db = tmp_path / "tools", tmp_path / "s.sqlite"
    code = main(["reflect", "eval", "--task", "bfcl:simple_python", "--n", "3", "--seed", "2",
                 "--llm", "openai:scripted", "--base-url", server.url, "--out", str(out), "--db", str(db)])  # the BFCL eval as a user types it # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["call_mode"] == "tools" and summary["n"] == 3
    assert (summary["first_try_acc"], summary["second_try_acc"]) == (0.0, 1.0)
    with_tools = [r for r in requests if "tools" in r]
    assert len(with_tools) == 6 and len(requests) == 9  # attempt + retry with tools, reflection without
    for body in with_tools:
        assert body["tool_choice"] == "required"
        assert all(re.match(r"^[a-zA-Z0-9_-]{1,64}$", t["function"]["name"]) for t in body["tools"])
        assert body["tools"][0]["function"]["parameters"]["type"] == "object"
        assert "Functions:" not in body["messages"][1]["content"]
    with Store(db) as store:
        run = store.get_run(summary["run_id"])
        assert run["config"]["call_mode"] == "tools"
        [episode] = [
            e
            for e in store.list_episodes()
            if e["task_id"]
            == json.loads((out / "episodes-model.jsonl").read_text().splitlines()[0])["problem_id"]
        ]
        attempts = store.get_episode(episode["id"])["attempts"]
        assert json.loads(attempts[1]["response"])[0]["arguments"] != {}  # the rendered tool call


def test_eval_in_text_mode_lists_the_functions_and_binds_no_tools(tmp_path, endpoint):
    server = endpoint(lambda body: "no call")
    out = tmp_path / "text"
    code = main(["reflect", "eval", "--task", "bfcl:simple_python", "--n", "2", "--call-mode", "text",
                 "--llm", "openai:scripted", "--base-url", server.url, "--out", str(out),
                 "--db", str(tmp_path / "s.sqlite")])  # the text call mode as typed # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["call_mode"] == "text" and summary["second_try_acc"] == 0.0
    assert server.requests and all("tools" not in body for body in server.requests)
    assert server.requests[0]["messages"][1]["content"].startswith("Functions:")


def test_call_mode_is_ignored_for_countdown_and_refused_for_train(tmp_path, endpoint, capsys):
    server = endpoint(lambda body: "3 + 5")
    db = tmp_path / "s.sqlite"
    code = main(["reflect", "run", "--task", "countdown", "--n", "1", "--call-mode", "tools", "--max-retries", "0",
                 "--llm", "openai:scripted", "--base-url", server.url, "--db", str(db)])  # reflect run as a user types it # fmt: skip
    assert code == 0 and all("tools" not in body for body in server.requests)
    with Store(db) as store:
        [episode] = store.list_episodes()
        assert store.get_run(episode["run_id"])["config"]["call_mode"] is None
    code = main(["reflect", "train", "--task", "bfcl:simple_python", "--n", "2", "--db", str(db)])
    assert code == 2 and "--call-mode text" in capsys.readouterr().out


def test_curriculum_and_grpo_options_are_checked_before_anything_runs(tmp_path, capsys):
    db = str(tmp_path / "s.sqlite")
    assert main(["reflect", "eval", "--curriculum", "2,3", "--db", db]) == 2
    assert "--curriculum is for train" in capsys.readouterr().out
    assert main(["reflect", "train", "--curriculum", "2,x", "--db", db]) == 2
    assert "Countdown levels like 2,3,4" in capsys.readouterr().out
    grpo_config = tmp_path / "grpo.yaml"
    grpo_config.write_text("scale_rewards: none\nno_such_field: 1\n")
    argv = ["reflect", "train", "--task", "countdown:2", "--db", db, "--grpo-config"]
    assert main([*argv, str(grpo_config)]) == 2
    said = capsys.readouterr().out.replace("\n", " ")
    assert "no_such_field" in said and "not a ReflectionGRPOConfig field" in said, said
    grpo_config.write_text("num_iterations: two\n")
    assert main([*argv, str(grpo_config)]) == 2
    assert "num_iterations" in capsys.readouterr().out
    assert main([*argv, str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().out
    assert not (tmp_path / "s.sqlite").exists()


def test_a_curriculum_trains_level_by_level(tmp_path):
    import argparse

    from selfsteer.cli.commands.reflect import _curriculum_problems, _grpo_config, _in_curriculum_order

    args = argparse.Namespace(action="train", curriculum="3,2", split="train", n=6, seed=0, task="countdown")
    problems = _curriculum_problems(args)
    assert args.task == "countdown:2+3"
    assert [p.task for p in problems] == ["countdown:2"] * 6 + ["countdown:3"] * 6
    rows = [{"problem_id": p.id} for p in reversed(problems)]
    ordered = _in_curriculum_order(rows, problems, seed=0)
    levels = [len(r["problem_id"].split("->")[0].split(",")) for r in ordered]
    assert levels == [2] * 6 + [3] * 6
    assert _in_curriculum_order(rows, problems, seed=0) == ordered  # seeded
    grpo_config = tmp_path / "grpo.yaml"  # YAML reads 1e-6 as a string; the field's type makes it a float
    grpo_config.write_text("scale_rewards: none\nnum_iterations: 2\nlearning_rate: 1e-6\n")
    assert _grpo_config(str(grpo_config)) == {
        "scale_rewards": "none",
        "num_iterations": 2,
        "learning_rate": 1e-6,
    }
    assert _grpo_config(None) == {}


def test_the_grpo_config_wins_over_the_flags(tmp_path, capsys):
    # num_generations 1 from the file over --group-size 4: ReflectionGRPOConfig's own check refuses it,
    # before any model is loaded.
    grpo_config = tmp_path / "grpo.yaml"
    grpo_config.write_text("num_generations: 1\n")
    argv = ["reflect", "train", "--task", "countdown:2", "--n", "2", "--group-size", "4"]
    db, out = str(tmp_path / "s.sqlite"), str(tmp_path / "out")
    assert main([*argv, "--grpo-config", str(grpo_config), "--db", db, "--out", out]) == 2
    assert "num_generations >= 2" in capsys.readouterr().out

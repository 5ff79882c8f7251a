"""`selfsteer reflect`: the command line end to end on the embedded model (tiny n and token budgets),
and what it leaves in the store and in OUT/summary.json. No mocks; `--call-mode` runs the real
langchain-openai client over HTTP against a scripted OpenAI-compatible endpoint (tests/helpers), which
stands for a remote model that calls tools."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex

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
    for action in ("run", "eval"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["reflect", action, "--help"])
        out = capsys.readouterr().out
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


def test_call_mode_is_ignored_for_countdown_and_feedback_refused(tmp_path, endpoint, capsys, monkeypatch):
    server = endpoint(lambda body: "3 + 5")
    db = tmp_path / "s.sqlite"
    code = main(["reflect", "run", "--task", "countdown", "--n", "1", "--call-mode", "tools", "--max-retries", "0",
                 "--llm", "openai:scripted", "--base-url", server.url, "--db", str(db)])  # reflect run as a user types it # fmt: skip
    assert code == 0 and all("tools" not in body for body in server.requests)
    with Store(db) as store:
        [episode] = store.list_episodes()
        assert store.get_run(episode["run_id"])["config"]["call_mode"] is None
    monkeypatch.chdir(tmp_path)
    refusals = [
        ("--feedback is for tasks whose loader takes it", ["train", "--task", "countdown", "--feedback"]),
        ("--feedback is for tasks whose loader takes it", ["eval", "--task", "countdown", "--feedback"]),
        ("--reflector is for decisions:DIR tasks, and for bfcl", ["eval", "--task", "countdown", "--reflector", "none"]),
        ("for bfcl with the embedded model", ["eval", "--task", "bfcl:simple_python", "--reflector", "none", "--llm", "openai:x"]),
    ]  # one refusal per line # fmt: skip
    for message, argv in refusals:
        store = [] if argv[0] == "train" else ["--db", str(db)]  # train keeps no store
        assert main(["reflect", *argv, "--n", "2", *store]) == 2, argv
        assert message in " ".join(capsys.readouterr().out.split()), argv
    assert not (tmp_path / "runs").exists()


# `reflect train`'s arguments: TRL's TrlParser over ReflectionGRPOConfig and ReflectTrainArguments, a
# YAML --config under the command line. None of these tests loads a model.


def test_train_help_lists_the_configs_own_fields(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["reflect", "train", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: selfsteer reflect train ")
    # ReflectionGRPOConfig's own, GRPOConfig's and TrainingArguments', the task's, --config
    own = "--num_generations --max_retry_tokens --refill_attempts --skip_zero_advantage --lora_r"
    theirs = "--max_completion_length --learning_rate --output_dir --use_cpu --max_steps --save_steps"
    for flag in [
        *own.split(),
        *theirs.split(),
        "--task",
        "--curriculum",
        "--no_resume",
        "--config FILE.yaml",
    ]:
        assert f"  {flag}" in out, flag


def test_the_command_line_wins_over_the_yaml_and_the_rest_are_the_configs_defaults(tmp_path):
    from selfsteer.cli.commands.reflect import ReflectTrainArguments, parse_train_args
    from selfsteer.graphs.grpo_reflection import ReflectionGRPOConfig

    config_file = tmp_path / "grpo.yaml"  # YAML reads 3e-6 as a string; the field's type makes it a float
    config_file.write_text(
        "num_generations: 6\nlearning_rate: 3e-6\nmax_retry_tokens: 16\nscale_rewards: none\nn: 5\n"
    )
    argv = ["--config", str(config_file), "--num_generations", "8", "--n", "7", "--output_dir", "out"]
    config, arguments = parse_train_args(argv)
    assert config.num_generations == 8 and arguments.n == 7  # the command line over the file
    assert config.learning_rate == 3e-6 and config.max_retry_tokens == 16 and config.scale_rewards == "none"
    assert config.output_dir == "out" and config.per_device_train_batch_size == 8  # prompts_per_step * 8
    # Every other field is ReflectionGRPOConfig's default (GRPOConfig's own where this project sets none).
    given = dict(num_generations=8, learning_rate=3e-6, max_retry_tokens=16, scale_rewards="none")
    assert dataclasses.asdict(config) == dataclasses.asdict(ReflectionGRPOConfig(output_dir="out", **given))
    assert dataclasses.replace(arguments, n=32) == ReflectTrainArguments()
    assert (config.max_steps, config.model, arguments.resume) == (50, "", True)  # max_steps: old --steps 20


def test_the_reflector_cards_command_parses_to_its_figures():
    """The reproduce command of the shipped reflector's card, as the card spells it."""
    from selfsteer.agents.reflector import REFLECTOR_DIR
    from selfsteer.cli.commands.reflect import parse_train_args

    card = (REFLECTOR_DIR / "README.md").read_text()
    command = re.search(r"selfsteer reflect train (.*?)\n\s*#", card, re.S).group(1)
    config, arguments = parse_train_args(shlex.split(command.replace("\\\n", " ")))
    assert (arguments.task, arguments.n, arguments.threads) == ("decisions:runs/cf", 1000, 1)
    assert (config.lora_r, config.learning_rate, config.max_steps, config.num_generations) == (8, 2e-4, 80, 4)
    assert (config.max_completion_length, config.save_steps, config.seed) == (48, 10, 0)
    assert config.output_dir == "runs/reflector"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--group-size", "4"], "unrecognized arguments: --group-size 4"),
        (["--reflector", "none"], "unrecognized arguments: --reflector none"),
        (["--strategy", "retry"], "invalid choice: 'retry'"),
        (["--max_steps", "many"], "invalid int value: 'many'"),
        (["--config", "missing.yaml"], "cannot read missing.yaml"),
        (
            ["--config", "unknown.yaml"],
            "not fields of ReflectionGRPOConfig or ReflectTrainArguments: no_such_field",
        ),
        (["--config", "bad-type.yaml"], "--num_iterations/--num-iterations: invalid int value: 'two'"),
        (["--config", "not-yaml.yaml"], "not YAML"),
        (["--config", "list.yaml"], "must contain a YAML mapping"),
        (["--config", "one-generation.yaml"], "num_generations >= 2"),  # ReflectionGRPOConfig's own check
        (["--config", "bad-type.yaml", "--config", "list.yaml"], "--config given more than once"),
    ],
)
def test_what_is_not_a_field_exits_2_with_a_message(tmp_path, monkeypatch, capsys, argv, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unknown.yaml").write_text("scale_rewards: none\nno_such_field: 1\n")
    (tmp_path / "bad-type.yaml").write_text("num_iterations: two\n")
    (tmp_path / "not-yaml.yaml").write_text("a: [1\n")
    (tmp_path / "list.yaml").write_text("- max_steps\n")
    (tmp_path / "one-generation.yaml").write_text("num_generations: 1\n")
    with pytest.raises(SystemExit) as exit_:
        main(["reflect", "train", "--task", "countdown:2", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("selfsteer reflect train: error: ") and says in err, err
    assert not (tmp_path / "runs").exists()


def test_train_arguments_are_checked_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:  # a flag of train only
        main(["reflect", "eval", "--curriculum", "2,3"])
    assert exit_.value.code == 2
    assert main(["reflect", "train", "--curriculum", "2,x"]) == 2
    assert "Countdown levels like 2,3,4" in capsys.readouterr().out
    assert main(["reflect", "train", "--task", "countdown:2", "--policy", "keep"]) == 2
    assert "--policy is for decisions:DIR tasks" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_a_curriculum_trains_level_by_level(tmp_path):
    from selfsteer.cli.commands.reflect import (
        ReflectTrainArguments,
        _curriculum_problems,
        _in_curriculum_order,
        parse_train_args,
    )

    arguments = ReflectTrainArguments(curriculum="3,2", n=6)
    problems = _curriculum_problems(arguments, seed=0)
    assert arguments.task == "countdown:2+3"
    assert [p.task for p in problems] == ["countdown:2"] * 6 + ["countdown:3"] * 6
    rows = [{"problem_id": p.id} for p in reversed(problems)]
    ordered = _in_curriculum_order(rows, problems, seed=0)
    levels = [len(r["problem_id"].split("->")[0].split(",")) for r in ordered]
    assert levels == [2] * 6 + [3] * 6
    assert _in_curriculum_order(rows, problems, seed=0) == ordered  # seeded
    # The rows come level by level: unshuffled by default, unless the file or a flag says otherwise.
    assert parse_train_args([])[0].shuffle_dataset
    assert not parse_train_args(["--curriculum", "2,3"])[0].shuffle_dataset
    assert parse_train_args(["--curriculum", "2,3", "--shuffle_dataset", "true"])[0].shuffle_dataset
    (tmp_path / "shuffled.yaml").write_text("shuffle_dataset: true\n")
    assert parse_train_args(["--curriculum", "2,3", "--config", str(tmp_path / "shuffled.yaml")])[
        0
    ].shuffle_dataset

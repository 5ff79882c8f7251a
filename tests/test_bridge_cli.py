"""`selfsteer recipes`, `selfsteer train` and their errors, run in-process through the real entry point."""

from __future__ import annotations

import json

from selfsteer.cli.main import main
from selfsteer.trainer_bridge.recipe import estimated_cost, load_recipe
from selfsteer.trainer_bridge.store import Store


def test_recipes_smallest_first(capsys):
    assert main(["recipes"]) == 0
    names = capsys.readouterr().out.split()
    assert names[:2] == ["tiny", "small"] and len(names) >= 2
    costs = [estimated_cost(load_recipe(name)) for name in names]
    assert costs == sorted(costs)


def test_train_writes_the_summary_and_the_store(tmp_path, capsys):
    out, db = tmp_path / "out", tmp_path / "runs.sqlite"
    argv = ["train", "--recipe", "tiny", "--set", "training.max_steps=12", "--set", "training.eval_steps=5"]
    argv += ["--port", "0", "--out", str(out), "--db", str(db), "--seed", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "dashboard and API at http://127.0.0.1:" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["decisions"] == [] and summary["commands"] == 0
    assert summary["best_eval_loss"] <= summary["final_eval_loss"] and summary["wall_s"] > 0
    with Store(db) as store:
        run = store.get_run(summary["run_id"])
        assert run["status"] == "finished" and run["config"]["recipe"]["training"]["seed"] == 3
        assert run["summary"]["final_eval_loss"] == summary["final_eval_loss"]
        names = {m["name"] for m in store.get_metrics(summary["run_id"])}
    assert {"loss", "eval_loss", "learning_rate", "grad_norm", "samples_per_s"} <= names


def test_train_refuses_what_it_cannot_do(tmp_path, capsys):
    base = ["train", "--recipe", "tiny", "--out", str(tmp_path), "--db", str(tmp_path / "x.sqlite")]
    assert main([*base, "--supervisor", "no_such_module:Nope"]) == 2
    assert "cannot load supervisor" in capsys.readouterr().err
    assert main([*base, "--supervisor", "llm", "--llm", "bogus"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main([*base, "--set", "training.no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err
    assert main(["train", "--recipe", "nope", "--out", str(tmp_path)]) == 2
    assert "tiny" in capsys.readouterr().err  # the built-in names are suggested
    assert main([*base, "--host", "0.0.0.0", "--port", "0", "--token", ""]) == 2
    assert "bearer token" in capsys.readouterr().err


def test_dashboard_refuses_a_missing_store_and_an_open_host_without_token(tmp_path, capsys):
    assert main(["dashboard", "--db", str(tmp_path / "nope.sqlite")]) == 2
    assert "no store at" in capsys.readouterr().err
    Store(tmp_path / "s.sqlite").close()
    assert main(["dashboard", "--db", str(tmp_path / "s.sqlite"), "--host", "0.0.0.0"]) == 2
    assert "needs --token" in capsys.readouterr().err
    assert not (tmp_path / "nope.sqlite").exists()


def test_the_printed_address_carries_the_token_percent_encoded(tmp_path, capsys):
    from urllib.parse import parse_qs, urlparse

    token = "a/b+c=d&e f"  # each would change the query's meaning unencoded
    argv = ["train", "--recipe", "tiny", "--set", "training.max_steps=2", "--port", "0", "--token", token]
    assert main([*argv, "--out", str(tmp_path / "out"), "--db", str(tmp_path / "runs.sqlite")]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "dashboard and API at" in line]
    address = urlparse(line.split(" at ")[1])
    assert address.query == "token=a%2Fb%2Bc%3Dd%26e+f" and parse_qs(address.query) == {"token": [token]}

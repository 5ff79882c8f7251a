"""`selfsteer decisions collect --recipe`: any recipe's counterfactual rows, each row naming its workload;
held-out workloads refused whatever the recipe; the named grid unchanged. Real runs of the tiny recipe."""

import hashlib
import json

import pytest

from selfsteer.agents.intervener_data import read_rows
from selfsteer.cli.main import main
from selfsteer.evals.counterfactual import RunSpec, default_specs, evaluation_workload, workload_key
from selfsteer.evals.held_out import EVALUATION_WORKLOADS, HELD_OUT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHORT = ["--set", "training.max_steps=20", "--set", "training.eval_steps=10"]


def collect(*args: str) -> int:
    return main(["decisions", "collect", *args])


def test_a_recipe_collection_writes_rows_that_name_their_workload(tmp_path, capsys):
    out = tmp_path / "cf"
    flags = ["--recipe", "tiny", "--set", "model.n_embd=48", "--set", "model.n_head=3", *SHORT]
    assert collect(*flags, "--lrs", "1e-3,1e-2", "--seeds", "0,1", "--shard", "0/3", "--out", str(out)) == 0
    assert "2 runs, 2 decision points" in capsys.readouterr().out
    rows = read_rows([out])
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == len(runs) == 2  # lr-major: the shard's runs are (1e-3, seed 0) and (1e-2, seed 1)
    assert {(r.spec["lr"], r.spec["seed"]) for r in rows} == {(1e-3, 0), (1e-2, 1)}
    for row in rows:
        assert row.step == 10 and row.horizon == 10
        assert set(row.outcomes) == {"double", "halve", "keep"}
        assert all(isinstance(v, float) for v in row.outcomes.values()) and isinstance(row.probe, float)
        spec = row.spec
        assert (spec["max_steps"], spec["eval_steps"], spec["batch_size"]) == (20, 10, 8)
        assert (spec["shape"], spec["optimizer"], spec["schedule"]) == (
            "tiny[n_embd=48,n_head=3]",
            "adamw_torch",
            "constant",
        )
        assert spec["base_recipe"] == "tiny" and evaluation_workload(spec) is None
        again = RunSpec(**spec)  # a row's spec is the run's spec: it trains the same recipe
        assert again.to_dict() == spec and again.recipe()["training"]["learning_rate"] == spec["lr"]
    assert {workload_key(spec) for spec in [r.spec for r in rows] + [r["spec"] for r in runs]} == {
        "tiny[n_embd=48,n_head=3]-adamw_torch-constant"
    }
    assert workload_key(default_specs((0,), ("tiny",))[0].to_dict()) == "tiny-adamw-constant"


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--recipe", "tiny"], "--recipe needs --lrs"),
        (["--recipe", "tiny", "--lrs", "1e-2", "--shapes", "tiny"], "--shapes names the grid's shapes"),
        (["--lrs", "1e-2"], "--lrs and --set need --recipe"),
        (["--recipe", "tiny", "--lrs", "1e-2,fast"], "--lrs must be comma-separated numbers"),
        (["--recipe", "no-such-recipe", "--lrs", "1e-2"], "no recipe 'no-such-recipe'"),
        (
            ["--recipe", "tiny", "--set", "training.optim=rmsprop", "--lrs", "1e-2"],
            "rmsprop is a held-out family",
        ),
        (["--recipe", "tiny", "--lrs", "1e-2,3e-2"], "start lr: 1e-05, 0.0003, 0.03 are held out"),
    ],
    ids=[
        "no-lrs",
        "shapes",
        "lrs-without-recipe",
        "bad-lrs",
        "unknown-recipe",
        "held-out-optimizer",
        "held-out-lr",
    ],
)
def test_a_bad_or_held_out_recipe_collection_exits_2_and_writes_nothing(tmp_path, capsys, flags, said):
    out = tmp_path / "cf"
    assert collect(*flags, "--out", str(out)) == 2
    assert said in capsys.readouterr().err
    assert not out.exists()


DEEP = ["model.n_layer=3", "model.n_embd=96", "model.n_head=4"]  # on small: HELD_OUT's shape
DEEP_NARROW = ["model.n_layer=4", "model.n_embd=64", "model.n_head=4"]  # on small: HELD_OUT_2's
WIDE_SHALLOW = ["model.n_layer=1", "model.n_embd=192", "model.n_head=6"]  # on small: HELD_OUT_3's
DEEP_THIN = ["model.n_layer=6", "model.n_embd=48", "model.n_head=4"]  # on small: HELD_OUT_4's
MID = ["model.n_layer=2", "model.n_embd=80", "model.n_head=5"]  # on small: HELD_OUT_5's


@pytest.mark.parametrize(
    ("recipe", "overrides", "lr", "why"),
    [
        ("small", DEEP, 1e-2, "the held-out shape 'deep''s"),
        ("small", [*DEEP, "data.eval_blocks=64"], 1e-2, "the held-out shape 'deep''s"),  # the model decides
        ("small", DEEP_NARROW, 1e-2, "the held-out shape 'deep-narrow''s"),
        ("tiny", ["training.optim=rmsprop"], 1e-2, "rmsprop is a held-out family"),
        ("tiny", ["training.optim=adagrad"], 1e-2, "adagrad is a held-out family"),
        ("tiny", ["training.lr_scheduler_type=cosine", "training.warmup_steps=6"], 1e-2, "cosine with warm-up"),
        ("tiny", ["training.lr_scheduler_type=cosine", "training.warmup_steps=0.1"], 1e-2, "cosine with warm-up"),
        ("small", WIDE_SHALLOW, 1e-2, "the held-out shape 'wide-shallow''s"),
        ("tiny", ["training.lr_scheduler_type=inverse_sqrt", "training.warmup_steps=6"], 1e-2, "inverse_sqrt with warm-up"),
        ("small", DEEP_THIN, 1e-2, "the held-out shape 'deep-thin''s"),
        ("tiny", ["training.lr_scheduler_type=constant_with_warmup", "training.warmup_steps=10"], 1e-2, "constant_with_warmup with warm-up"),
        ("small", MID, 1e-2, "the held-out shape 'mid''s"),
        ("tiny", ["training.lr_scheduler_type=cosine_with_restarts"], 1e-2, "cosine_with_restarts is held out"),
        *(("tiny", [], lr * 1.0005, "start lr") for lr in HELD_OUT["start_lrs"]),
    ],
    ids=["deep", "deep-other-data", "deep-narrow", "rmsprop", "adagrad", "cosine-warmup", "cosine-warmup-ratio",
         "wide-shallow", "inverse-sqrt-warmup", "deep-thin", "constant-warmup", "mid", "cosine-restarts", "lr-1e-5", "lr-3e-4", "lr-3e-2"],
)  # one row per held-out workload # fmt: skip
def test_held_out_workloads_are_refused_whatever_the_recipe(recipe, overrides, lr, why):
    with pytest.raises(ValueError, match="held out for evaluation") as refused:
        RunSpec.from_recipe(recipe, overrides, lr=lr)
    assert why in str(refused.value)


def test_neighbours_of_held_out_workloads_and_the_evaluation_workload_are_collected():
    for recipe, overrides in (
        ("small", [*DEEP[:2], "model.n_head=2"]),  # deep's depth and width, other heads
        ("tiny", ["training.lr_scheduler_type=cosine"]),  # cosine without warm-up
        (
            "tiny",
            ["training.optim=adamw_torch", "training.lr_scheduler_type=linear", "training.warmup_steps=6"],
        ),
    ):
        assert RunSpec.from_recipe(recipe, overrides, lr=1e-2).base_recipe == recipe
    # reflector-heldout: rows to evaluate on, which may start where deep-rmsprop's cells start
    workload = EVALUATION_WORKLOADS["reflector-heldout"]
    specs = [RunSpec.from_recipe(workload["recipe"], workload["overrides"], lr=lr) for lr in workload["lrs"]]
    assert {evaluation_workload(s.to_dict()) for s in specs} == {"reflector-heldout"}
    assert {workload_key(s.to_dict()) for s in specs} == {
        "tiny[n_embd=48,n_head=3,n_layer=2]-adafactor-linear"
    }
    assert {(s.max_steps, s.eval_steps, s.batch_size) for s in specs} == {(60, 10, 8)}
    for name, other in EVALUATION_WORKLOADS.items():  # every one collectable, its rows named back (test only)
        runs = [RunSpec.from_recipe(other["recipe"], other["overrides"], lr=lr) for lr in other["lrs"]]
        assert {evaluation_workload(s.to_dict()) for s in runs} == {name}
    with pytest.raises(ValueError, match="start lr"):  # the same lr on another workload is refused
        RunSpec.from_recipe(workload["recipe"], workload["overrides"][:3], lr=3e-4)


def test_the_named_grid_is_unchanged():
    specs = default_specs()
    assert len(specs) == 240
    assert [s.id for s in specs[:3]] == [
        "tiny-adamw-constant-b8-lr0.000156-s0-random",
        "tiny-adamw-constant-b8-lr0.000156-s1-random",
        "tiny-adamw-constant-b8-lr0.00125-s0-random",
    ]
    assert specs[57].id == "tiny-sgd-constant-b16-lr0.8-s1-random"
    assert specs[-1].id == "small-narrow-sgd-warmup_decay-b16-lr1-s1-random"
    # every id and every stored spec, as before recipe runs existed (sha256 taken from the code then)
    ids = "\n".join(s.id for s in specs)
    assert hashlib.sha256(ids.encode()).hexdigest().startswith("beccf2ab1abe70fe")
    stored = "\n".join(json.dumps(s.to_dict()) for s in specs)
    assert hashlib.sha256(stored.encode()).hexdigest().startswith("981ddc82ccf98958")
    assert specs[57].to_dict() == {
        "shape": "tiny", "optimizer": "sgd", "schedule": "constant", "batch_size": 16, "lr": 0.8, "seed": 1,
        "max_steps": 60, "eval_steps": 10, "horizon": None, "policy": "random",
    }  # spec 57 as to_dict() gives it # fmt: skip

"""Population Based Training as an lr-suite row (evals/pbt.py), on local Ray with real tiny runs: a run
started from another run's Trainer checkpoint goes on exactly as that run did (what an exploit rests
on), and a population of three start lrs trains each member the same steps as a supervised run, every
lr move journaled through the bridge, the too-high start rescued."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest

from selfsteer.evals.lr_suite import SuiteConfig, load_results
from selfsteer.evals.lr_suite_run import main
from selfsteer.evals.pbt import within_lr_bounds
from selfsteer.trainer_bridge.commands import LR_BOUNDS
from selfsteer.trainer_bridge.recipe import load_recipe
from selfsteer.trainer_bridge.runner import RecipeRun
from selfsteer.trainer_bridge.store import Store

ray = pytest.importorskip("ray")


def tiny(folder, db, start_from=None, lr=None):
    overrides = [
        "training.max_steps=20",
        "training.eval_steps=10",
        "training.save_strategy=steps",
        "training.save_steps=10",
        "training.seed=3",
    ]
    run = RecipeRun(load_recipe("tiny", overrides), out_dir=folder, db=db, port=None, start_from=start_from)
    if lr is not None:
        run.bridge.submit("set_optimizer", {"lr": lr}, source="test")
    try:
        return run.train(), run.run_id
    finally:
        run.close()


def test_a_run_started_from_a_checkpoint_of_another_goes_on_as_that_run_did(tmp_path, one_torch_thread):
    db = tmp_path / "runs.sqlite"
    whole, _ = tiny(tmp_path / "whole", db)
    halfway = tmp_path / "whole" / "trainer" / "checkpoint-10"
    resumed, _ = tiny(tmp_path / "resumed", db, start_from=halfway)
    assert resumed["steps"] == whole["steps"] == 20
    assert resumed["final_eval_loss"] == whole["final_eval_loss"]  # to the last digit
    # The steps before the checkpoint were the other run's to pay for.
    assert (whole["compute_steps"], resumed["compute_steps"]) == (20, 10)
    moved, run_id = tiny(tmp_path / "moved", db, start_from=halfway, lr=0.05)
    with Store(db) as store:
        [command] = [c for c in store.list_commands(run_id) if c["source"] == "test"]
        lrs = [m["value"] for m in store.get_metrics(run_id, names=["learning_rate"])]
    assert (command["status"], command["step"]) == ("success", 10)  # before the first step it trains
    assert lrs and all(lr == pytest.approx(0.05) for lr in lrs)
    assert moved["final_eval_loss"] != whole["final_eval_loss"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory, one_torch_thread, local_ray):
    """A suite of static runs and a PBT population, interrupted (Ctrl+C) once the population has
    checkpoints, then run again: Tune restores the population where it stopped."""
    out = tmp_path_factory.mktemp("pbt")
    lrs = {"too_low": 1e-4, "good": 1e-2, "too_high": 3.0}
    command = [
        sys.executable, "-m", "selfsteer.cli.main", "eval", "lr-suite", "--recipes", "tiny", "--seeds", "0",
        "--supervisors", "static,pbt", "--lrs", ",".join(f"{k}={v}" for k, v in lrs.items()), "--grid", "",
        "--max-steps", "20", "--eval-steps", "5", "--ray-cpus", "1", "--out", str(out),
    ]  # the lr-suite command as a user types it # fmt: skip
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    experiment = out / "ray" / "pbt-tiny-s0"
    deadline = time.monotonic() + 240
    while not list(experiment.glob("*/checkpoint_000002")) and first.poll() is None:
        assert time.monotonic() < deadline, "the population made no checkpoint in 240 s"
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)
    said = first.communicate(timeout=240)[0]
    interrupted = {
        "returncode": first.returncode,
        "said": said,
        "rows": load_results(out / "results.jsonl") if (out / "results.jsonl").exists() else {},
    }
    config = SuiteConfig(
        recipes=["tiny"],
        lrs={"tiny": lrs},
        grid_lrs={"tiny": []},
        seeds=[0],
        supervisors=["static", "pbt"],
        max_steps={"tiny": 20},
        eval_steps={"tiny": 5},
    )
    report = main(config, out)
    return out, report, interrupted


def test_an_interrupted_population_is_restored_where_it_stopped(suite):
    out, _, interrupted = suite
    assert interrupted["returncode"] == 130, interrupted["said"][-3000:]
    assert "run again to go on" in interrupted["said"]
    assert not any(r["supervisor"] == "pbt" for r in interrupted["rows"].values())  # stopped mid-way
    # Restored, not started again: the experiment was not moved aside, and its members went on from the
    # checkpoints they had (a member's curve is one lineage, every evaluation once).
    assert [p.name for p in (out / "ray").iterdir() if p.name.startswith("pbt-")] == ["pbt-tiny-s0"]
    members = [r for r in load_results(out / "results.jsonl").values() if r["supervisor"] == "pbt"]
    assert len(members) == 3
    for member in members:
        assert [step for step, _ in member["curve"]] == [5, 10, 15, 20]


def test_each_member_trains_the_steps_of_a_supervised_run_and_the_too_high_start_is_rescued(suite):
    out, report, _ = suite
    rows = load_results(out / "results.jsonl")
    members = {r["lr_name"]: r for r in rows.values() if r["supervisor"] == "pbt"}
    static = {r["lr_name"]: r for r in rows.values() if r["supervisor"] == "static"}
    assert members.keys() == static.keys() == {"too_low", "good", "too_high"}
    for name, member in members.items():
        assert "error" not in member, member
        assert member["max_steps"] == static[name]["max_steps"] == 20  # equal steps, member for run
        assert member["final_eval_loss"] == member["curve"][-1][1]
    # lr 3.0 diverges on its own; the worst member copies the best one's weights at the first evaluation.
    assert members["too_high"]["final_eval_loss"] < 0.8 * static["too_high"]["final_eval_loss"]
    assert any(move["copied"] != "too_high" for move in members["too_high"]["moves"])
    assert "| too_high | pbt |" in report and "Equal compute" in report


def test_explore_keeps_tunes_lr_within_the_supervisors_bounds():
    assert within_lr_bounds({"lr": 2.0, "other": 1})["lr"] == LR_BOUNDS[1]
    assert within_lr_bounds({"lr": 0.0})["lr"] == LR_BOUNDS[0]
    assert within_lr_bounds({"lr": 0.02}) == {"lr": 0.02}


def test_the_population_log_is_strict_json_and_reads_a_diverged_member_back_as_nan(tmp_path):
    from selfsteer.evals.pbt import PopulationLog

    diverged = {
        "final_eval_loss": math.nan,
        "best_eval_loss": 2.5,
        "history": [[5, 2.5, 0.1], [10, math.inf, 0.2]],
    }
    PopulationLog(tmp_path).add("member-1", 10, done=diverged)
    text = (tmp_path / "population.json").read_text()
    json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} is not JSON"))  # null, not NaN
    member = PopulationLog(tmp_path).load()["done"]["member-1"]
    assert math.isnan(member["final_eval_loss"]) and member["best_eval_loss"] == 2.5
    assert member["history"][0] == [5, 2.5, 0.1] and math.isnan(member["history"][1][1])


def test_every_move_of_the_population_is_a_command_journaled_in_the_suite_store(suite):
    out, _, _ = suite
    rows = [r for r in load_results(out / "results.jsonl").values() if r["supervisor"] == "pbt"]
    with Store(out / "suite.sqlite") as store:
        sent = [c for c in store.list_commands(None) if c["source"] == "pbt"]
    assert sent and all(c["status"] == "success" for c in sent)
    applied = [(c["step"], c["args"]["lr"]) for c in sent]
    for row in rows:
        for move in row["moves"]:
            assert LR_BOUNDS[0] <= move["lr_after"] <= LR_BOUNDS[1], move  # Tune's explore, clamped
            assert any(
                step == move["step"] and lr == pytest.approx(move["lr_after"]) for step, lr in applied
            ), move


@pytest.fixture(scope="module")
def populations_around_the_start(tmp_path_factory, one_torch_thread, local_ray):
    """Populations built around a too-high start only (the tiny model blows up at lr 1.0): the start
    x0.25, x1 and x4 under PBT (pbt-start) and under PB2, in one suite (one static twin), four intervals
    (PB2's GP needs two results of a member at one lr before it has anything to fit), on the Ray files'
    one CPU (tests/conftest.py): Tune trains the members one after another in one worker process."""
    out = tmp_path_factory.mktemp("around-the-start")
    config = SuiteConfig(
        recipes=["tiny"],
        lrs={"tiny": {"too_high": 1.0}},
        grid_lrs={"tiny": []},
        seeds=[0],
        supervisors=["static", "pbt-start", "pb2"],
        max_steps={"tiny": 16},
        eval_steps={"tiny": 4},
    )
    report = main(config, out)
    return out, load_results(out / "results.jsonl"), report


@pytest.fixture(params=["pbt-start", "pb2"])
def around_the_start(request, populations_around_the_start):
    return request.param, *populations_around_the_start


def test_a_population_around_the_start_gets_no_good_start_and_pays_for_every_member(around_the_start):
    kind, out, rows, report = around_the_start
    row, static = rows[f"tiny-too_high-1-s0-{kind}"], rows["tiny-too_high-1-s0-static"]
    assert "error" not in row, row
    members = row["members"]
    assert [m["label"] for m in members] == ["x0.25", "x1", "x4"]
    assert [m["start_lr"] for m in members] == [0.25, 1.0, 4.0]  # no good start among them
    assert all(m["steps"] == 16 for m in members)  # each member the steps of a supervised run
    assert row["compute_steps"] == 3 * 16 == 3 * static["compute_steps"]
    best = min(members, key=lambda m: m["final_eval_loss"])
    assert row["chosen"] == best["label"] and row["final_eval_loss"] == best["final_eval_loss"]
    assert [step for step, _ in row["curve"]] == [4, 8, 12, 16]
    line = next(line for line in report.splitlines() if line.startswith(f"| too_high | {kind} | no |"))
    assert "| 3.00x |" in line and f"- {kind}: " in report
    # Every move of every member went through the bridge, within the bounds. The member that ends best
    # may be one that never moved (Tune's explore draws x2 or x0.5 unseeded, and either can win the
    # last interval). The worst member copies another at every perturbation: the journal holds the one
    # at the first (a later copy may overwrite that lineage), and the last copy's move stays in one.
    low, high = row.get("lr_bounds", LR_BOUNDS)
    with Store(out / "suite.sqlite") as store:
        sent = [c for c in store.list_commands(None) if c["source"] == "pbt"]
    moves = [move for member in members for move in member["moves"]]
    assert moves and all(move in moves for move in row["moves"])  # the chosen lineage is one of them
    assert sent and all(c["status"] == "success" for c in sent) and any(c["step"] == 4 for c in sent)
    applied = [(c["step"], c["args"]["lr"]) for c in sent]
    for move in moves:
        assert low * (1 - 1e-6) <= move["lr_after"] <= high * (1 + 1e-6), move
        assert any(step == move["step"] and lr == pytest.approx(move["lr_after"]) for step, lr in applied), (
            move
        )
    # Copying the best member's weights rescues the too-high start.
    assert row["final_eval_loss"] < 0.5 * static["final_eval_loss"]
    if kind == "pb2":  # log10 lr in start /64 .. x64, clamped to the supervisors' bounds
        assert row["lr_bounds"] == [pytest.approx(1 / 64), pytest.approx(1.0)]
        # Not PBT's x2 / x0.5: the GP's choice lands anywhere in the bounds.
        ratios = {round(m["lr_after"] / m["lr_before"], 6) for m in moves if m["lr_before"] != m["lr_after"]}
        assert ratios and ratios - {2.0, 0.5}, moves


class Controller:
    """The part of Tune's controller a PBT scheduler reads (the tests below drive a scheduler alone)."""

    search_alg = None

    def __init__(self, trials):
        self.trials = trials

    def get_trials(self):
        return self.trials

    def get_live_trials(self):
        from ray.tune.experiment import Trial

        return [t for t in self.trials if t.status != Trial.TERMINATED]


def test_a_restored_synchronous_population_never_leaves_its_members_paused_for_ever():
    """Tune's restore gives PBT a fresh scheduler while the members come back at the steps they had
    reached. At the first synchronised perturbation the one behind copies one ahead (and its time), and
    Ray puts the next perturbation at the furthest member's time, which no paused member is below: none
    could run again (evals/pbt.py ResumableSynch)."""
    from ray.tune.experiment import Trial

    from selfsteer.evals.pbt import SynchPB2, SynchPBT

    def exploit(self, trial, controller, upper, lower):
        """What Ray's exploit does to the scheduler's state (its save and copy need a live Tune)."""
        if trial in lower:
            self._trial_state[trial].last_train_time = self._trial_state[upper[0]].last_train_time

    for cls, space in (
        (SynchPBT, {"hyperparam_mutations": {"lr": [0.1, 0.2]}}),
        (SynchPB2, {"hyperparam_bounds": {"lr": [0.1, 0.2]}}),
    ):
        scheduler = cls(time_attr="training_iteration", metric="score", mode="min", perturbation_interval=1,
                        synch=True, **space)  # the same settings as the SynchPBT below # fmt: skip
        scheduler._checkpoint_or_exploit = exploit.__get__(scheduler)
        trials = [Trial("Member", config={"lr": 0.1}, stub=True) for _ in range(3)]
        controller = Controller(trials)
        for trial in trials:
            scheduler.on_trial_add(controller, trial)
            trial.status = Trial.RUNNING
        # Restored at iterations 4, 4 and 3: they report 5, 5 and (last, the worst) 4, each then paused.
        for trial, iteration, score in zip(trials, (5, 5, 4), (1.0, 1.5, 3.0), strict=True):
            scheduler.on_trial_result(controller, trial, {"training_iteration": iteration, "score": score})
            trial.status = Trial.PAUSED
        assert scheduler._next_perturbation_sync == 6  # Ray's own: 5, and all three stuck at 5
        assert scheduler.choose_trial_to_run(controller) is not None


def test_a_synchronous_population_with_every_member_paused_past_the_barrier_runs_the_one_behind():
    """A restored population where one member had finished before the interrupt: the other two came back
    PAUSED at or past the next synchronised perturbation, none ran, and Tune's loop spun for 18 minutes
    (a fresh clone's test run). Ray's own choice is None there; the one furthest behind runs instead, and
    nothing runs while a member is still on its way."""
    from ray.tune.experiment import Trial

    from selfsteer.evals.pbt import SynchPBT

    scheduler = SynchPBT(time_attr="training_iteration", metric="score", mode="min", perturbation_interval=1,
                         synch=True, hyperparam_mutations={"lr": [0.1, 0.2]})  # the same settings as the schedulers above # fmt: skip
    trials = [Trial("Member", config={"lr": 0.1}, stub=True) for _ in range(3)]
    controller = Controller(trials)
    for trial in trials:
        scheduler.on_trial_add(controller, trial)
    done, ahead, behind = trials
    done.status, ahead.status, behind.status = Trial.TERMINATED, Trial.PAUSED, Trial.PAUSED
    scheduler._trial_state[ahead].last_train_time, scheduler._trial_state[behind].last_train_time = 3, 2
    scheduler._next_perturbation_sync = 2  # both at or past it: Ray would wait for ever
    from ray.tune.schedulers.pbt import PopulationBasedTraining

    assert PopulationBasedTraining.choose_trial_to_run(scheduler, controller) is None
    assert scheduler.choose_trial_to_run(controller) is behind
    assert scheduler._next_perturbation_sync == 3
    ahead.status = Trial.RUNNING
    scheduler._next_perturbation_sync = 2
    assert scheduler.choose_trial_to_run(controller) is None


def test_the_search_stays_unfinished_until_every_trial_it_made_has_ended(tmp_path):
    """Tune keeps a paused trial's actor for the next trial only while its search is unfinished: the
    default search is finished once it has made its last trial, so every pause of a synchronous
    population ended the members' worker processes (evals/ray_trials.py KeepActorsWhileTrialsLive).
    Saved and restored with the experiment, it still knows which trials are live."""
    from ray import tune
    from ray.tune.experiment import Experiment
    from ray.tune.search import BasicVariantGenerator

    from selfsteer.evals.ray_trials import KeepActorsWhileTrialsLive

    def searches():
        for cls in (BasicVariantGenerator, KeepActorsWhileTrialsLive):
            search = cls()
            two_trials = {"x": tune.grid_search([1, 2])}
            search.add_configurations(
                [Experiment("e", lambda config: None, config=two_trials, storage_path=str(tmp_path))]
            )
            yield search

    default, keeping = searches()
    made = [keeping.next_trial(), keeping.next_trial()]
    for search in (default, keeping):
        while search.next_trial() is not None:
            pass
    assert all(made) and default.is_finished()  # Tune's: finished with both trials still to run
    assert not keeping.is_finished()
    keeping.on_trial_complete(made[0].trial_id)
    keeping.save_to_dir(str(tmp_path), session_str="s")  # as Tune saves it with the experiment
    restored = KeepActorsWhileTrialsLive()
    restored.restore_from_dir(str(tmp_path))
    for search in (keeping, restored):
        assert not search.is_finished()
        search.on_trial_complete(made[1].trial_id)
        assert search.is_finished()

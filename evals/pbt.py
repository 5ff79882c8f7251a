"""Population Based Training as rows of the lr-suite (`--supervisors ...,pbt,pbt-start,pb2`): Ray Tune's
`PopulationBasedTraining` (or `PB2`) steering the learning rate of a population of live runs.

The population of a workload and seed is its suite cells' start learning rates (too low, good, too
high): one member each, trained together. At every evaluation (PBT's perturbation interval) the
members are ranked by eval loss; the worst quarter (one of three) copies the best one's weights,
optimizer, scheduler, RNG and data position (exploit) and moves its learning rate by one of
`pbt_perturbation_factors` (explore: by default x2 or x0.5, the supervisors' double and halve), clamped
to the supervisors' lr bounds. PBT runs synchronously: every member is at the same step when they are
ranked, so a member that copies another goes on from that same step.

Equal compute: each member trains exactly `max_steps` optimizer steps, as the supervised run from the
same start does, so the population of N start learning rates costs N x max_steps steps: the steps the
supervisor row spends on the same N starts. A member's row is scored like a supervised run from its
start (its final eval loss against the grid's best static lr); what differs is that members share what
they learn, which a supervisor steering one run cannot.

Built around the user's start only (`pbt-start`), a population gets no good start for free: one per
suite cell, its members the cell's start lr x0.25, x1 and x4 (lr_suite.START_FACTORS), under the same PBT
and the same steps per member; the cell's row is the member with the lowest final eval loss. `pb2` is
that population under Ray Tune's PB2 (Parker-Holder et al. 2020: PBT whose explore picks the new lr with
a time-varying GP bandit, fitted with scikit-learn), over log10 of the lr (PB2 scales its bounds
linearly), bounded by the start lr /64..x64 (lr_suite.PB2_SPAN) clamped to the supervisors' lr bounds.

Compute: every row counts the steps of its whole population (`compute_steps`), as each member reports the
steps it trained in each interval (from a copied checkpoint, only those after it) and the driver adds
them up in the population's log (OUT/ray/NAME/population.json, kept when Tune restores the experiment). An
interval cut short by a failure is not reported, so not counted. A population's rows are written once
all its members are done (they need the total); a member's failure fails them all.

Each member is a `tune.Trainable` around a live `RecipeRun` (the same workload, Trainer and bridge as
every other row; its runs land in OUT/suite.sqlite). Training holds after each Trainer checkpoint (one
per evaluation) until Tune asks for the next interval; Tune's checkpoint is that Trainer checkpoint, and
a member restored from one (PBT's pause or exploit, or a retry after a failure) is a new run resumed
from it, its new learning rate sent through the bridge like a supervisor's `set_optimizer`.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import random
import shutil
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from ray import tune
from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.schedulers.pb2 import PB2
from transformers import TrainerCallback

from selfsteer.evals.lr_suite import (
    PB2_SPAN,
    RESULT_LOSSES,
    START_FACTORS,
    Cell,
    SuiteConfig,
    append_result,
    failed_row,
    workload,
)
from selfsteer.evals.ray_trials import fit, ray_options, set_trial_threads, start_ray
from selfsteer.trainer_bridge.commands import LR_BOUNDS
from selfsteer.trainer_bridge.records import strict_json

# Their INFO lines come at every interval of every member ("Checkpoint successfully created", "Restored on").
QUIET_LOGGERS = ("ray.train", "ray.tune")
DIVERGED_SCORE = 1e6  # PBT ranks no NaN: a member whose eval loss is NaN or inf ranks last, not nowhere


class HoldAfterSave(TrainerCallback):
    """Holds training after each Trainer checkpoint until the member lets it go on."""

    def __init__(self):
        self.saved: queue.Queue[int] = queue.Queue()
        self.go = threading.Event()
        self.stop = False

    def on_save(self, args, state, control, **kwargs):
        self.saved.put(state.global_step)
        self.go.wait()
        self.go.clear()
        if self.stop:
            control.should_training_stop = True


class Member(tune.Trainable):
    """One member of a population: a live run of its cell's workload, trained one evaluation interval
    per `step`."""

    def setup(self, config: dict, suite: SuiteConfig, out: str, members: dict[str, dict]):
        from transformers.utils import logging as hf_logging

        set_trial_threads(suite.cpus_per_trial)
        hf_logging.disable_progress_bar()  # a bar per checkpoint written, forwarded to the driver
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        self.suite, self.out, self.members = suite, Path(out), members
        self.run = self.thread = self.gate = self.error = self.summary = None
        self.holding = False
        self.at = 0  # the step the live run had reached when this member last reported
        self.history: list[list] = []  # [step, eval loss, lr] of the weights this member trains now
        self.moves: list[dict] = []  # the lr changes in that lineage, a donor's included

    @property
    def cell(self) -> Cell:
        """The run this member trains: its workload, start lr and seed."""
        return Cell(**self.members[self.trial_name]["cell"])

    @property
    def lr(self) -> float:
        return lr_of(self.config)

    def _start(self, checkpoint: Path | None, set_lr: bool = False) -> None:
        from selfsteer.trainer_bridge.control import LocalRunControl
        from selfsteer.trainer_bridge.recipe import load_recipe
        from selfsteer.trainer_bridge.runner import RecipeRun

        cell = self.cell
        recipe, overrides = workload(cell, self.suite)
        # A Trainer checkpoint at every evaluation: what Tune keeps, and what a copy starts from; only the
        # latest stays in the run's folder (Tune has its own copies).
        eval_steps = self.suite.eval_steps.get(cell.recipe, 25)
        overrides += [
            "training.save_strategy=steps",
            f"training.save_steps={eval_steps}",
            "training.save_total_limit=1",
        ]
        folder = self.out / "runs" / self.trial_name
        segment = folder / f"segment-{len(list(folder.glob('segment-*'))) + 1:02d}"
        start_from = None
        if checkpoint is not None:  # Tune may remove its copy once restored: the run reads its own
            start_from = segment / "start"
            shutil.copytree(checkpoint, start_from)
        self.gate = HoldAfterSave()
        self.run = RecipeRun(
            load_recipe(recipe, overrides),
            out_dir=segment,
            db=self.out / "suite.sqlite",
            port=None,  # steered from this process, through the bridge
            start_from=start_from,
            callbacks=[self.gate],
        )
        if set_lr:  # applied before the first step, after the checkpoint is loaded
            LocalRunControl(self.run.bridge, source="pbt").set_lr(self.lr)
        # A checkpoint's steps were paid for by whoever trained them (`history`: that member's lineage).
        self.at = self.history[-1][0] if checkpoint is not None and self.history else 0
        self.error = self.summary = None
        self.holding = False
        self.thread = threading.Thread(target=self._train, name="member", daemon=True)
        self.thread.start()

    def _train(self) -> None:
        try:
            self.summary = self.run.train()
        except BaseException as error:  # reported by `step`, in Tune's thread
            self.error = error
        finally:
            self.run.close()
            if self.run.start_from is not None:  # read when training began: the copy is not needed now
                shutil.rmtree(self.run.start_from, ignore_errors=True)
            self.gate.saved.put(-1)  # wakes `step`

    def _close(self) -> None:
        """Abandons the live run, if any (a member restored elsewhere, or its actor reused)."""
        if self.run is None:
            return
        if self.thread.is_alive():
            self.gate.stop = True
            self.gate.go.set()
            self.thread.join(timeout=120)
        self.run = self.thread = None

    def step(self) -> dict:
        if self.run is None:
            self._start(None)
        elif self.holding:
            self.gate.go.set()
        step = self.gate.saved.get()
        if step < 0:  # the run ended
            if self.error is not None:
                raise self.error
            return self._result(self.summary["steps"], self.summary["final_eval_loss"], done=True)
        self.holding = True
        evals = [row for row in self.run.trainer.state.log_history if "eval_loss" in row]
        loss = evals[-1]["eval_loss"] if evals and evals[-1]["step"] == step else math.nan
        self.history.append([step, loss, self.lr])
        if step >= self.run.trainer.state.max_steps:  # the last interval: let it finish and evaluate
            self.gate.go.set()
            self.thread.join()
            if self.error is not None:
                raise self.error
            return self._result(step, self.summary["final_eval_loss"], done=True)
        return self._result(step, loss, done=False)

    def _result(self, step: int, loss: float, done: bool) -> dict:
        trained, self.at = max(0, step - self.at), step
        result = {
            "score": loss if math.isfinite(loss) else DIVERGED_SCORE,
            "eval_loss": loss,
            "step": step,
            "lr": self.lr,
            "done": done,
            "trained_steps": trained,  # in this interval: the driver adds them up (PopulationLog)
        }
        if done:
            summary = self.summary
            result["member"] = {
                "final_eval_loss": summary["final_eval_loss"],
                "best_eval_loss": min([h[1] for h in self.history if math.isfinite(h[1])] + [loss]),
                "max_steps": summary["steps"],
                "history": self.history,
                "moves": self.moves,
            }
        return result

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        folder = Path(checkpoint_dir)
        step = self.history[-1][0] if self.history else 0
        trainer_checkpoint = Path(self.run.trainer.args.output_dir) / f"checkpoint-{step}"
        shutil.copytree(trainer_checkpoint, folder / "trainer")
        meta = {
            "owner": self.trial_name,
            "lr": self.lr,
            "history": self.history,
            "moves": self.moves,
        }
        (folder / "member.json").write_text(strict_json(meta))

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        folder = Path(checkpoint_dir)
        meta = json.loads((folder / "member.json").read_text())
        self._close()
        self.history, self.moves = _nan_for_null(meta["history"]), meta["moves"]
        # Its own checkpoint at its own lr (a pause, a retry) goes on as it was; anything else is a move,
        # its lr sent through the bridge.
        moved = meta["owner"] != self.trial_name or not math.isclose(meta["lr"], self.lr, rel_tol=1e-9)
        if moved:
            step = self.history[-1][0] if self.history else 0
            owner = self.members.get(meta["owner"])
            copied = owner["label"] if owner is not None else meta["owner"]
            self.moves.append({"step": step, "copied": copied, "lr_before": meta["lr"], "lr_after": self.lr})
        self._start(folder / "trainer", set_lr=moved)

    def reset_config(self, new_config: dict) -> bool:
        self._close()  # this actor's run belonged to another member: the new one is loaded next
        self.history, self.moves = [], []
        return True

    def cleanup(self) -> None:
        self._close()


def within_lr_bounds(config: dict) -> dict:
    """PBT's explore, then clamped as a supervisor's decision is (PBT's perturbation knows no bounds),
    so that Tune's config and the member's lr agree."""
    return {**config, "lr": min(max(config["lr"], LR_BOUNDS[0]), LR_BOUNDS[1])}


def within_log10_bounds(config: dict, low: float, high: float) -> dict:
    """PB2's explore (its GP's choice, cast to float32), kept within its bounds."""
    return {**config, "log10_lr": min(max(config["log10_lr"], low), high)}


def lr_of(config: dict) -> float:
    """A member's lr: Tune's `lr` (pbt, pbt-start), or 10^`log10_lr` (pb2). A start lr may lie outside
    the lr bounds (a run's first lr is its recipe's); an explored one lies within them (`within_*`),
    10^x snapped onto a bound it misses by float rounding."""
    if "lr" in config:
        return config["lr"]
    lr = 10 ** config["log10_lr"]
    return next((bound for bound in LR_BOUNDS if math.isclose(lr, bound, rel_tol=1e-9)), lr)


def member_row(cell: Cell, member: dict, label: str) -> dict:
    """A suite row for `cell` from a finished member (its label: the start it was, as moves name it)."""
    moves = member["moves"]
    return {
        **asdict(cell),
        "run_id": None,  # a member is several runs, one per interval it was resumed for (OUT/suite.sqlite)
        "final_eval_loss": member["final_eval_loss"],
        "best_eval_loss": member["best_eval_loss"],
        "decisions": len(member["history"]),
        "interventions": sum(m["lr_before"] != m["lr_after"] for m in moves),
        "exploits": sum(m["copied"] != label for m in moves),
        "moves": moves,
        "curve": [[h[0], h[1]] for h in member["history"]],
        "max_steps": member["max_steps"],
        "trial_dir": member["trial_dir"],
    }


@dataclass
class Population:
    """One Tune experiment (OUT/ray/NAME): its members (trial name -> {"cell": the member's run as a Cell's
    fields, "label": the start it is named by in moves}) and the suite cells it answers."""

    kind: str  # pbt | pbt-start | pb2
    name: str
    seed: int
    cells: list[Cell]
    members: dict[str, dict] = field(default_factory=dict)
    param: str = "lr"  # what Tune moves: lr, or log10_lr (pb2)
    bounds: tuple[float, float] | None = None  # pb2's, of log10_lr

    def start(self, trial: str) -> float:
        lr = self.members[trial]["cell"]["lr"]
        return math.log10(lr) if self.param == "log10_lr" else lr


def populations(cells: list[Cell]) -> list[Population]:
    """The population cells' populations: `pbt` one per workload and seed, a member per start lr;
    `pbt-start` and `pb2` one per cell, its members the cell's start lr x START_FACTORS."""
    out: list[Population] = []
    grouped: dict[tuple[str, int], list[Cell]] = defaultdict(list)
    for cell in cells:
        if cell.supervisor == "pbt":
            grouped[(cell.recipe, cell.seed)].append(cell)
            continue
        population = Population(cell.supervisor, cell.id, cell.seed, [cell])
        for factor in START_FACTORS:
            member = Cell(cell.recipe, cell.lr_name, cell.lr * factor, cell.seed, cell.supervisor)
            population.members[f"{cell.id}-x{factor:g}"] = {"cell": asdict(member), "label": f"x{factor:g}"}
        if cell.supervisor == "pb2":
            population.param = "log10_lr"
            low = max(cell.lr / PB2_SPAN, LR_BOUNDS[0])
            high = min(max(cell.lr * PB2_SPAN, low), LR_BOUNDS[1])
            population.bounds = (math.log10(low), math.log10(high))
        out.append(population)
    for (recipe, seed), members in grouped.items():
        if len({c.lr for c in members}) != len(members):
            raise ValueError(f"pbt: two start lrs of {recipe} are equal; a member is named by its start lr")
        population = Population("pbt", f"pbt-{recipe}-s{seed}", seed, members)
        population.members = {c.id: {"cell": asdict(c), "label": c.lr_name} for c in members}
        out.append(population)
    return out


class ResumableSynch:
    """Synchronous PBT (or PB2) that goes on after Tune's experiment restore. A restored scheduler starts
    afresh while its members come back at the steps they had reached, so at the first synchronised
    perturbation Ray sets the next one at the furthest member's time (`max(next + interval, furthest)`),
    which that member, paused there, never gets below again: once the others have finished, it stays
    paused and the experiment spins for ever (seen here: test_pbt's restored population, one member
    PAUSED at step 25 of 30 for 15 minutes; ray-project/ray PR 48616, closed unmerged). After a
    synchronised perturbation the next one is put one interval beyond the furthest member."""

    def on_trial_result(self, tune_controller, trial, result):
        before = self._next_perturbation_sync
        decision = super().on_trial_result(tune_controller, trial, result)
        if self._synch and self._next_perturbation_sync != before:  # a synchronised perturbation
            furthest = max(state.last_train_time for state in self._trial_state.values())
            if self._next_perturbation_sync <= furthest:
                self._next_perturbation_sync = furthest + self._perturbation_interval
        return decision

    def choose_trial_to_run(self, tune_controller):
        """Ray's choice; and when no member runs and none may (all paused at or past the next
        synchronised perturbation: seen after a restore where one member had finished before the
        interrupt, the other two PAUSED for 18 minutes while Tune's loop spun), the one furthest behind
        runs, and the next perturbation is put one interval beyond it."""
        from ray.tune.experiment import Trial

        chosen = super().choose_trial_to_run(tune_controller)
        if chosen is not None or not self._synch:
            return chosen
        trials = tune_controller.get_trials()
        waiting = [t for t in trials if t.status in (Trial.PENDING, Trial.PAUSED)]
        if not waiting or any(t.status == Trial.RUNNING for t in trials):
            return None  # nothing to run, or a member still on its way to the perturbation
        behind = min(waiting, key=lambda t: self._trial_state[t].last_train_time)
        self._next_perturbation_sync = self._trial_state[behind].last_train_time + self._perturbation_interval
        return behind


class SynchPBT(ResumableSynch, PopulationBasedTraining):
    pass


class SynchPB2(ResumableSynch, PB2):  # PB2 itself asks for scikit-learn when it is made
    pass


def scheduler(population: Population, config: SuiteConfig):
    """PBT (moves by the perturbation factors) or PB2 (a GP bandit within bounds), synchronous: every member
    at the same step when they are ranked, at every evaluation."""
    common = {
        "time_attr": "training_iteration",
        "perturbation_interval": 1,
        "synch": True,
        "quantile_fraction": config.pbt_quantile_fraction,
    }
    if population.kind == "pb2":
        low, high = population.bounds
        return SynchPB2(
            hyperparam_bounds={"log10_lr": [low, high]},
            custom_explore_fn=partial(within_log10_bounds, low=low, high=high),  # picklable: Tune saves it
            **common,
        )
    return SynchPBT(
        hyperparam_mutations={"lr": tune.loguniform(*LR_BOUNDS)},
        perturbation_factors=config.pbt_perturbation_factors,
        resample_probability=config.pbt_resample_probability,
        custom_explore_fn=within_lr_bounds,
        **common,
    )


class PopulationLog:
    """What the driver has learnt of a population: the steps each member trained, and each finished
    member's result. In the experiment's folder, so that a restored experiment goes on counting and one
    run whole again (its folder moved aside) starts from nothing."""

    def __init__(self, folder: Path):
        self.path = folder / "population.json"
        self.data: dict | None = None

    def load(self) -> dict:
        if self.data is None:
            self.data = json.loads(self.path.read_text()) if self.path.exists() else {"steps": {}, "done": {}}
            for member in self.data["done"].values():  # strict JSON: its non-finite losses are null
                for key in RESULT_LOSSES:
                    if key in member and member[key] is None:
                        member[key] = math.nan
                member["history"] = _nan_for_null(member["history"])
        return self.data

    def add(self, trial: str, steps: int, done: dict | None = None) -> None:
        data = self.load()
        data["steps"][trial] = data["steps"].get(trial, 0) + steps
        if done is not None:
            data["done"][trial] = done
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(strict_json(data))
        temporary.replace(self.path)


def _nan_for_null(history: list) -> list:
    """A member's history ([step, eval loss, lr] each) read back from strict JSON: a null loss was NaN."""
    return [[step, math.nan if loss is None else loss, lr] for step, loss, lr in history]


def population_rows(population: Population, log: dict) -> list[dict]:
    """The suite rows of a population whose members are all done: every row with the population's
    `compute_steps` (pbt: a row per member; pbt-start, pb2: the cell's row is its best member)."""
    compute = sum(log["steps"].values())
    done = log["done"]
    if population.kind == "pbt":
        rows = []
        for trial, member in population.members.items():
            row = member_row(Cell(**member["cell"]), done[trial], member["label"])
            # A member's own wall time is not apart from the others': its share of the population's.
            row["wall_s"] = round(done[trial]["elapsed_s"] / len(population.members), 3)
            rows.append({**row, "member_steps": log["steps"].get(trial, 0), "compute_steps": compute})
        return rows
    (cell,) = population.cells

    def final(trial: str) -> float:
        loss = done[trial]["final_eval_loss"]
        return loss if math.isfinite(loss) else math.inf

    best = min(population.members, key=final)
    row = member_row(cell, done[best], population.members[best]["label"])
    row["chosen"] = population.members[best]["label"]
    row["members"] = [
        {
            "label": member["label"],
            "start_lr": member["cell"]["lr"],
            "final_eval_loss": done[trial]["final_eval_loss"],
            "final_lr": done[trial]["history"][-1][2] if done[trial]["history"] else None,
            "steps": log["steps"].get(trial, 0),
            "moves": done[trial]["moves"],
        }
        for trial, member in population.members.items()
    ]
    if population.bounds is not None:
        row["lr_bounds"] = [10**b for b in population.bounds]
    row["wall_s"] = round(max(done[trial]["elapsed_s"] for trial in population.members), 3)
    return [{**row, "compute_steps": compute}]


def run_pbt(cells: list[Cell], todo: set[str], config: SuiteConfig, out: Path) -> None:
    """Train each population of `cells` that answers a cell in `todo` (cell ids) under PBT or PB2; its
    rows are appended to OUT/results.jsonl once all its members are done. A population interrupted goes
    on where it stopped (Tune's experiment restore, from its members' checkpoints) when its unfinished
    members are those its log has not seen finish; otherwise it is run whole again, since its members
    learn from each other."""
    import numpy as np
    import ray

    results = out / "results.jsonl"
    options = ray_options(config)
    started = start_ray(options.pop("address"), options.pop("num_cpus"))  # once for every population
    try:
        for population in populations(cells):
            if not any(c.id in todo for c in population.cells):
                continue
            folder = out / "ray" / population.name
            seen = PopulationLog(folder).load()
            unfinished = [name for name in population.members if name not in seen["done"]]
            if not unfinished:  # all done, its rows not written (interrupted in between)
                for row in population_rows(population, seen):
                    append_result(results, row)
                continue
            by_start = {population.start(name): name for name in population.members}
            if len(by_start) != len(population.members):
                raise ValueError(f"{population.name}: two members start at the same lr")
            random.seed(population.seed)  # PBT draws its choices from `random`, in this process
            np.random.seed(population.seed)  # PB2's acquisition from numpy's
            log = PopulationLog(folder)  # read at its first result: after `fit` moved an old one aside
            started_at = time.perf_counter()

            def record(result: dict, trial, population=population, log=log, started_at=started_at) -> None:
                name = str(trial)
                done = None
                if result.get("done") and "member" in result:
                    elapsed = time.perf_counter() - started_at
                    done = {**result["member"], "trial_dir": trial.path, "elapsed_s": elapsed}
                log.add(name, int(result.get("trained_steps", 0)), done)
                if done is not None and set(log.data["done"]) == set(population.members):
                    for row in population_rows(population, log.data):
                        append_result(results, row)

            def fail(trial, error: str, population=population) -> None:
                label = population.members[str(trial)]["label"]
                for cell in population.cells:  # a population stands or falls whole
                    row = failed_row(cell, f"{population.kind} member {label}: {error}", trial.num_failures)
                    append_result(results, {**row, "trial_dir": trial.path})

            fit(
                Member,
                {population.param: tune.grid_search([population.start(name) for name in population.members])},
                record,
                fail,
                trial_name=lambda params, by_start=by_start, param=population.param: by_start[params[param]],
                names=list(population.members),
                unfinished=unfinished,
                storage=out / "ray",
                name=population.name,
                progress_desc=f"{population.kind} {population.name}",
                scheduler=scheduler(population, config),
                keep_checkpoints=3,  # per member: PBT copies the latest
                metric="score",
                mode="min",
                **options,
                suite=config,
                out=str(out.resolve()),
                members=population.members,
            )
    finally:
        if started:
            ray.shutdown()

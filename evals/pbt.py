"""Population Based Training as a row of the lr-suite (`--supervisors ...,pbt`): Ray Tune's
`PopulationBasedTraining` steering the learning rate of a population of live runs.

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
from dataclasses import asdict
from pathlib import Path

from ray import tune
from ray.tune.schedulers import PopulationBasedTraining
from transformers import TrainerCallback

from selfsteer.evals.lr_suite import Cell, SuiteConfig, append_result, failed_row, workload
from selfsteer.evals.ray_trials import fit, ray_options, set_trial_threads, start_ray
from selfsteer.trainer_bridge.commands import LR_BOUNDS

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

    def setup(self, config: dict, suite: SuiteConfig, out: str, cells: dict[str, dict]):
        from transformers.utils import logging as hf_logging

        set_trial_threads(suite.cpus_per_trial)
        hf_logging.disable_progress_bar()  # a bar per checkpoint written, forwarded to the driver
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        self.suite, self.out, self.cells = suite, Path(out), cells
        self.run = self.thread = self.gate = self.error = self.summary = None
        self.holding = False
        self.history: list[list] = []  # [step, eval loss, lr] of the weights this member trains now
        self.moves: list[dict] = []  # the lr changes in that lineage, a donor's included

    @property
    def cell(self) -> Cell:
        return Cell(**self.cells[self.trial_name])

    def _start(self, checkpoint: Path | None) -> None:
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
        folder = self.out / "runs" / cell.id
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
        if checkpoint is not None:  # applied before the first step, after the checkpoint is loaded
            LocalRunControl(self.run.bridge, source="pbt").set_lr(self.config["lr"])
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
        self.history.append([step, loss, self.config["lr"]])
        if step >= self.run.trainer.state.max_steps:  # the last interval: let it finish and evaluate
            self.gate.go.set()
            self.thread.join()
            if self.error is not None:
                raise self.error
            return self._result(step, self.summary["final_eval_loss"], done=True)
        return self._result(step, loss, done=False)

    def _result(self, step: int, loss: float, done: bool) -> dict:
        result = {
            "score": loss if math.isfinite(loss) else DIVERGED_SCORE,
            "eval_loss": loss,
            "step": step,
            "lr": self.config["lr"],
            "done": done,
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
            "lr": self.config["lr"],
            "history": self.history,
            "moves": self.moves,
        }
        (folder / "member.json").write_text(json.dumps(meta))

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        folder = Path(checkpoint_dir)
        meta = json.loads((folder / "member.json").read_text())
        self._close()
        self.history, self.moves = meta["history"], meta["moves"]
        if meta["owner"] != self.trial_name or meta["lr"] != self.config["lr"]:
            step = self.history[-1][0] if self.history else 0
            copied = (
                Cell(**self.cells[meta["owner"]]).lr_name if meta["owner"] in self.cells else meta["owner"]
            )
            self.moves.append(
                {"step": step, "copied": copied, "lr_before": meta["lr"], "lr_after": self.config["lr"]}
            )
        self._start(folder / "trainer")

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


def member_row(cell: Cell, member: dict, trial_dir: str) -> dict:
    moves = member["moves"]
    return {
        **asdict(cell),
        "run_id": None,  # a member is several runs, one per interval it was resumed for (OUT/suite.sqlite)
        "final_eval_loss": member["final_eval_loss"],
        "best_eval_loss": member["best_eval_loss"],
        "decisions": len(member["history"]),
        "interventions": sum(m["lr_before"] != m["lr_after"] for m in moves),
        "exploits": sum(m["copied"] != cell.lr_name for m in moves),
        "moves": moves,
        "curve": [[h[0], h[1]] for h in member["history"]],
        "max_steps": member["max_steps"],
        "trial_dir": trial_dir,
    }


def populations(cells: list[Cell]) -> dict[tuple[str, int], list[Cell]]:
    """The pbt cells by workload and seed: one population each, a member per start lr."""
    grouped: dict[tuple[str, int], list[Cell]] = defaultdict(list)
    for cell in cells:
        grouped[(cell.recipe, cell.seed)].append(cell)
    return dict(grouped)


def run_pbt(cells: list[Cell], todo: set[str], config: SuiteConfig, out: Path) -> None:
    """Train each population of `cells` that has a member in `todo` (cell ids) under PBT; each member's
    row is appended to OUT/results.jsonl as it finishes. A population interrupted goes on where it
    stopped (Tune's experiment restore, from its members' checkpoints) when its unfinished members are
    those `todo` names; otherwise it is run whole again, since its members learn from each other."""
    import ray

    results = out / "results.jsonl"
    options = ray_options(config)
    started = start_ray(options.pop("address"), options.pop("num_cpus"))  # once for every population
    try:
        for (recipe, seed), members in populations(cells).items():
            if not any(c.id in todo for c in members):
                continue
            by_name = {c.id: c for c in members}
            by_lr = {c.lr: c for c in members}
            if len(by_lr) != len(members):
                raise ValueError(
                    f"pbt: two start lrs of {recipe} are equal; a member is named by its start lr"
                )
            random.seed(seed)  # PBT draws its choices from `random`, in this process
            scheduler = PopulationBasedTraining(
                time_attr="training_iteration",
                perturbation_interval=1,  # every evaluation
                hyperparam_mutations={"lr": tune.loguniform(*LR_BOUNDS)},
                perturbation_factors=config.pbt_perturbation_factors,
                resample_probability=config.pbt_resample_probability,
                quantile_fraction=config.pbt_quantile_fraction,
                custom_explore_fn=within_lr_bounds,
                synch=True,
            )

            started_at = time.perf_counter()

            def record(result: dict, trial, by_name=by_name, started_at=started_at) -> None:
                if result.get("done") and "member" in result:
                    row = member_row(by_name[str(trial)], result["member"], trial.path)
                    # A member's own wall time is not apart from the others': its share of the population's.
                    row["wall_s"] = round((time.perf_counter() - started_at) / len(by_name), 3)
                    append_result(results, row)

            def fail(trial, error: str, by_name=by_name) -> None:
                row = failed_row(by_name[str(trial)], error, trial.num_failures)
                append_result(results, {**row, "trial_dir": trial.path})

            fit(
                Member,
                {"lr": tune.grid_search([c.lr for c in members])},
                record,
                fail,
                trial_name=lambda params, by_lr=by_lr: by_lr[params["lr"]].id,
                names=list(by_name),
                unfinished=[name for name in by_name if name in todo],
                storage=out / "ray",
                name=f"pbt-{recipe}-s{seed}",
                progress_desc=f"pbt {recipe} seed {seed}",
                scheduler=scheduler,
                keep_checkpoints=3,  # per member: PBT copies the latest
                metric="score",
                mode="min",
                **options,
                suite=config,
                out=str(out.resolve()),
                cells={name: asdict(c) for name, c in by_name.items()},
            )
    finally:
        if started:
            ray.shutdown()

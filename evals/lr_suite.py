"""The learning-rate suite: how well does each supervisor steer runs started at a bad learning rate?

A grid of workloads (built-in recipes) x initial learning rates (too low, good, too high) x seeds,
each run under every supervisor:
- `static`: the initial learning rate, untouched (no supervisor);
- `cosine`: the scheduler baseline (cosine decay from the initial learning rate);
- `rule`: the rule baselines (divergence or plateau -> halve);
- `plateau`: PyTorch's `ReduceLROnPlateau` fed the eval loss (halve or keep);
- `llm:STRATEGY`: the language model with a prompt strategy (`llm:intervener`: the untrained embedded
  model with the intervener's prompt);
- `intervener`: the embedded model with the shipped adapter trained on counterfactual decisions;
- `pbt`: Ray Tune's Population Based Training over the workload's start lrs, a population per workload
  and seed, each member as many steps as a supervised run (evals/pbt.py). Its population holds the good
  start, so it gets the answer for free;
- `pbt-start`: PBT built around the user's start only: a population per cell of its start lr x0.25, x1
  and x4 (START_FACTORS), each member as many steps as a supervised run, the row its best member at the
  end (evals/pbt.py);
- `pb2`: the same population under Ray Tune's PB2 (`ray.tune.schedulers.pb2.PB2`: PBT whose explore is a
  GP bandit, fitted with scikit-learn), over log10 of the lr (PB2's GP scales its bounds linearly), bounds
  the start lr /64..x64 (PB2_SPAN) clamped to the supervisors' lr bounds (evals/pbt.py);
- `schedulefree`: what a user would pick instead of a supervisor: schedule-free AdamW (Defazio et al.
  2024; the `schedulefree` package through the Trainer's `optim=schedule_free_adamw`) at the cell's
  start lr, a constant schedule and a warmup inside the optimizer of SCHEDULE_FREE_WARMUP of the steps.
  Its weights are evaluated as the optimizer's eval mode has them (the Trainer's evaluation loop calls
  `optimizer.eval()`, its training step `optimizer.train()`; tests/test_lr_suite_baselines.py);
- `prodigy`: the same for Prodigy (Mishchenko & Defazio 2023; the `prodigyopt` package), which
  estimates its step size itself: run at lr=1.0 (PRODIGY_LR, Prodigy's convention: the lr multiplies
  the step size it estimates), not at the cell's start lr, with the recipe's weight decay and a constant
  schedule. Its runs do not depend on the start, so the cells of one workload and seed share one run
  (its row repeated with `same_run_as`). On the held-out workload these two replace its RMSprop.
Workloads are built-in recipes, or the held-out workload `deep-rmsprop` (a model shape, an optimizer and
start learning rates that counterfactual collection never runs: evals/held_out.py HELD_OUT).
Extra static runs at other learning rates complete a grid, so that each run's *regret* can be taken
against the best static learning rate of that grid (same workload and seed).

Every row carries `compute_steps`: the optimizer steps it paid for. A run's are those it trained (under
the Trainer a self-correcting run's abandoned branches are among them: its step counter keeps counting)
plus the arms of every probe it ran (trainer_bridge/runner.py `extra_compute_steps`); a population's
row, every member's steps. The report gives each row's as a ratio to the static run of the same
workload, seed and start.

At every evaluation training waits until the supervisor has decided on it, so that a slow model is
judged on its decisions, not its speed, and a fast run cannot finish before its supervisor has looked. Writes `results.jsonl` (one line per run), `report.md` (a table), and PNG plots.

    selfsteer eval lr-suite --recipes tiny,small --seeds 0,1,2 --out runs/lr-suite
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from selfsteer.evals.counterfactual import OPTIMIZERS, SCHEDULES, SHAPES
from selfsteer.evals.held_out import HELD_OUT, HELD_OUT_2, HELD_OUT_3, HELD_OUT_4, HELD_OUT_5
from selfsteer.evals.lr_suite_names import BASELINES, DEFAULT_SUPERVISORS, ROWS
from selfsteer.trainer_bridge.records import strict_json

# Measured here with static runs (selfsteer eval lr-suite --supervisors static ...): the tiny model
# learns best near 1e-2..5e-2 and blows up at 1.0; the small one near 1e-3, stuck at 1e-1.
DEFAULT_LRS = {
    "tiny": {"too_low": 1e-4, "good": 1e-2, "too_high": 1.0},
    "small": {"too_low": 1e-5, "good": 1e-3, "too_high": 1e-1},
    "deep-rmsprop": dict(zip(("too_low", "good", "too_high"), HELD_OUT["start_lrs"], strict=True)),
    "deep-narrow-adagrad": dict(zip(("too_low", "good", "too_high"), HELD_OUT_2["start_lrs"], strict=True)),
    "wide-shallow-adafactor": dict(
        zip(("too_low", "good", "too_high"), HELD_OUT_3["start_lrs"], strict=True)
    ),
    "deep-thin-sgd": dict(zip(("too_low", "good", "too_high"), HELD_OUT_4["start_lrs"], strict=True)),
    "mid-nesterov-restarts": dict(zip(("too_low", "good", "too_high"), HELD_OUT_5["start_lrs"], strict=True)),
}
DEFAULT_GRID = {
    "tiny": [1e-3, 5e-2, 0.2],
    "small": [1e-4, 3e-3, 1e-2],
    "deep-rmsprop": [1e-4, 1e-3, 3e-3, 1e-2],
    "deep-narrow-adagrad": [3e-3, 3e-2, 1e-1],
    "wide-shallow-adafactor": [1e-4, 3e-4, 3e-3, 1e-2, 1e-1],
    "deep-thin-sgd": [3e-2, 0.1, 1.0, 3.0],
    "mid-nesterov-restarts": [1e-2, 3e-2, 0.3, 1.0],
}
# Workloads that are not plain recipes: (recipe, overrides).
WORKLOADS = {
    "deep-rmsprop": (
        SHAPES[HELD_OUT["shape"]][0],
        [
            *SHAPES[HELD_OUT["shape"]][1],
            *OPTIMIZERS[HELD_OUT["optimizer"]],
            "training.per_device_train_batch_size=16",
        ],
    ),
    "deep-narrow-adagrad": (  # held out too, since issue 25 (docs/held-out-workloads.md)
        SHAPES[HELD_OUT_2["shape"]][0],
        [
            *SHAPES[HELD_OUT_2["shape"]][1],
            *OPTIMIZERS[HELD_OUT_2["optimizer"]],
            *SCHEDULES[HELD_OUT_2["schedule"]],
            "training.per_device_train_batch_size=8",
        ],
    ),
    "wide-shallow-adafactor": (  # held out, since 2026-12-07 (docs/held-out-workloads.md)
        SHAPES[HELD_OUT_3["shape"]][0],
        [
            *SHAPES[HELD_OUT_3["shape"]][1],
            f"training.optim={HELD_OUT_3['optimizer']}",
            *SCHEDULES[HELD_OUT_3["schedule"]],
            "training.per_device_train_batch_size=8",
        ],
    ),
    "deep-thin-sgd": (  # held out, since 2026-12-07 (docs/held-out-workloads.md)
        SHAPES[HELD_OUT_4["shape"]][0],
        [
            *SHAPES[HELD_OUT_4["shape"]][1],
            "training.optim=sgd",  # torch's SGD as the Trainer builds it: no momentum
            *SCHEDULES[HELD_OUT_4["schedule"]],
            "training.per_device_train_batch_size=12",
        ],
    ),
    "mid-nesterov-restarts": (  # held out, since 2026-12-07 (docs/held-out-workloads.md)
        SHAPES[HELD_OUT_5["shape"]][0],
        [
            *SHAPES[HELD_OUT_5["shape"]][1],
            "training.optim=sgd",
            "training.optim_args=momentum=0.95,nesterov=True",
            *SCHEDULES[HELD_OUT_5["schedule"]],
            "training.per_device_train_batch_size=10",
        ],
    ),
}
CATASTROPHE = 0.10  # a supervised run is catastrophic when it ends this fraction above its static twin
BAD_START = 0.10  # a static run started "badly" when it ends this fraction above the grid's best
RESCUE_GAIN = 0.05  # a supervised run "rescued" a bad start when it ends this fraction below the static run
START_FACTORS = (0.25, 1.0, 4.0)  # pbt-start and pb2: the population around the cell's start lr
PB2_SPAN = 64.0  # pb2's lr bounds: the start lr / PB2_SPAN .. x PB2_SPAN (clamped to LR_BOUNDS)
SCHEDULE_FREE_WARMUP = 0.1  # schedulefree: warmup inside the optimizer, this fraction of the run's steps
PRODIGY_LR = 1.0  # prodigy: Prodigy's convention (the lr multiplies the step size it estimates)


@dataclass
class SuiteConfig:
    recipes: list[str] = field(default_factory=lambda: ["tiny", "small"])
    # recipe -> {name: initial lr}; recipes missing here take the "small" values
    lrs: dict[str, dict[str, float]] = field(default_factory=lambda: dict(DEFAULT_LRS))
    grid_lrs: dict[str, list[float]] = field(default_factory=lambda: dict(DEFAULT_GRID))  # extra static runs
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    supervisors: list[str] = field(default_factory=lambda: list(DEFAULT_SUPERVISORS))
    max_steps: dict[str, int] = field(
        default_factory=lambda: {name: 60 for name in ("tiny", "small", *WORKLOADS)}
    )
    eval_steps: dict[str, int] = field(
        default_factory=lambda: {"tiny": 10, "small": 15, **{name: 10 for name in WORKLOADS}}
    )
    explanation_chars: int = 100  # the embedded model's explanations: long ones cost seconds on a CPU
    llm: str = "local"
    base_url: str | None = None
    api_key: str | None = None
    retries: int = 1  # a failed run is run again this many times, then reported as failed
    # Hold the run from each evaluation to the decision on it (as `selfsteer train` does by default);
    # False lets it train on while the supervisor decides (`--no-hold`), as an outside supervisor would.
    hold: bool = True
    # NAME+rsc rows: the reflector's adapter (or model) folder, or "none" (None: the shipped one)
    reflector: str | None = None
    # Ray Tune (evals/lr_suite_ray.py): each run a trial, on this machine's Ray or on a cluster
    ray: bool = False
    ray_address: str | None = None  # default $RAY_ADDRESS, else Ray started here
    ray_cpus: int | None = None  # the CPUs of a Ray started here (default: all)
    cpus_per_trial: float = 1
    max_concurrent: int | None = None  # default: as many trials as the CPUs fit
    # Population Based Training (evals/pbt.py; the `pbt` row, always on Ray): explore moves the lr by one of
    # these factors (the supervisors' double and halve), never resampled; the worst quarter copies the best
    pbt_perturbation_factors: tuple[float, float] = (2.0, 0.5)
    pbt_resample_probability: float = 0.0
    pbt_quantile_fraction: float = 0.25

    def lrs_of(self, recipe: str) -> dict[str, float]:
        return self.lrs.get(recipe) or self.lrs.get("small") or DEFAULT_LRS["small"]

    def grid_of(self, recipe: str) -> list[float]:
        return self.grid_lrs.get(recipe, [])


@dataclass
class Cell:
    recipe: str
    lr_name: str
    lr: float
    seed: int
    supervisor: str

    @property
    def id(self) -> str:
        return f"{self.recipe}-{self.lr_name}-{self.lr:g}-s{self.seed}-{self.supervisor.replace(':', '_')}"


def cells(config: SuiteConfig) -> list[Cell]:
    out = []
    for recipe in config.recipes:
        lrs = config.lrs_of(recipe)
        for seed in config.seeds:
            for lr_name, lr in lrs.items():
                out += [Cell(recipe, lr_name, lr, seed, s) for s in config.supervisors]
            for lr in config.grid_of(recipe):
                if lr not in lrs.values():
                    out.append(Cell(recipe, "grid", lr, seed, "static"))
    return out


def max_steps(cell: Cell, config: SuiteConfig) -> int:
    return config.max_steps.get(cell.recipe, 150)


def workload(cell: Cell, config: SuiteConfig) -> tuple[str, list[str]]:
    """The recipe and overrides of a cell's run: its workload at its start lr, seed and length."""
    recipe, overrides = WORKLOADS.get(cell.recipe, (cell.recipe, []))
    return recipe, [
        *overrides,
        f"training.learning_rate={cell.lr:.6e}",  # YAML reads 1e-05 as text, 1.000000e-05 as a number
        f"training.seed={cell.seed}",
        f"training.max_steps={max_steps(cell, config)}",
        f"training.eval_steps={config.eval_steps.get(cell.recipe, 25)}",
    ]


def baseline_optimizer(name: str, cell: Cell, config: SuiteConfig) -> tuple[list[str], object]:
    """The overrides, and the Trainer's (optimizer class, kwargs) if the recipe cannot name it, of the
    optimizer rows: `schedulefree` (the Trainer builds it: `optim=schedule_free_adamw`, which also puts
    the optimizer in eval mode around each evaluation) and `prodigy` (lr=PRODIGY_LR whatever the start;
    weight decay: the recipe's, read when the run's recipe is loaded). Neither takes a schedule."""
    if name == "schedulefree":
        warmup = max(1, round(SCHEDULE_FREE_WARMUP * max_steps(cell, config)))
        return [
            "training.optim=schedule_free_adamw",
            "training.lr_scheduler_type=constant",
            f"training.warmup_steps={warmup}",  # the optimizer's warmup (a constant schedule has none)
        ], None
    if name == "prodigy":
        from prodigyopt import Prodigy

        return [
            "training.lr_scheduler_type=constant",
            f"training.learning_rate={PRODIGY_LR:.6e}",  # what the run logs and a Trainer would pass
        ], (Prodigy, {"lr": PRODIGY_LR})
    return [], None


SELF_CORRECTIONS = ("sc", "rsc")


def run_cell(cell: Cell, config: SuiteConfig, out: Path, db: Path, chat_model=None) -> dict:
    # lazy: Ray's worker processes import this module (lr_suite_ray, pbt); each pays its top-level imports
    # (moved to the top, they made the Ray tests' fixtures some 15% slower: measured)
    from selfsteer.agents.registry import make_supervisor
    from selfsteer.graphs.supervise import SelfCorrection, run_supervision
    from selfsteer.trainer_bridge.recipe import load_recipe
    from selfsteer.trainer_bridge.runner import RecipeRun

    recipe, overrides = workload(cell, config)
    if cell.supervisor == "cosine":
        overrides.append("training.lr_scheduler_type=cosine")
    name, self_correct = self_correcting(cell.supervisor)
    more, optimizer = baseline_optimizer(name, cell, config)
    overrides += more
    # static, cosine, schedulefree, prodigy: no supervisor (baselines); any other: a fresh one per run
    # (llm:STRATEGY shares the suite's chat model).
    supervisor = None if name in BASELINES else make_supervisor(name, chat_model=chat_model)
    # +sc: the supervisor reflects on its own failures; +rsc: the reflector does (agents/reflector.py)
    reflector = (config.reflector or "shipped") if by_reflector(cell.supervisor) else "self"
    correction = SelfCorrection(reflector=reflector) if self_correct else None

    def supervise(control, stop):
        try:
            run_supervision(
                # A supervisor of its own per run: a cell run again after an interruption starts afresh.
                control,
                supervisor,
                db=str(db),
                stop_event=stop,
                thread_id=f"{cell.id}/{run.run_id}",
                pause_while_deciding=config.hold,
                self_correct=correction,
            )
        except Exception:  # a supervisor crash never stops the run; it is reported
            traceback.print_exc(file=sys.stderr)

    shutil.rmtree(out / "runs" / cell.id, ignore_errors=True)  # what an interrupted attempt left
    loaded = load_recipe(recipe, overrides)
    if optimizer is not None:
        optimizer = (
            optimizer[0],
            {**optimizer[1], "weight_decay": loaded["training"].get("weight_decay", 0.0)},
        )
    run = RecipeRun(
        loaded,
        out_dir=out / "runs" / cell.id,
        db=db,
        port=0,
        supervisor=supervise if supervisor is not None else None,
        hold_for_supervisor=config.hold,  # each decision is about the evaluation it follows
        optimizer=optimizer,
    )
    try:
        summary = run.train()
        extra = optimizer_state(run.trainer.optimizer) if name == "prodigy" else {}
    finally:
        run.close()
    decisions = summary.get("decisions", [])
    return {
        **asdict(cell),
        "run_id": summary["run_id"],
        "final_eval_loss": summary["final_eval_loss"],
        "best_eval_loss": summary["best_eval_loss"],
        "wall_s": summary["wall_s"],
        "decisions": len(decisions),
        "interventions": sum(1 for d in decisions if d["action"] != "keep"),
        "actions": [d["action"] for d in decisions],
        **{k: summary.get("self_correction", {}).get(k, 0) for k in ("failed", "rollbacks", "extra_steps")},
        "max_steps": summary["steps"],
        "compute_steps": summary["compute_steps"],
        **extra,
    }


def optimizer_state(optimizer) -> dict:
    """What Prodigy found: its step-size estimate d and the effective lr (d x lr) it ended with."""
    group = getattr(optimizer, "optimizer", optimizer).param_groups[0]  # the Trainer's is wrapped
    return {"prodigy_d": float(group["d"]), "effective_lr": float(group["d"] * group["lr"])}


def shared_runs(cells: list[Cell]) -> dict[str, Cell]:
    """Cells whose run is another cell's: every `prodigy` cell of a workload and seed but the first
    (Prodigy runs at its own lr whatever the start) -> that first one."""
    first: dict[tuple, Cell] = {}
    shared = {}
    for cell in cells:
        if cell.supervisor == "prodigy":
            key = (cell.recipe, cell.seed)
            if key in first:
                shared[cell.id] = first[key]
            else:
                first[key] = cell
    return shared


def fill_shared(path: Path, todo: list[Cell], shared: dict[str, Cell]) -> None:
    """The rows of the cells in `todo` that share another cell's run: that run's row, as theirs."""
    rows = load_results(path)
    for cell in todo:
        source = shared.get(cell.id)
        row = rows.get(source.id) if source is not None else None
        if row is not None:
            append_result(path, {**row, **asdict(cell), "same_run_as": source.id})


def failed_row(cell: Cell, error: str, attempts: int) -> dict:
    """A run that failed on every attempt: in results.jsonl and the report, run again on resume."""
    return {**asdict(cell), "error": error, "attempts": attempts}


def run_cell_retrying(cell: Cell, config: SuiteConfig, out: Path, db: Path, chat_model=None) -> dict:
    for attempt in range(1, config.retries + 2):
        try:
            return run_cell(cell, config, out, db, chat_model)
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            if attempt > config.retries:
                return failed_row(cell, f"{type(error).__name__}: {error}", attempt)


def self_correcting(supervisor: str) -> tuple[str, bool]:
    """`rule+sc` -> ("rule", True): the suffix adds self-correction to any supervisor; `+rsc` adds
    self-correction by the trained reflector and its actor (agents/reflector.py ReflectorSupervisor)."""
    name, plus, flag = supervisor.partition("+")
    if plus and flag not in SELF_CORRECTIONS:
        raise ValueError(
            f"unknown suffix +{flag} in {supervisor!r}: +sc (self-correction) or +rsc (by the reflector)"
        )
    return name, bool(plus)


def by_reflector(supervisor: str) -> bool:
    return supervisor.endswith("+rsc")


def suite_chat_model(config: SuiteConfig):
    """The chat model the suite's `llm:STRATEGY` supervisors share (the embedded one's explanations kept
    short: long ones cost seconds on a CPU)."""
    from selfsteer.agents.chat_models import make_chat_model

    extra = {"field_max_chars": config.explanation_chars} if config.llm == "local" else {}
    return make_chat_model(config.llm, base_url=config.base_url, api_key=config.api_key, **extra)


def load_results(path: Path) -> dict[str, dict]:
    """Cell id -> its latest row (a failed one run again later is replaced)."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = read_result(line)
            done[Cell(row["recipe"], row["lr_name"], row["lr"], row["seed"], row["supervisor"]).id] = row
    return done


def append_result(path: Path, row: dict) -> None:
    """A row as a line of results.jsonl, strict JSON: a non-finite number is null (`records.strict_json`)."""
    with path.open("a") as results:
        results.write(strict_json(row) + "\n")


# The losses of a results row (and of a population's members): NaN where not finite.
RESULT_LOSSES = ("final_eval_loss", "best_eval_loss")


def read_result(line: str) -> dict:
    """A line of results.jsonl: its losses null (a non-finite number, as `append_result` writes it) back
    to NaN. Older files spell them NaN or Infinity, which `json` reads as such."""
    row = json.loads(line)
    for losses in (row, *row.get("members", [])):
        for key in RESULT_LOSSES:
            if key in losses and losses[key] is None:
                losses[key] = math.nan
    if "curve" in row:
        row["curve"] = [[step, math.nan if loss is None else loss] for step, loss in row["curve"]]
    return row


# -- the report ---------------------------------------------------------------------------------------


def score(rows: list[dict]) -> list[dict]:
    """Regret against the best static learning rate of the grid; whether the static run at the same
    start went badly, and whether the supervisor rescued it."""
    best_static: dict[tuple, float] = {}
    static_at: dict[tuple, dict] = {}
    for r in rows:
        if r["supervisor"] == "static":
            static_at[(r["recipe"], r["seed"], r["lr"])] = r
            if math.isfinite(r["final_eval_loss"]):
                key = (r["recipe"], r["seed"])
                best_static[key] = min(best_static.get(key, math.inf), r["final_eval_loss"])
    scored = []
    for r in rows:
        best = best_static.get((r["recipe"], r["seed"]), math.nan)
        static = static_at.get((r["recipe"], r["seed"], r["lr"]))
        bad = static is not None and not static["final_eval_loss"] <= best * (1 + BAD_START)  # NaN is bad
        rescued = bad and r["final_eval_loss"] < static["final_eval_loss"] * (1 - RESCUE_GAIN)
        catastrophic = (
            static is not None
            and r["supervisor"] != "static"
            and not r["final_eval_loss"] <= static["final_eval_loss"] * (1 + CATASTROPHE)  # NaN is
        )
        scored.append(
            {
                **r,
                "regret": r["final_eval_loss"] - best,
                "bad_start": bad,
                "rescued": rescued,
                "catastrophic": catastrophic,
                "compute_ratio": compute_ratio(r, static),
            }
        )
    return scored


def compute_ratio(row: dict, static: dict | None) -> float:
    """The optimizer steps `row` paid for over those of its static twin (NaN: either count unknown)."""
    paid, twin = row.get("compute_steps"), (static or {}).get("compute_steps")
    return paid / twin if paid is not None and twin else math.nan


def _median(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def _final_lineage(stores, run_id: str) -> tuple[list[int], list[float]]:
    """The eval losses behind the weights a run ended with: a self-correcting run's abandoned
    branches left out (its final branch is the last one it loaded)."""
    from selfsteer.trainer_bridge.checkpoints import list_branches
    from selfsteer.trainer_bridge.store.runs import lineage

    for store in stores:
        metrics = store.get_metrics(run_id, names=["eval_loss"])
        if metrics:
            branches = list_branches(store, run_id)
            kept = lineage(metrics, branches, branches[-1]["name"])
            return [m["step"] for m in kept], [m["value"] for m in kept]
    return [], []


def _preamble(config: SuiteConfig, failed: list[dict]) -> list[str]:
    """What the report's columns and rows mean, and the runs that failed."""
    lines = [
        "# lr-suite report",
        "",
        f"Workloads {', '.join(config.recipes)}; seeds {', '.join(map(str, config.seeds))}; LLM {config.llm}. "
        "Medians over seeds. Regret: final eval loss minus that of the best static learning rate of the grid "
        "(same workload and seed). Rescued: of the runs whose static twin ended over "
        f"{BAD_START:.0%} above the grid's best (a bad start), how many the supervisor brought at least "
        f"{RESCUE_GAIN:.0%} lower. Catastrophic: runs ending over {CATASTROPHE:.0%} above their static twin. "
        "Interventions: decisions other than keep. Regret spread: min..max over seeds. Self-correct: "
        "each lr change is checked at the next evaluation and a failure (eval loss up over 2%) rolled back "
        "and retried; rollbacks: summed over seeds (and all failures found); steps abandoned: the mean share "
        "of the run's steps trained on branches rolled back from (every run has the same total steps). "
        "Supervised runs are paused while the supervisor decides. Compute: the optimizer steps the row paid "
        "for (compute_steps: the steps the run trained, abandoned branches included, plus every probe's arms; "
        "a population's row: every member's steps) over those of the static run from the same start.",
        "",
    ]
    described = [name for name in ROWS if name in config.supervisors and name != "pbt"]
    lines += [*(f"- {name}: {ROWS[name]}." for name in described), ""] if described else []
    if {"pbt-start", "pb2"} & set(config.supervisors):
        lines += [
            "pbt-start, pb2: each row is its population's best member at the end (the lowest final eval loss); "
            "interventions and curve: that member's final lineage; compute: all three members' steps; wall s: "
            "the population's wall time.",
            "",
        ]
    if "pbt" in config.supervisors:
        lines += [
            "pbt: Ray Tune's Population Based Training, one population per workload and seed whose members "
            "are the runs from its start lrs, ranked at every evaluation; the worst "
            f"{config.pbt_quantile_fraction:.0%} copies the best one's weights and optimizer and moves its lr "
            f"by x{' or x'.join(f'{f:g}' for f in config.pbt_perturbation_factors)}. Equal compute: each member "
            "trains as many steps as a supervised run, so a population of N starts costs the N supervised runs' "
            "steps (each member's row counts them all: compute Nx); unlike a supervisor, members share what they "
            "learn, and the population holds the good start. Interventions: lr changes in the "
            "member's final lineage (a copied member's includes its donor's), and its curve is that lineage: a "
            "member that copied another at step k shows the donor's eval losses up to k. Wall s: the "
            "population's wall time until the member finished, over its N members.",
            "",
        ]
    if failed:
        lines += [
            f"**Failed runs: {len(failed)}** (failed on every attempt; left out of the tables, run again on "
            "resume):",
            "",
            *(
                f"- {Cell(r['recipe'], r['lr_name'], r['lr'], r['seed'], r['supervisor']).id}, "
                f"{r['attempts']} attempts: {r['error']}"
                for r in failed
            ),
            "",
        ]
    return lines


def _recipe_table(recipe: str, rows: list[dict], config: SuiteConfig) -> list[str]:
    """A workload's table: a line per initial lr and supervisor, medians over seeds."""
    grid = sorted({*config.lrs_of(recipe).values(), *config.grid_of(recipe)})
    lines = [
        f"## {recipe}" + (" (held out: never collected for the intervener)" if recipe in WORKLOADS else ""),
        "",
        "Initial learning rates: "
        + ", ".join(f"{k} {v:g}" for k, v in config.lrs_of(recipe).items())
        + "; static grid: "
        + ", ".join(f"{v:g}" for v in grid)
        + ".",
        "",
        "| initial lr | supervisor | self-correct | final eval loss | best eval loss | regret | regret spread | interventions | rescued | catastrophic | rollbacks | steps abandoned | compute | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for lr_name in config.lrs_of(recipe):
        for supervisor in config.supervisors:
            group = [
                r
                for r in rows
                if (r["recipe"], r["lr_name"], r["supervisor"]) == (recipe, lr_name, supervisor)
            ]
            if not group:
                continue
            bad = [r for r in group if r["bad_start"]]
            rescued = (
                f"{sum(r['rescued'] for r in bad)}/{len(bad)}" if bad and supervisor != "static" else "-"
            )
            regrets = [r["regret"] for r in group if math.isfinite(r["regret"])]
            spread = f"{min(regrets):+.3f}..{max(regrets):+.3f}" if regrets else "-"
            catastrophic = (
                f"{sum(r['catastrophic'] for r in group)}/{len(group)}" if supervisor != "static" else "-"
            )
            name, self_correct = self_correcting(supervisor)
            if self_correct:
                rollbacks = f"{sum(r.get('rollbacks', 0) for r in group)} ({sum(r.get('failed', 0) for r in group)} failed)"
                abandoned = f"{statistics.fmean(r.get('extra_steps', 0) / r['max_steps'] for r in group):.0%}"
            else:
                rollbacks = abandoned = "-"
            ratio = _median(r["compute_ratio"] for r in group)
            compute = f"{ratio:.2f}x" if math.isfinite(ratio) else "-"
            corrected = ("by the reflector" if by_reflector(supervisor) else "yes") if self_correct else "no"
            lines.append(
                f"| {lr_name} | {name} | {corrected} | "
                f"{_median(r['final_eval_loss'] for r in group):.3f} | "
                f"{_median(r['best_eval_loss'] for r in group):.3f} | {_median(r['regret'] for r in group):+.3f} | "
                f"{spread} | {_median(r['interventions'] for r in group):g} | {rescued} | {catastrophic} | "
                f"{rollbacks} | {abandoned} | {compute} | {_median(r['wall_s'] for r in group):.1f} |"
            )
    lines.append("")
    return lines


def _curve_plots(rows: list[dict], config: SuiteConfig, out: Path, extra_dbs: list[Path] | None) -> list[str]:
    """A plot per workload and initial lr (the first seed's curves): written to `out`, linked in the report."""
    from selfsteer.evals.plots import plot_curves
    from selfsteer.trainer_bridge.store import Store

    lines: list[str] = []
    stores = [Store(path) for path in [out / "suite.sqlite", *(extra_dbs or [])]]
    try:
        for recipe in config.recipes:
            for lr_name, lr in config.lrs_of(recipe).items():
                curves = {}
                for r in rows:
                    if (r["recipe"], r["lr_name"], r["seed"]) == (recipe, lr_name, config.seeds[0]):
                        if "curve" in r:  # a PBT member: several runs, its lineage reported by Tune
                            steps, values = [p[0] for p in r["curve"]], [p[1] for p in r["curve"]]
                        else:
                            steps, values = _final_lineage(stores, r["run_id"])
                        if steps:
                            curves[r["supervisor"]] = (steps, values)
                if curves:
                    name = f"curves_{recipe}_{lr_name}.png"
                    plot_curves(
                        curves,
                        out / name,
                        f"{recipe}, initial lr {lr_name} ({lr:g}), seed {config.seeds[0]}",
                    )
                    lines.append(f"![{recipe} {lr_name}]({name})")
    finally:
        for store in stores:
            store.close()
    return lines


def report(
    rows: list[dict], config: SuiteConfig, out: str | Path, extra_dbs: list[Path] | None = None
) -> str:
    """report.md and plots in `out`; curves come from out/suite.sqlite (and `extra_dbs`: suites run
    apart and reported together)."""
    out = Path(out)
    failed = [r for r in rows if "error" in r]
    rows = [r for r in score([r for r in rows if "error" not in r]) if r["lr_name"] != "grid"]
    lines = _preamble(config, failed)
    for recipe in config.recipes:
        lines += _recipe_table(recipe, rows, config)
    lines += _curve_plots(rows, config, out, extra_dbs)
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text

"""`selfsteer eval lr-suite`: compare supervisors on runs started at bad learning rates."""

from __future__ import annotations

import argparse

from selfsteer.cli.common import add_llm_arguments, add_ray_arguments
from selfsteer.evals.lr_suite_names import DEFAULT_SUPERVISORS, ROWS


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _named_floats(text: str) -> dict[str, float]:
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError("use NAME=LR,NAME=LR (e.g. too_low=1e-5,good=1e-3,too_high=5e-2)")
    return {name: float(value) for name, value in pairs}


def add_parser(subparsers, name: str) -> None:
    # light: not evals.lr_suite (transformers)

    parser = subparsers.add_parser(
        name, help="evaluation suites (lr-suite)", description="Evaluation suites."
    )
    suites = parser.add_subparsers(dest="suite", metavar="SUITE", required=True)
    suite = suites.add_parser(
        "lr-suite",
        help="supervisors x workloads x initial learning rates x seeds -> report.md + plots",
        description="Run every workload at a too-low, a good and a too-high initial learning rate, for each "
        "seed, under each supervisor (static, cosine schedule, rules, PyTorch's ReduceLROnPlateau, the LLM with "
        "each prompt strategy, the intervener, Ray Tune's Population Based Training and PB2, schedule-free AdamW, "
        "Prodigy), "
        "and write a markdown report with plots: final and best eval loss, regret against the best static "
        "learning rate of a grid, share of diverging runs rescued, interventions, compute (optimizer steps paid, "
        "against the static run), wall time. Resumable: "
        "runs already in OUT/results.jsonl are not run again (a failed one is; on Ray, an interrupted "
        "experiment is restored by Tune, a PBT population from its members' checkpoints).",
    )
    suite.add_argument(
        "--recipes",
        default="tiny,small",
        help="workloads: recipes, or the held-out deep-rmsprop, deep-narrow-adagrad, wide-shallow-adafactor, deep-thin-sgd and "
        "mid-nesterov-restarts "
        "(never collected or tuned on; docs/held-out-workloads.md) (default tiny,small)",
    )
    suite.add_argument(
        "--held-out",
        action="store_true",
        help="the held-out cells: --recipes deep-rmsprop,deep-narrow-adagrad,wide-shallow-adafactor,deep-thin-sgd,"
        "mid-nesterov-restarts --supervisors "
        "static,cosine,plateau,rule,llm:intervener,intervener (unless given)",
    )
    suite.add_argument(
        "--lrs",
        type=_named_floats,
        default=None,
        help="initial learning rates for every recipe, NAME=LR,... (default per recipe: tiny too_low=1e-4,"
        "good=1e-2,too_high=1.0; small too_low=1e-5,good=1e-3,too_high=1e-1)",
    )
    suite.add_argument(
        "--grid",
        type=_floats,
        default=None,
        help="extra static learning rates for regret (default per recipe)",
    )
    suite.add_argument(
        "--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2], help="default 0,1,2"
    )
    suite.add_argument(
        "--supervisors",
        default=",".join(DEFAULT_SUPERVISORS),
        help="default: %(default)s; NAME+sc adds self-correction (check, reflect, roll back, retry) to a "
        "supervisor; NAME+rsc the same with the trained reflector writing the reflection and its actor "
        "retrying (see --reflector). Rows that are no supervisor: static (the start lr untouched), cosine (a cosine schedule); "
        + "; ".join(f"{name}: {text}" for name, text in ROWS.items()).replace("%", "%%")
        + " (pbt, pbt-start and pb2 always run on Ray)",
    )
    suite.add_argument(
        "--self-correct",
        action="store_true",
        help="also run every supervisor with self-correction (as NAME+sc), compared in the report",
    )
    suite.add_argument(
        "--reflector",
        default=None,
        metavar="PATH|none",
        help="NAME+rsc rows: the reflector (an adapter or model folder, or none: the untrained embedded "
        "model; default: the shipped agents/reflector/)",
    )
    suite.add_argument(
        "--max-steps", type=int, default=None, help="steps per run (default: tiny 60, small 60)"
    )
    suite.add_argument(
        "--eval-steps", type=int, default=None, help="evaluate every N steps (default: tiny 10, small 15)"
    )
    suite.add_argument(
        "--no-hold",
        dest="hold",
        action="store_false",
        help="let each run train on while its supervisor decides (the default holds it from each evaluation "
        "to the decision on it, so the decision acts on the state it saw)",
    )
    suite.add_argument("--out", default="runs/lr-suite", help="output folder (default runs/lr-suite)")
    suite.add_argument(
        "--retries",
        type=int,
        default=1,
        help="run a failed run again N times, then report it as failed (default 1)",
    )
    add_ray_arguments(
        suite,
        "--ray runs each run as a Ray Tune trial: on a Ray started here, or on the cluster at --ray-address. "
        "The runs write to OUT/suite.sqlite and OUT/results.jsonl: on a cluster of several machines, OUT must "
        "be on a filesystem every node shares. The Tune experiment lives in OUT/ray.",
    )
    add_llm_arguments(suite)

"""`selfsteer decisions collect|export`: decision data, to analyse supervisors and train interveners."""

from __future__ import annotations

import argparse

from selfsteer.cli.common import add_ray_arguments

DEFAULT_SHAPES = "tiny,tiny-wide,small-narrow"

COLLECT_HELP = """\
Counterfactual decision data. Each run of a grid of workloads (model shapes x AdamW / SGD with momentum x
constant / warm-up-and-decay schedules x batch sizes x start lrs from 64x too low to 64x too high x seeds),
or of one recipe (--recipe, with --set overrides, at each of --lrs x --seeds), is forked at every
decision point into one branch per action (double, halve, keep), each continued from the identical state
(weights, optimizer, scheduler, data order, RNG) for the horizon; the eval loss each branch reached is
stored. A fourth branch keeps the lr under another data order: the noise from which the label's margin
is measured (see `decisions export`). The run itself goes on with the behaviour policy's action, so the
rows cover the states that policy visits (--policy intervener: a DAgger round).

Writes OUT/rows.jsonl (one line per decision point) and OUT/runs.jsonl (one per run) as it goes; run it
again to resume. A failed run is retried (--retries), then written to OUT/failed.jsonl and reported; the
next call collects it again. Held-out workloads are never collected, from the grid or from a recipe (a
recipe whose model section, optimizer family or schedule is a held-out one, or a held-out start lr, is
refused before anything is written; an evaluation-only workload of docs/held-out-workloads.md, such as
reflector-heldout, may start from a held-out lr).

A recipe run takes its steps, evaluation interval (a decision point after each) and batch size from the
recipe (training.max_steps, eval_steps, per_device_train_batch_size: set them with --set). Its rows'
spec holds the resolved workload: shape (the recipe's name and, in brackets, what the overrides change),
optimizer (training.optim), schedule (lr_scheduler_type, +warmupN), so rows of any collection can be
told apart by workload (evals/counterfactual.py workload_key).

examples:
  selfsteer decisions collect --out runs/cf
  selfsteer decisions collect --out runs/cf --shard 0/2 &  selfsteer decisions collect --out runs/cf2 --shard 1/2
  selfsteer decisions collect --out runs/cf-dagger --policy intervener --seeds 3
  selfsteer decisions collect --out runs/cf --ray --cpus-per-trial 1        # runs as Ray Tune trials
  selfsteer decisions collect --recipe tiny --set model.n_layer=2 --set training.optim=adafactor \\
      --set training.max_steps=60 --lrs 1e-3,1e-2,0.1 --seeds 0,1 --out runs/cf-tiny2-adafactor
"""


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="collect counterfactual decision data, or export decisions (jsonl or a Hugging Face dataset)",
        description="Decision data: `collect` forks runs into one branch per action to learn which was "
        "best; `export` writes decisions (a store's, or collected ones) for analysis or training.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    collect = actions.add_parser(
        "collect",
        help="fork runs at each decision point into one branch per action, and record what each did",
        description=COLLECT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    collect.add_argument("--out", required=True, help="output folder (rows.jsonl, runs.jsonl)")
    collect.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    collect.add_argument(
        "--shapes",
        default=None,
        help=f"the grid's model shapes (default {DEFAULT_SHAPES}); not with --recipe",
    )
    collect.add_argument(
        "--recipe",
        default=None,
        metavar="FILE_OR_NAME",
        help="collect this recipe (a built-in name or a YAML file) instead of the grid: one run per --lrs x "
        "--seeds, with the recipe's steps, evaluation interval and batch size",
    )
    collect.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --recipe: override a recipe key, e.g. model.n_layer=2 (repeatable; values are YAML)",
    )
    collect.add_argument(
        "--lrs",
        default=None,
        help="with --recipe (required there): comma-separated start lrs, e.g. 1e-3,1e-2",
    )
    collect.add_argument(
        "--policy",
        default="random",
        help="the behaviour policy, whose action each run takes: random (default) | keep | rule | "
        "intervener | module:Class",
    )
    collect.add_argument(
        "--horizon", type=int, default=None, help="steps each branch trains (default: to the next decision)"
    )
    collect.add_argument(
        "--probe",
        action="store_true",
        help="probe each decision point first, as `--supervisor probe:full` does (x0.5, x1 and x2 of the lr, "
        "4 steps each from an exact snapshot, extrapolated to two evaluation intervals): each row's "
        "observation carries the table, so a probe supervisor can be scored on the rows (`intervener "
        "validate`)",
    )
    collect.add_argument(
        "--shard", default="0/1", help="I/N: collect every N-th run from the I-th (default 0/1)"
    )
    collect.add_argument("--limit", type=int, default=None, help="collect at most this many runs")
    collect.add_argument(
        "--retries",
        type=int,
        default=1,
        help="collect a failed run again N times, then write it to OUT/failed.jsonl (default 1)",
    )
    add_ray_arguments(
        collect,
        "--ray collects each run as a Ray Tune trial: on a Ray started here, or on the cluster at "
        "--ray-address. Each run's rows come back to this process, which writes OUT/rows.jsonl and "
        "OUT/runs.jsonl: OUT need not be shared with the cluster's nodes. The Tune experiment lives in OUT/ray.",
    )

    export = actions.add_parser(
        "export",
        help="write decisions to a file or dataset folder",
        description="Without --counterfactual: every decision a supervisor made, as stored (observation, "
        "chat messages, raw answer, action, explanation, strategy, model, latency, fallback, outcome). With "
        "--counterfactual DIR: the collected rows, labelled (the best action, keep unless another beats it "
        "by the noise margin measured from the probes), with every action's outcome and the chat an "
        "intervener is trained on; `--format hf` adds a data card (README.md).",
    )
    export.add_argument("--format", choices=("jsonl", "hf"), default="jsonl", help="jsonl (default) or hf")
    export.add_argument("--out", required=True, help="output path (a .jsonl file, or a folder for hf)")
    export.add_argument("--db", default="selfsteer.sqlite", help="the store (default ./selfsteer.sqlite)")
    export.add_argument("--run", default=None, help="only this run's decisions")
    export.add_argument(
        "--counterfactual",
        nargs="+",
        default=None,
        metavar="DIR",
        help="collected folders (decisions collect)",
    )

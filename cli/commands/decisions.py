"""`selfsteer decisions collect|export`: collect counterfactual rows, or export decisions."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from selfsteer.agents.decision_data import export_decisions
from selfsteer.agents.intervener_data import export_counterfactual
from selfsteer.cli.decisions import DEFAULT_SHAPES
from selfsteer.trainer_bridge.store import Store


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        raise ValueError(f"--shard must be I/N, e.g. 0/2, not {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: I must be in 0..N-1")
    return index, count


def run(args: argparse.Namespace) -> int:
    if args.action == "collect":
        return _collect(args)
    return _export(args)


def _collect(args: argparse.Namespace) -> int:
    # Here, not at the top: collecting imports torch and the trainer (seconds); `export` needs neither.
    from selfsteer.evals.collect import CollectConfig, collect
    from selfsteer.evals.counterfactual import default_specs, recipe_specs

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if args.recipe is None:
            if args.lrs is not None or args.set:
                raise ValueError("--lrs and --set need --recipe (the grid's start lrs follow its optimizers)")
            shapes = args.shapes or DEFAULT_SHAPES
            specs = default_specs(
                seeds=seeds, shapes=[s.strip() for s in shapes.split(",")], policy=args.policy
            )
        else:
            if args.shapes is not None:
                raise ValueError(
                    "--shapes names the grid's shapes: with --recipe the shape is the recipe's "
                    "(change it with --set model.KEY=VALUE)"
                )
            if not args.lrs:
                raise ValueError("--recipe needs --lrs: the start lrs to collect, e.g. --lrs 1e-3,1e-2,1e-1")
            try:
                lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f"--lrs must be comma-separated numbers, not {args.lrs!r}") from None
            specs = recipe_specs(args.recipe, args.set, lrs, seeds, policy=args.policy)
        if args.horizon is not None:
            specs = [replace(s, horizon=args.horizon) for s in specs]
        if args.probe:
            specs = [replace(s, probe=True) for s in specs]
        shard = _shard(args.shard)
    except ValueError as error:
        print(f"selfsteer decisions collect: {error}", file=sys.stderr)
        return 2
    config = CollectConfig(
        out=args.out, specs=specs[: args.limit] if args.limit else specs, shard=shard,
        retries=args.retries, ray=args.ray, ray_address=args.ray_address, ray_cpus=args.ray_cpus,
        cpus_per_trial=args.cpus_per_trial, max_concurrent=args.max_concurrent,
    )  # collect's flags into its config # fmt: skip
    failures: list[dict] = []
    summaries = collect(config, failures=failures)
    rows = sum(s["rows"] for s in summaries)
    print(f"{len(summaries)} runs, {rows} decision points -> {args.out}/rows.jsonl")
    if failures:
        print(f"{len(failures)} runs failed -> {args.out}/failed.jsonl", file=sys.stderr)
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.counterfactual:
        try:
            count, margin = export_counterfactual(args.counterfactual, args.out, args.format)
        except ValueError as error:
            print(f"selfsteer decisions export: {error}", file=sys.stderr)
            return 2
        print(f"{count} labelled decision points (noise margin {margin:.2%}) -> {args.out} ({args.format})")
        return 0

    if not Path(args.db).exists():
        print(f"selfsteer decisions: no store at {args.db} (pass --db)", file=sys.stderr)
        return 2
    with Store(args.db) as store:
        count = export_decisions(store, args.out, args.format, args.run)
    print(f"{count} decisions -> {args.out} ({args.format})")
    return 0

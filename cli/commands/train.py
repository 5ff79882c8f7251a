"""`selfsteer train`: load (or resume) the recipe, start the supervisor beside it, train, report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from selfsteer.agents.chat_models import ChatModelConfigError
from selfsteer.cli.commands.common import supervisor_thread_from_args
from selfsteer.evals.plots import plot_run
from selfsteer.trainer_bridge.recipe import RecipeError, load_recipe
from selfsteer.trainer_bridge.records import strict_json
from selfsteer.trainer_bridge.runner import RecipeRun, ResumePoint
from selfsteer.trainer_bridge.store import Store, StoreError


def run(args: argparse.Namespace) -> int:
    resume = None
    if args.resume:
        if args.set or args.seed is not None:
            print("selfsteer train: --resume uses the run's own recipe: no --set or --seed", file=sys.stderr)
            return 2
        try:
            with Store(args.db) as store:
                resume = ResumePoint.find(store, args.resume)
        except (ValueError, StoreError) as exc:
            print(f"selfsteer train: cannot resume: {exc}", file=sys.stderr)
            return 2
        recipe = resume.recipe
    else:
        try:
            recipe = load_recipe(args.recipe, args.set, seed=args.seed)
        except RecipeError as exc:
            print(f"selfsteer train: {exc}", file=sys.stderr)
            return 2
    args.supervisor = args.supervisor or recipe["supervisor"].get("type", "none")
    try:
        supervisor = supervisor_thread_from_args(
            args,
            db=args.db,
            pause_while_deciding=args.pause_while_deciding,
            # A resumed run's supervisor starts afresh: the old loop's state belongs to the old branch.
            thread_id=f"supervise:{args.resume}:resume-{time.time():.0f}" if resume else None,
        )
    except (ValueError, ChatModelConfigError) as exc:
        print(f"selfsteer train: {exc}", file=sys.stderr)
        return 2
    recipe["supervisor"]["type"] = args.supervisor
    if resume:
        out = resume.out_dir
    else:
        out = Path(args.out or f"runs/{recipe['name']}-{time.strftime('%Y%m%d-%H%M%S')}")
    return train(recipe, out, args, supervisor, resume)


def train(recipe: dict, out: Path, args: argparse.Namespace, supervisor, resume=None) -> int:
    hf_logging.set_verbosity_error()
    try:
        run = RecipeRun(
            recipe,
            out_dir=out,
            db=args.db,
            host=args.host,
            port=args.port,
            token=args.token,
            progress=True,
            supervisor=supervisor,
            hold_for_supervisor=args.pause_while_deciding,
            resume=resume,
        )
    except (RecipeError, ValueError, OSError) as exc:
        print(f"selfsteer train: {exc}", file=sys.stderr)
        return 2
    page = f"{run.url}/?{urlencode({'token': args.token})}" if args.token else f"{run.url}/"
    if resume:
        checkpoint = resume.checkpoint
        print(f"resuming run {run.run_id} from {checkpoint['name']} (step {checkpoint['step']})", flush=True)
    print(f"run {run.run_id} ({recipe['name']}): dashboard and API at {page}", flush=True)
    try:
        summary = run.train()
    finally:
        run.close()
    shown = {
        k: summary[k]
        for k in ("final_eval_loss", "best_eval_loss", "steps", "compute_steps", "wall_s", "commands")
    }
    print(strict_json(shown))
    if summary.get("decisions"):
        print_decisions(summary["decisions"])
    if summary.get("run_id"):
        print(f"plot: {plot(summary, out)}")
    print(f"summary: {out / 'summary.json'}")
    return 0


def print_decisions(decisions: list[dict]) -> None:
    table = Table(title="decisions")
    for column in ("step", "action", "lr before", "lr after", "explanation"):
        table.add_column(column, overflow="fold")
    for d in decisions:
        table.add_row(
            str(d["step"]), d["action"], f"{d['lr_before']:.3g}", f"{d['lr_after']:.3g}", d["explanation"]
        )
    Console().print(table)


def plot(summary: dict, out: Path) -> Path:
    """Loss and learning rate with the decisions marked, as out/plot.png."""
    with Store(summary["db"]) as store:
        title = f"{summary.get('recipe')}: final eval loss {summary['final_eval_loss']:.3f}"
        return plot_run(store, summary["run_id"], out / "plot.png", title=title)

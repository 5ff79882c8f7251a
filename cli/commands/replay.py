"""`selfsteer replay RUN`: rebuild a recorded run from its recipe and replay its journaled commands."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from transformers.utils import logging as hf_logging

from selfsteer.trainer_bridge.records import strict_json
from selfsteer.trainer_bridge.runner import RecipeRun
from selfsteer.trainer_bridge.store import Store


def find_run(store, prefix: str) -> dict | None:
    run = store.get_run(prefix)
    if run is not None:
        return run
    matches = [r for r in store.list_runs(limit=100_000) if r["id"].startswith(prefix)]
    return matches[0] if len(matches) == 1 else None


def run(args: argparse.Namespace) -> int:
    if not Path(args.db).is_file():
        print(f"selfsteer replay: no store at {args.db}", file=sys.stderr)
        return 2
    with Store(args.db) as store:
        original = find_run(store, args.run)
    if original is None:
        print(f"selfsteer replay: no single run matches {args.run!r} in {args.db}", file=sys.stderr)
        return 2
    recipe = (original["config"] or {}).get("recipe")
    if recipe is None:
        print(f"selfsteer replay: run {original['id']} has no recipe to rebuild it from", file=sys.stderr)
        return 2

    hf_logging.set_verbosity_error()
    out = Path(args.out or f"runs/replay-{original['id'][:8]}-{time.strftime('%Y%m%d-%H%M%S')}")
    replay = RecipeRun(recipe, out_dir=out, db=args.db, port=None, replay_of=original["id"], progress=True)
    print(f"replaying run {original['id']} as run {replay.run_id}", flush=True)
    try:
        summary = replay.train()
    finally:
        replay.close()

    before = (original["summary"] or {}).get("final_eval_loss")
    after = summary["final_eval_loss"]
    report = {"original": original["id"], "replay": summary["run_id"], "original_final_eval_loss": before}
    report["replay_final_eval_loss"] = after
    if before is None:
        report["match"] = None
        print(strict_json(report))
        return 0
    report["abs_diff"] = abs(after - before)
    report["match"] = math.isclose(after, before, rel_tol=0.0, abs_tol=args.tolerance)
    print(strict_json(report))
    return 0 if report["match"] else 1

"""`selfsteer decisions export`: agent decision data, for analysis or to train better interveners."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="export the supervisors' decisions (jsonl or a Hugging Face dataset)",
        description="Every decision a supervisor made, as stored: what it saw (observation and the chat "
        "messages its prompt strategy rendered), what it answered (raw output, action, explanation), "
        "strategy, model, latency, fallback, and the outcome (loss change over the next window).",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = actions.add_parser("export", help="write the decisions to a file or dataset folder")
    export.add_argument("--format", choices=("jsonl", "hf"), default="jsonl", help="jsonl (default) or hf")
    export.add_argument("--out", required=True, help="output path (a .jsonl file, or a folder for hf)")
    export.add_argument("--db", default="selfsteer.sqlite", help="the store (default ./selfsteer.sqlite)")
    export.add_argument("--run", default=None, help="only this run's decisions")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from selfsteer.agents.decision_data import export_decisions
    from selfsteer.trainer_bridge.store import Store

    if not Path(args.db).exists():
        print(f"selfsteer decisions: no store at {args.db} (pass --db)", file=sys.stderr)
        return 2
    with Store(args.db) as store:
        count = export_decisions(store, args.out, args.format, args.run)
    print(f"{count} decisions -> {args.out} ({args.format})")
    return 0

"""`selfsteer train`: one run of a recipe, steerable through its control server while it trains."""

from __future__ import annotations

import argparse
import os

from selfsteer.cli.common import add_llm_arguments, add_supervisor_arguments

TOKEN_ENV = "SELFSTEER_TOKEN"

DESCRIPTION = """\
Train a recipe (a small byte-level GPT-2 on the Python standard library's source) with the control
server up: open its URL in a browser for the dashboard (live charts, controls, console), or GET
/api/state and /api/metrics, POST /api/commands (set_optimizer, pause, save_checkpoint,
load_checkpoint, ...), or subscribe to WS /api/events. Every command and metric is
journaled in the store; `selfsteer replay RUN` re-runs the run with the same commands at the same steps.
Writes DIR/summary.json (final_eval_loss, best_eval_loss, steps, wall_s, decisions, commands, run_id, db).
"""

EPILOG = """\
examples:
  selfsteer recipes
  selfsteer train --recipe tiny --out runs/tiny
  selfsteer train --recipe small --set training.learning_rate=5e-3 --port 7007
  selfsteer train --recipe small --set training.learning_rate=0.1 --supervisor rule
  selfsteer train --recipe small --supervisor llm --strategy compact_stats --llm local
  selfsteer train --recipe small --set training.save_strategy=steps --set training.save_steps=50
  selfsteer train --resume RUN_ID          # after a crash: from its latest checkpoint, same run
  curl -X POST http://127.0.0.1:7007/api/commands -H 'Content-Type: application/json' \\
       -d '{"type": "set_optimizer", "args": {"lr": 0.001}}'
"""


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help="train a recipe with the control server up",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--recipe", help="a built-in recipe (see `selfsteer recipes`) or a YAML file")
    start.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue a run that crashed or stopped, from its latest Trainer checkpoint (runs save them "
        "with --set training.save_strategy=steps --set training.save_steps=N): same run id, journal and "
        "metrics in --db; the steps from the checkpoint on form a new branch, resume-K. Commands the "
        "run left unapplied are journaled failed. --set is not allowed: the run's own recipe is used",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. training.learning_rate=0.02 (repeatable; values are YAML)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="control server address (default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=7007, help="control server port (default: 7007; 0: any free)"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV) or None,
        help=f"bearer token the server requires (default: ${TOKEN_ENV}); needed when --host is not loopback",
    )
    parser.add_argument("--out", default=None, help="output folder (default: runs/RECIPE-TIME)")
    parser.add_argument("--db", default="selfsteer.sqlite", help="the store (default: ./selfsteer.sqlite)")
    parser.add_argument("--seed", type=int, default=None, help="training seed (default: the recipe's)")
    add_supervisor_arguments(parser, default=None)
    parser.add_argument(
        "--pause-while-deciding",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hold training from each evaluation until the supervisor has decided and acted on it, so each "
        "decision acts on the state it saw (default). --no-pause-while-deciding lets training go on beside "
        "the supervisor: faster, but its decisions land later than the evaluation they answer (on the "
        "lr-suite's tiny cells most runs ended before a second decision and nothing was rescued)",
    )
    add_llm_arguments(parser)
    return parser

"""`selfsteer dashboard`: the dashboard's history view over a store, with no run training.

A live run serves the dashboard itself (`selfsteer train` prints its URL); this command is for looking
back: every run in the store, its charts per branch, the supervisor's decisions and the command journal.
"""

from __future__ import annotations

import argparse
import os

from selfsteer.cli.train import TOKEN_ENV


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help="browse past runs of a store in the dashboard",
        description=__doc__,
        epilog="example:\n  selfsteer dashboard --db runs/demo.sqlite --port 7008",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--db", default="selfsteer.sqlite", help="the store (default: ./selfsteer.sqlite)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7008, help="port (default: 7008; 0: any free)")
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV) or None,
        help=f"bearer token the server requires (default: ${TOKEN_ENV}); needed when --host is not loopback",
    )
    return parser

"""`selfsteer dashboard`: the dashboard's history view over a store, with no run training.

A live run serves the dashboard itself (`selfsteer train` prints its URL); this command is for looking
back: every run in the store, its charts per branch, the supervisor's decisions and the command journal.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlencode

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


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from selfsteer.trainer_bridge.net import bind, is_loopback
    from selfsteer.trainer_bridge.server import create_history_app, dashboard_dir
    from selfsteer.trainer_bridge.store import Store, StoreError

    if not Path(args.db).is_file():
        print(f"selfsteer dashboard: no store at {args.db} (pass --db)", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and not args.token:
        print(f"selfsteer dashboard: serving on {args.host} needs --token or ${TOKEN_ENV}", file=sys.stderr)
        return 2
    try:
        sock, url, origins = bind(args.host, args.port)
        store = Store(args.db)
    except (OSError, StoreError) as exc:
        print(f"selfsteer dashboard: {exc}", file=sys.stderr)
        return 2
    static_dir = dashboard_dir()
    app = create_history_app(store, origins, args.token, static_dir=static_dir)
    if static_dir is None or not (static_dir / "index.html").is_file():
        print(
            "note: the dashboard is not built (bash scripts/install.sh builds it); the API works",
            file=sys.stderr,
        )
    page = f"{url}/?{urlencode({'token': args.token})}" if args.token else f"{url}/"
    print(
        f"{len(store.list_runs(limit=1000))} runs in {args.db}: dashboard at {page} (Ctrl-C ends it)",
        flush=True,
    )
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
    finally:
        store.close()
    return 0

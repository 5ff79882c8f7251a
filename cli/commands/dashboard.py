"""`selfsteer dashboard`: serve the history view over a store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlencode

import uvicorn

from selfsteer.cli.train import TOKEN_ENV
from selfsteer.trainer_bridge.net import bind, is_loopback
from selfsteer.trainer_bridge.server import create_history_app, dashboard_dir
from selfsteer.trainer_bridge.store import Store, StoreError


def run(args: argparse.Namespace) -> int:
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

"""The control server's OpenAPI document, for the dashboard's build: `python -m selfsteer.dashboard.openapi OUT`.

The dashboard's TypeScript types are generated from it (`openapi-typescript`, dashboard/codegen), so the page
reads the JSON the server really sends. The document is the one a live run serves at /openapi.json (every
command type of the default registry, no optimizer yet so `set_optimizer` offers all its settings) with any
route of the history server (`selfsteer dashboard`) the live one lacks: one document for both kinds of page.

It builds the real apps, over a bridge that serves nothing (`port=None`) and a throw-away store, so nothing
listens, no run is left in the user's store, and what the dashboard is typed against cannot drift from what
the routes declare. The same server gives the same bytes
(scripts/install.sh hashes them: a change of the API rebuilds the dashboard)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from selfsteer.trainer_bridge.bridge import Bridge
from selfsteer.trainer_bridge.config import BridgeConfig
from selfsteer.trainer_bridge.events import EventHub
from selfsteer.trainer_bridge.server import create_app, create_history_app


def document() -> dict:
    with tempfile.TemporaryDirectory(prefix="selfsteer-openapi-") as tmp:
        bridge = Bridge(BridgeConfig(port=None, db=Path(tmp) / "openapi.sqlite", run_name="openapi"))
        try:
            live = create_app(bridge, EventHub(), origins=[], token=None).openapi()
            history = create_history_app(bridge.store, origins=[], token=None).openapi()
        finally:
            bridge.close()
    for path, operations in history.get("paths", {}).items():
        live["paths"].setdefault(path, operations)
    schemas = live.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in history.get("components", {}).get("schemas", {}).items():
        schemas.setdefault(name, schema)
    return live


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or (args[0].startswith("-") and args[0] != "-"):
        print("usage: python -m selfsteer.dashboard.openapi OUT.json  (- for stdout)", file=sys.stderr)
        return 2
    text = json.dumps(document(), indent=1) + "\n"
    if args[0] == "-":
        sys.stdout.write(text)
    else:
        out = Path(args[0])
        # Written only when it changed: its mtime then says when the server's API last did.
        if not out.is_file() or out.read_text(encoding="utf-8") != text:
            out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

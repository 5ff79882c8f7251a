#!/usr/bin/env bash
# The main job: install (first time only), check the installation, then a training run started at a
# too-high learning rate and supervised by the intervener (the embedded LLM with the shipped adapter,
# trained on counterfactual decision data). Ends with the decision log and runs/demo/plot.png (losses and
# learning rate, decisions marked). Extra arguments go to `selfsteer train` (e.g. --supervisor rule, or
# --supervisor llm for the untrained model, or --supervisor llm --llm openai:MODEL --base-url URL).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/selfsteer doctor
.venv/bin/selfsteer train --recipe small --set training.learning_rate=0.02 --set training.max_steps=200 \
  --supervisor intervener --port 0 --out runs/demo --db runs/demo.sqlite "$@"

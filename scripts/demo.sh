#!/usr/bin/env bash
# The main job on the built-in default: set up (scripts/setup.sh), prepare SmolLM2-135M-Instruct, then train FoLoRA
# and plain LoRA on the word-order task (50 steps at 8e-4, where both learn it), measure both against the base model
# (target accuracy, questions kept, KL on held-out text) and print the table and the plot paths (~15 min on 2 cores,
# measured from a fresh clone).
#   bash scripts/demo.sh            # the demo (output: runs/demo; a finished demo is reused, not redone)
#   bash scripts/demo.sh --quick    # the same pipeline in ~2 minutes, a few steps (what CI checks)
# Further arguments go to `folora-ds grid`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [[ "${1:-}" == "--quick" ]]; then
    shift
    folora-ds grid quick --output runs/demo-quick "$@"
else
    folora-ds grid demo --output runs/demo "$@"
fi

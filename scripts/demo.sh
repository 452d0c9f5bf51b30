#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on the built-in default: single-process FoLoRA vs plain AdamW
# on a tiny Llama built from a config and the shipped number-words task. Extra arguments go to `folora-ds train`.
# The demo replaces its own earlier output (runs/folora-default) with --overwrite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
folora-ds train --config ds_configs/single_process.json --overwrite "$@"

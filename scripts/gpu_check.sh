#!/usr/bin/env bash
# One prepared check on a GPU machine (benchmarks/gpu_check.py): the training run under the deepspeed launcher in
# bf16/ZeRO-2 with its gating counters, the optimizer step at 7B LoRA shapes, one 7B block's step, and the
# eigensolves (full and top-k) up to d = 28672, and what a statistics flop costs in model flops. Writes OUTPUT/result.json and OUTPUT/result.md.
#   bash scripts/gpu_check.sh [--output gpu_check]        # on the GPU machine, after scripts/setup.sh
#   bash scripts/gpu_check.sh --cpu --output /tmp/gc      # the CPU smoke mode CI runs
set -euo pipefail
cd "$(dirname "$0")/.."
source "${FOLORA_VENV:-.venv}/bin/activate"
exec python benchmarks/gpu_check.py "$@"

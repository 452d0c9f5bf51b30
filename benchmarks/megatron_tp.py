"""Training step under Megatron tensor parallelism: FoLoRA ÷ plain AdamW, same TP x DP, same model, same run.

Runs ``launch/megatron_tp.py`` under torchrun, alternating ``--method plain`` and ``--method folora`` ``--repeats``
times each (each run: the median step time after the first step), and prints the ratio of the medians. The extra
communication FoLoRA adds per step is ``folora-ds plan --tp``'s figure for the same model and settings (the plan's
TP figures are checked against a measured run in tests/distributed/test_megatron_plan.py): token rows sent to
owners per collecting micro-batch and the gate's r x k coordinates all-reduced over TP.

    python benchmarks/megatron_tp.py --tp 2 --world 2 --hidden 256 --layers 2 --steps 30 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from folora_ds.method.config import FoLoRAConfig
from folora_ds.training.models import build_byte_tokenizer, build_tiny_llama
from folora_ds.training.plan import PlanSettings, plan_from_files

REPO = Path(__file__).resolve().parents[1]


def run_example(method: str, args: argparse.Namespace, output: Path) -> dict:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    command = [torchrun, "--nproc_per_node", str(args.world), "--master_port", str(args.port),
               str(REPO / "launch" / "megatron_tp.py"), "--tp", str(args.tp), "--method", method, "--stage",
               str(args.stage), "--steps", str(args.steps), "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--heads", str(args.heads), "--micro-batch", str(args.micro_batch), "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"{method} run failed:\n{result.stderr[-3000:]}")
    return json.loads((output / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--port", type=int, default=29651)
    args = parser.parse_args()
    seconds = {"plain": [], "folora": []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for method in ("plain", "folora"):
                summary = run_example(method, args, Path(scratch) / f"{method}{repeat}")
                seconds[method].append(summary["seconds_per_step"])
                if method == "folora":
                    assert summary["gated_steps"] == args.steps, summary
        tokenizer = build_byte_tokenizer()
        config = Path(scratch) / "config.json"
        build_tiny_llama(len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 5 // 2,
                         num_layers=args.layers, num_heads=args.heads,
                         num_kv_heads=args.heads // 2).config.to_json_file(config)
        folora = FoLoRAConfig(lora_rank=8, lora_alpha=16, k=32)  # the example's settings
        plan = plan_from_files(config, PlanSettings(world_size=args.world, tensor_parallel=args.tp,
                                                    zero_stage=args.stage, model_dtype="float32",
                                                    micro_batch=args.micro_batch, seq_len=64,
                                                    solve_seconds_per_gflop=1.0), folora)
    plain, folora_seconds = statistics.median(seconds["plain"]), statistics.median(seconds["folora"])
    print(f"TP {args.tp} x DP {args.world // args.tp}, ZeRO-{args.stage}, hidden {args.hidden}, {args.layers} layers, "
          f"micro-batch {args.micro_batch}, {args.steps} steps x {args.repeats}")
    print(f"  plain AdamW  {plain * 1e3:8.1f} ms/step   (runs {[round(s * 1e3, 1) for s in seconds['plain']]})")
    runs = [round(value * 1e3, 1) for value in seconds["folora"]]
    print(f"  FoLoRA       {folora_seconds * 1e3:8.1f} ms/step   (runs {runs})")
    print(f"  ratio FoLoRA / plain: {folora_seconds / plain:.2f}")
    print(f"  plan --tp {args.tp}: token rows to owners per collecting micro-batch "
          f"{plan.bytes_per_collecting_micro_batch / 1e3:.1f} kB (at most: 64 sampled tokens; fewer carry labels "
          f"here), gate all-reduce over TP "
          f"{plan.tensor_parallel_gate_bytes_per_step / 1e3:.2f} kB per step")


if __name__ == "__main__":
    main()

"""One prepared check for a GPU machine (one GPU, a few minutes), and its CPU smoke mode for CI.

Five steps, each a subprocess with its own time limit (a step that fails or runs out is recorded, the rest run):

1. ``train``: ``deepspeed --num_gpus 1 launch/train.py --deepspeed ds_configs/zero2_bf16.json`` on SmolLM2 (bf16,
   ZeRO-2, NCCL), FoLoRA and plain LoRA, 20 steps; checks that every optimizer step was gated on every rank and
   records both runs' seconds.
2. ``optimizer``: ``benchmarks/optimizer_step.py`` at 7B LoRA shapes (d 4096, r 16, 224 modules, bf16), k = 64,
   256, 1024: GatedAdamW's step ÷ AdamW's.
3. ``block``: ``benchmarks/training_step.py`` on one Llama-2-7B block (ZeRO-2, bf16, 1 x 256 tokens): FoLoRA's
   training step ÷ plain AdamW's.
4. ``eigensolve``: ``benchmarks/eigensolve.py``, the full solve against the top-k solver (k = 64) at d = 4096, 8192,
   14336, 28672 in float32 and float64, with the accuracy columns.
5. ``statistics``: ``benchmarks/statistics_update.py``: the running C_task's float32 fold of 32-512 rows into a
   (d, d) sum at d = 8192 and 28672, with and without TF32, against a bf16 model GEMM: what one statistics flop
   costs in model flops (the statistics budget counts flops).

It writes ``OUTPUT/result.json`` (every step's rows, times, errors) and ``OUTPUT/result.md`` (tables ready for
docs/benchmarks.md) and exits non-zero when a step failed. ``--cpu`` runs the same steps at small sizes on the CPU
(tiny model, gloo), which ``tests/e2e/test_gpu_check.py`` does in CI so the check cannot rot.

    bash scripts/gpu_check.sh --output gpu_check          # on the GPU machine
    python benchmarks/gpu_check.py --cpu --output /tmp/gc  # the smoke mode
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL_PROXY = ["--set", "proxy.num_sequences=8", "--set", "proxy.seq_len=24", "--set", "proxy.batch_size=4",
               "--set", "max_seq_len=64", "--set", "lora_rank=4"]


def _steps(cpu: bool, output: Path) -> dict[str, tuple[list[str], int]]:
    """Each step's command and time limit (seconds)."""
    python = sys.executable
    launcher = shutil.which("deepspeed", path=str(Path(python).parent)) or "deepspeed"
    if cpu:
        train = [launcher, "--num_gpus", "1", "--master_port", "29641", str(REPO / "launch" / "train.py"),
                 "--deepspeed", str(REPO / "ds_configs" / "zero2_bf16.json"), "--model", "tiny-llama", "--steps", "3",
                 "--batch-size", "4", "--calibration-steps", "1", *SMALL_PROXY]
        optimizer = ["--d", "256", "--r", "4", "--modules", "4", "--k", "8", "16", "--steps", "3", "--warmup", "1"]
        block = ["--world", "1", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
                 "--vocab", "128", "--rank", "4", "--k", "8", "--batch", "2", "--seq", "16", "--steps", "2",
                 "--warmup", "1"]
        eigensolve = ["--dims", "256", "384", "--dtypes", "float64", "--k", "8"]
        statistics = ["--dims", "256", "--rows", "8", "32", "--tokens", "16", "--model-shape", "64", "256"]
        limits = (300, 120, 300, 300, 60)
    else:
        train = [launcher, "--num_gpus", "1", str(REPO / "launch" / "train.py"), "--deepspeed",
                 str(REPO / "ds_configs" / "zero2_bf16.json"), "--model", "smollm2-135m-instruct", "--steps", "20"]
        optimizer = ["--device", "cuda", "--dtype", "bfloat16", "--d", "4096", "--r", "16", "--modules", "224",
                     "--k", "64", "256", "1024"]
        block = ["--hidden", "4096", "--intermediate", "11008", "--heads", "32", "--kv-heads", "32", "--layers", "1",
                 "--batch", "1", "--seq", "256", "--steps", "4", "--precision", "bf16"]
        eigensolve = ["--device", "cuda", "--dims", "4096", "8192", "14336", "28672", "--dtypes", "float32",
                      "float64", "--k", "64"]
        statistics = ["--device", "cuda", "--threads", "0", "--repeats", "5"]
        limits = (180, 60, 120, 240, 60)
    block_launch = ([python] if cpu else [shutil.which("torchrun", path=str(Path(python).parent)) or "torchrun",
                                          "--nproc_per_node", "1"])
    return {
        "train": ([*train, "--output-dir", str(output / "train"), "--overwrite", "--no-progress"], limits[0]),
        "optimizer": ([python, str(REPO / "benchmarks" / "optimizer_step.py"), *optimizer, "--json",
                       str(output / "optimizer.json")], limits[1]),
        "block": ([*block_launch, str(REPO / "benchmarks" / "training_step.py"), "--stage", "2", "--no-pass", *block,
                   "--json", str(output / "block.json")], limits[2]),
        "eigensolve": ([python, str(REPO / "benchmarks" / "eigensolve.py"), "--solvers", "full", "top_k",
                        "--repeats", "1", *eigensolve, "--json", str(output / "eigensolve.json")], limits[3]),
        "statistics": ([python, str(REPO / "benchmarks" / "statistics_update.py"), *statistics, "--json",
                        str(output / "statistics.json")], limits[4]),
    }


def _train_rows(output: Path) -> dict:
    summary = json.loads((output / "train" / "summary.json").read_text())
    gated = summary["folora"]["gated_steps_per_rank"]
    if {count for rank in gated for count in rank} != {summary["optimizer_steps"]}:
        raise RuntimeError(f"gated steps {gated} differ from optimizer steps {summary['optimizer_steps']}")
    return {"optimizer_steps": summary["optimizer_steps"], "gated_steps_per_rank": gated,
            "bf16": summary["bf16"], "zero_stage": summary["zero_stage"], "seconds": summary["seconds"],
            "relative_forgetting": {run: summary[run]["relative_forgetting"] for run in ("folora", "adamw")}}


def run_check(cpu: bool, output: Path) -> dict:
    """Run every step; returns (and writes) the result."""
    output.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"} if cpu else {})}
    result: dict = {"mode": "cpu smoke" if cpu else "gpu", "machine": platform.node(), "python": sys.version.split()[0],
                    "steps": {}}
    try:
        import torch

        result["torch"] = torch.__version__
        result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:  # reported, not fatal: every step names what it misses
        result["device"] = "unknown"
    for name, (command, limit) in _steps(cpu, output).items():
        started = time.perf_counter()
        entry: dict = {"command": " ".join(command)}
        try:
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
            entry["seconds"] = time.perf_counter() - started
            if done.returncode != 0:
                entry["error"] = f"exit code {done.returncode}: {done.stderr.strip()[-1500:]}"
            else:
                entry["rows"] = (_train_rows(output) if name == "train"
                                 else json.loads((output / f"{name}.json").read_text()))
        except subprocess.TimeoutExpired:
            entry["error"] = f"ran past its {limit} s limit"
            partial = output / f"{name}.json"
            if name == "eigensolve" and partial.is_file():  # the sizes it finished (written after each)
                entry["rows"] = json.loads(partial.read_text())
        except (RuntimeError, OSError, ValueError, KeyError) as error:
            entry["error"] = f"{type(error).__name__}: {error}"
        result["steps"][name] = entry
        print(f"[gpu_check] {name}: {'FAILED ' + entry['error'][:300] if 'error' in entry else 'ok'} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    (output / "result.json").write_text(json.dumps(result, indent=1))
    (output / "result.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    """The result as tables for docs/benchmarks.md."""
    steps = result["steps"]
    lines = [f"GPU check ({result['mode']}) on {result['device']}, torch {result.get('torch', '?')}:", ""]
    for name, entry in steps.items():
        if "error" in entry:
            lines += [f"- **{name}**: failed ({entry['error'][:200]})", ""]
    if "rows" in steps.get("train", {}):
        rows = steps["train"]["rows"]
        lines += [f"- **train** (deepspeed launcher, ZeRO-{rows['zero_stage']}, bf16 {rows['bf16']}): "
                  f"{rows['optimizer_steps']} optimizer steps, gated on every rank {rows['gated_steps_per_rank']}, "
                  f"{rows['seconds']:.0f} s for both runs", ""]
    if "rows" in steps.get("optimizer", {}):
        lines += ["| k | AdamW ms | GatedAdamW ms | ratio |", "|---|---|---|---|"]
        lines += [f"| {r['k']} | {r['adamw_ms']:.2f} | {r['gated_ms']:.2f} | {r['ratio']:.2f} |"
                  for r in steps["optimizer"]["rows"]]
        lines.append("")
    if "rows" in steps.get("block", {}):
        r = steps["block"]["rows"]
        lines += [f"- **block** (hidden {r['hidden']}, {r['batch']} x {r['seq']} tokens, ZeRO-{r['stage']}, "
                  f"{r['precision']}): AdamW {r['adamw_ms']:.1f} ms, FoLoRA {r['folora_ms']:.1f} ms, ratio "
                  f"{r['ratio']:.3f}", ""]
    if "rows" in steps.get("eigensolve", {}):
        lines += ["| d | dtype | full s | top-k s | top-k warm s | speed-up | min cosine | gate error | update error "
                  "| τ error |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['dim']} | {r['dtype']} | {r['full_seconds']:.2f} | {r['top_k_seconds']:.2f} | "
                  f"{r['top_k_warm_seconds']:.2f} | {r['speedup']:.1f} | {r['min_cosine']:.8f} | {r['gate_error']:.1e} "
                  f"| {r['update_error']:.1e} | {r['tau_error']:.1e} |" for r in steps["eigensolve"]["rows"]]
        lines.append("")
    if "rows" in steps.get("statistics", {}):
        rows = steps["statistics"]["rows"]
        model = ", ".join(f"{name} {rate:.0f}" for name, rate in rows["model"].items())
        lines += [f"Model GEMM GFLOP/s: {model}.", "", "| d | rows folded | TF32 | statistics GFLOP/s | one statistics "
                  "flop in model flops |", "|---|---|---|---|---|"]
        lines += [f"| {r['dim']} | {r['rows']} | {r['tf32']} | {r['gflops']:.0f} | "
                  + ", ".join(f"{ratio:.2f} ({name})" for name, ratio in r["cost_per_flop_vs_model"].items()) + " |"
                  for r in rows["statistics"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the smoke mode: small sizes on the CPU")
    parser.add_argument("--output", default="gpu_check", help="folder for result.json and result.md")
    args = parser.parse_args()
    result = run_check(args.cpu, Path(args.output))
    print((Path(args.output) / "result.md").read_text())
    return 1 if any("error" in entry for entry in result["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())

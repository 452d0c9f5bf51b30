"""`launch/train.py --deepspeed ...` end to end under the real launchers, 2 CPU ranks each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from folora_ds.training.models import load_model

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SMALL = ["--steps", "6", "--calibration-steps", "1", "--no-progress", "--set", "refresh_interval=3",
         "--set", "proxy.num_sequences=8", "--set", "proxy.seq_len=24", "--set", "lora_rank=4"]
NO_BASELINE = [*SMALL, "--no-baseline"]


def _run(command: list[str], output_dir: Path) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command + ["--output-dir", str(output_dir)], capture_output=True, text=True,
                            timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    assert "gated steps per rank [[6], [6]]" in result.stdout, result.stdout[-2000:]
    return json.loads((output_dir / "summary.json").read_text())


@pytest.mark.slow
def test_deepspeed_launcher_zero2(tmp_path):
    launcher = shutil.which("deepspeed", path=str(BIN)) or shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is installed with the package"
    summary = _run([launcher, "--num_gpus", "2", "--master_port", "29631", str(REPO / "launch" / "train.py"),
                    "--deepspeed", str(REPO / "ds_configs" / "zero2.json"), *SMALL], tmp_path / "ds")
    # refresh_interval 3 of 6 steps: the refresh at 3 gates steps 4-6; the one at 6 would gate nothing (skipped)
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2 and summary["folora"]["refreshes"] == 1
    baseline = summary["adamw"]  # the comparison run at 2 ranks: same batches, plain AdamW, measured penalty
    assert baseline is not None and set(baseline["penalty_by_module"]) == set(summary["folora"]["penalty_by_module"])
    assert sum(summary["folora"]["penalty_by_module"].values()) < sum(baseline["penalty_by_module"].values())
    base, tokenizer = load_model("tiny-llama")
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "ds" / "folora_adapter"))
    ids = tokenizer("Write 7 in words.", return_tensors="pt")
    fresh, _ = load_model("tiny-llama")
    with torch.no_grad():
        assert not torch.allclose(adapted(**ids).logits, fresh(**ids).logits)


@pytest.mark.slow
def test_torchrun_zero1_bf16(tmp_path):
    torchrun = shutil.which("torchrun", path=str(BIN)) or shutil.which("torchrun")
    summary = _run([torchrun, "--nproc_per_node", "2", "--master_port", "29632", str(REPO / "launch" / "train.py"),
                    "--deepspeed", str(REPO / "ds_configs" / "zero1_bf16.json"), *NO_BASELINE], tmp_path / "tr")
    assert summary["zero_stage"] == 1 and summary["optimizer_steps"] == 6


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI is not installed (scripts/setup.sh installs it)")
def test_mpirun_with_mpi4py_discovery(tmp_path):
    summary = _run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "OMP_NUM_THREADS=1",
                    sys.executable, str(REPO / "launch" / "train.py"), "--deepspeed",
                    str(REPO / "ds_configs" / "zero2.json"), *NO_BASELINE], tmp_path / "mpi")
    assert summary["world_size"] == 2


@pytest.mark.slow
def test_torchrun_zero3_bf16(tmp_path):
    torchrun = shutil.which("torchrun", path=str(BIN)) or shutil.which("torchrun")
    summary = _run([torchrun, "--nproc_per_node", "2", "--master_port", "29633", str(REPO / "launch" / "train.py"),
                    "--deepspeed", str(REPO / "ds_configs" / "zero3_bf16.json"), "--collective-timeout", "120",
                    *NO_BASELINE], tmp_path / "z3")
    assert summary["zero_stage"] == 3 and summary["optimizer_steps"] == 6
    assert (tmp_path / "z3" / "folora_adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_srun_native_ranks_from_simulated_slurm_variables(tmp_path):
    """What `srun --ntasks 2 python launch/train.py ...` gives each task: SLURM's variables and no torch ones
    (the real srun run on a local SLURM is scripts/slurm_local.sh, recorded in docs/launching.md)."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith(
                 "SLURM_")}
    command = [sys.executable, str(REPO / "launch" / "train.py"), "--deepspeed",
               str(REPO / "ds_configs" / "zero2.json"), *NO_BASELINE, "--output-dir", str(tmp_path / "srun")]
    tasks = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
        **clean, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_JOB_NODELIST": "localhost",
        "MASTER_PORT": "29634"}) for rank in range(2)]
    outputs = [task.communicate(timeout=600) for task in tasks]
    for task, (out, err) in zip(tasks, outputs):
        assert task.returncode == 0, (out[-3000:], err[-5000:])
    assert "gated steps per rank [[6], [6]]" in outputs[0][0]
    summary = json.loads((tmp_path / "srun" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2

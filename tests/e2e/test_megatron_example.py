"""``launch/megatron_tp.py`` under torchrun at TP = 2 x DP = 2 (4 gloo ranks), as the README runs it: FoLoRA's
gated steps counted on every rank, the loss going down, and the exported adapter (TP shards joined) loading on
the unsharded Hugging Face model with the tensor-parallel model's logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the optional megatron extra)")

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_the_megatron_example_trains_at_tp2_dp2_and_exports_a_loadable_adapter(tmp_path):
    torchrun = shutil.which("torchrun", path=str(BIN)) or shutil.which("torchrun")
    command = [torchrun, "--nproc_per_node", "4", "--master_port", "29641", str(REPO / "launch" / "megatron_tp.py"),
               "--tp", "2", "--steps", "12", "--output", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO,
                            env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["tp"], summary["dp"], summary["stage"], summary["method"]) == (2, 2, 1, "folora")
    assert summary["gated_steps"] == 12 and summary["refreshes"] == 1
    assert summary["last_loss"] < summary["first_loss"] - 0.3
    assert summary["adapter_check"] < 1e-5  # the unsharded model with the exported adapter: the same logits
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and "model.layers.1.mlp.down_proj" in config["target_modules"]

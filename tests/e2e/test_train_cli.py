"""The single-process run end to end: `folora-ds train` and `python launch/train.py`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from folora_ds.cli import load_folora_config, main
from folora_ds.models import load_model

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--set", "proxy.num_sequences=8", "--set", "proxy.seq_len=24", "--set", "proxy.batch_size=4",
         "--set", "max_seq_len=64", "--set", "refresh_interval=4", "--set", "lora_rank=4"]


def test_train_runs_end_to_end_and_reports_gating(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--steps", "10", "--batch-size", "4", "--calibration-batches", "2", "--lr", "3e-3",
                 "--output-dir", str(out), "--no-progress", *SMALL])
    assert code == 0
    printed = capsys.readouterr().out
    assert "penalty ratio FoLoRA / AdamW" in printed and "gated steps per LoRA-A = [10]" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["folora"]["gated_steps"].values()) == {10}
    assert summary["folora"]["refreshes"] == 2
    assert len(summary["layers"]) == 8  # 2 blocks × (attention-in, o-in, mlp-in, down-in)
    for layer in summary["layers"]:
        assert 0 < layer["effective_rank"] <= layer["dim"]
    for run in ("folora", "adamw"):
        assert summary[run]["eval_loss"] < summary["base_eval_loss"]  # both learned something
        assert all(value > 0 for value in summary[run]["penalty_by_module"].values())
    assert (out / "proxy.jsonl").is_file()


def test_exported_adapter_reproduces_the_trained_model(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--steps", "4", "--batch-size", "4", "--calibration-batches", "1", "--no-baseline",
                 "--output-dir", str(out), "--no-progress", *SMALL]) == 0
    base, tokenizer = load_model("tiny-llama")
    adapted = PeftModel.from_pretrained(base, str(out / "folora_adapter")).eval()
    ids = tokenizer("Write 12 in words.", return_tensors="pt")
    with torch.no_grad():
        plain_base, _ = load_model("tiny-llama")
        assert not torch.allclose(adapted(**ids).logits, plain_base(**ids).logits)  # the adapter does something
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adamw"] is None


def test_config_errors_stop_before_any_work(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path / "x"), "--set", "tua=2"]) == 2
    assert "did you mean 'tau'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["train", "--config", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--steps", "0", "--output-dir", str(tmp_path / "y")]) == 2
    assert "steps" in capsys.readouterr().err
    assert main(["train-ds", "--deepspeed", "ds_configs/zero2.json", "--collective-timeout", "0"]) == 2
    assert "--collective-timeout" in capsys.readouterr().err
    assert main(["train-ds", "--deepspeed", "ds_configs/zero2.json", "--set", "forgetting_budget=-1"]) == 2
    assert "forgetting_budget" in capsys.readouterr().err


def test_shipped_config_loads_and_overrides_apply():
    config = load_folora_config(str(REPO / "ds_configs" / "single_process.json"), ["tau=2.5", "proxy.seed=7"])
    assert config.tau == 2.5 and config.proxy.seed == 7 and config.refresh_interval == 20


@pytest.mark.slow
def test_launch_script_runs_as_a_subprocess(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--steps", "3", "--batch-size", "4",
         "--calibration-batches", "1", "--no-baseline", "--no-progress", "--output-dir", str(tmp_path / "run"),
         *SMALL],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gated steps per LoRA-A = [3]" in result.stdout

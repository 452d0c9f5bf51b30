"""The training command end to end in one process (`folora-ds train`, `python launch/train.py`), and every bad
input a new user meets on it: named in one line with exit code 2, config errors before any model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from folora_ds.cli import load_folora_config, main
from folora_ds.training.models import build_byte_tokenizer, build_tiny_llama, load_model

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--set", "proxy.num_sequences=8", "--set", "proxy.seq_len=24", "--set", "proxy.batch_size=4",
         "--set", "max_seq_len=64", "--set", "refresh_interval=4", "--set", "lora_rank=4", "--no-progress"]


def _summary(directory: Path) -> dict:
    return json.loads((directory / "summary.json").read_text())


def _one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("folora-ds: error: "), lines[-5:]
    return lines[0]


def test_train_runs_end_to_end_and_reports_gating(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--steps", "10", "--batch-size", "4", "--calibration-steps", "2", "--lr", "3e-3",
                 "--output-dir", str(out), *SMALL])
    assert code == 0
    printed = capsys.readouterr().out
    assert "relative forgetting ratio FoLoRA / AdamW" in printed and "gated steps per rank [[10]]" in printed
    summary = _summary(out)
    counts = summary["folora"]["gated_steps_per_rank"]
    assert len(counts) == 1 and len(counts[0]) == 14 and set(counts[0]) == {10}  # every LoRA-A, every step
    assert summary["folora"]["refreshes"] == 2
    assert summary["micro_batch"] == 4 and summary["optimizer"]["lr"] == 3e-3
    assert len(summary["layers"]) == 8  # 2 blocks × (attention-in, o-in, mlp-in, down-in)
    for layer in summary["layers"]:
        assert 0 < layer["effective_rank"] <= layer["dim"]
    for run in ("folora", "adamw"):
        assert summary[run]["eval_loss"] < summary["base_eval_loss"]  # both learned something
        assert all(value > 0 for value in summary[run]["penalty_by_module"].values())
    assert (out / "proxy.jsonl").is_file()
    assert not list(out.glob(".partial-*")), "no scratch file may remain"


def test_exported_adapter_reproduces_the_trained_model(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--steps", "4", "--batch-size", "4", "--calibration-steps", "1", "--no-baseline",
                 "--output-dir", str(out), *SMALL]) == 0
    base, tokenizer = load_model("tiny-llama")
    adapted = PeftModel.from_pretrained(base, str(out / "folora_adapter")).eval()
    ids = tokenizer("Write 12 in words.", return_tensors="pt")
    with torch.no_grad():
        plain_base, _ = load_model("tiny-llama")
        assert not torch.allclose(adapted(**ids).logits, plain_base(**ids).logits)  # the adapter does something
    assert _summary(out)["adamw"] is None


def test_every_setting_of_the_config_file_is_honoured(tmp_path):
    """The micro-batch and the AdamW block of --config reach the run (they were once dropped silently)."""
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.01}}, "folora": {}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--steps", "2", "--calibration-steps", "1", "--no-baseline",
                 "--output-dir", str(out), *SMALL]) == 0
    summary = _summary(out)  # read back from the engine and the optimizer, not from the config
    assert (summary["micro_batch"], summary["gradient_accumulation_steps"]) == (2, 2)
    assert summary["gradient_clipping"] == 0.5
    assert summary["optimizer"]["lr"] == 1e-5 and summary["optimizer"]["weight_decay"] == 0.01
    assert summary["optimizer"]["schedule"] is None


def test_the_summary_records_a_schedules_peak_rate_and_the_schedule(tmp_path):
    """Under WarmupLR the optimizer's rate at the start is the warm-up's floor (0 here); the summary once said lr 0."""
    schedule = {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-3, "warmup_num_steps": 2}
    config = {"train_micro_batch_size_per_gpu": 2, "scheduler": {"type": "WarmupLR", "params": schedule},
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}}, "folora": {}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    assert main(["train", "--config", str(path), "--steps", "2", "--calibration-steps", "1", "--no-baseline",
                 "--output-dir", str(tmp_path / "run"), *SMALL]) == 0
    optimizer = _summary(tmp_path / "run")["optimizer"]
    assert optimizer["lr"] == 3e-3 and optimizer["schedule"] == {"type": "WarmupLR", **schedule}


def test_a_flag_that_disagrees_with_the_config_file_is_an_error(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {
        "lr": 1e-5}}, "folora": {}}))
    assert main(["train", "--config", str(path), "--lr", "1e-3", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--lr 0.001 disagrees with optimizer.params.lr=1e-05" in _one_line_error(capsys)
    assert main(["train", "--config", str(path), "--batch-size", "8", "--output-dir", str(tmp_path / "x")]) == 2
    assert "train_micro_batch_size_per_gpu=2" in _one_line_error(capsys)
    assert not (tmp_path / "x").exists()


BAD_CONFIGS = [
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1},
     "train_batch_size=16 contradicts"),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 0}, "gradient_accumulation_steps=0"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 5}}, "zero_optimization.stage=5"),
    ({"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True}}, "fp16"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
     "offload_param"),
    ({"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Lamb"}}, "Lamb"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2, "round_robin_gradients": True}},
     "round_robin_gradients"),
    ({"gradient_accumulation_steps": 2}, "train_micro_batch_size_per_gpu"),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_acumulation_steps": 2},
     "did you mean 'gradient_accumulation_steps'"),
    ({"train_micro_batch_size_per_gpu": 2, "scheduler": {"type": "WarmupLr"}}, "scheduler.type='WarmupLr'"),
    ({"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": "fast"}}},
     "optimizer.params.lr='fast' is invalid"),
    ({"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"betas": [0.9]}}},
     "optimizer.params.betas=[0.9] is invalid"),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_clipping": "abc"}, "gradient_clipping='abc' is invalid"),
]


@pytest.mark.parametrize(("config", "message"), BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_config_errors_are_named_before_any_model_is_loaded(tmp_path, capsys, config, message):
    """The model path does not exist: an error about the config proves it came first."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**config, "folora": {}}))
    assert main(["train", "--config", str(path), "--model", str(tmp_path / "no-model"),
                 "--output-dir", str(tmp_path / "x")]) == 2
    line = _one_line_error(capsys)
    assert message in line and "no-model" not in line
    assert not (tmp_path / "x").exists()


def test_a_negative_learning_rate_flag_is_named_before_any_model_is_loaded(tmp_path, capsys):
    assert main(["train", "--lr", "-1", "--model", str(tmp_path / "no-model"),
                 "--output-dir", str(tmp_path / "x")]) == 2
    assert "optimizer.params.lr=-1.0 is invalid" in _one_line_error(capsys)


def test_target_modules_that_match_nothing_stop_before_the_proxy_is_sampled(tmp_path, capsys, monkeypatch):
    import folora_ds.training.run

    def never(*args, **kwargs):
        raise AssertionError("the proxy set was sampled before target_modules were checked")

    monkeypatch.setattr(folora_ds.training.run, "proxy_samples_for_this_rank", never)
    assert main(["train", "--set", "target_modules=[\"q_proj\",\"qkv_proj\"]", "--output-dir", str(tmp_path / "x"),
                 *SMALL]) == 2
    line = _one_line_error(capsys)
    assert "target_modules ['qkv_proj'] match no module of 'tiny-llama'" in line and "q_proj" in line


def test_config_errors_stop_before_any_work(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path / "x"), "--set", "tua=2"]) == 2
    assert "did you mean 'tau'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["train", "--config", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--steps", "0", "--output-dir", str(tmp_path / "y")]) == 2
    assert "steps" in capsys.readouterr().err
    assert main(["train", "--deepspeed", "ds_configs/zero2.json", "--collective-timeout", "0"]) == 2
    assert "--collective-timeout" in capsys.readouterr().err
    assert main(["train", "--deepspeed", "ds_configs/zero2.json", "--set", "forgetting_budget=-1"]) == 2
    assert "forgetting_budget" in capsys.readouterr().err


def _saved_tiny_model(directory: Path, *, weights: bool = True, poison: bool = False) -> Path:
    tokenizer = build_byte_tokenizer()
    model = build_tiny_llama(len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    if poison:
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    if not weights:
        for path in directory.glob("*.safetensors"):
            path.unlink()
    return directory


@pytest.mark.parametrize(("case", "message"), [
    ("config_only", "has config.json but no weights"),
    ("inf_weights", "'model.layers.0.mlp.up_proj.weight' has NaN or Inf"),
    ("malformed_jsonl", "line 3: not valid JSON"),
    ("missing_data", "does not exist"),
])
def test_model_and_data_errors_are_one_named_line(tmp_path, capsys, case, message):
    model, data = "tiny-llama", str(REPO / "folora_ds" / "data_files" / "number_words.jsonl")
    if case == "config_only":
        model = str(tmp_path / "model")
        (tmp_path / "model").mkdir()
        (_saved_tiny_model(tmp_path / "full") / "config.json").rename(tmp_path / "model" / "config.json")
    elif case == "inf_weights":
        model = str(_saved_tiny_model(tmp_path / "model", poison=True))
    elif case == "malformed_jsonl":
        data = str(tmp_path / "task.jsonl")
        Path(data).write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n{"prompt": "e\n')
    else:
        data = str(tmp_path / "nothing.jsonl")
    capsys.readouterr()  # saving the model printed progress
    assert main(["train", "--model", model, "--data", data, "--steps", "2", "--output-dir",
                 str(tmp_path / "out"), *SMALL]) == 2
    assert message in _one_line_error(capsys)


def test_a_non_empty_output_directory_is_refused_unless_overwritten(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    arguments = ["train", "--steps", "2", "--calibration-steps", "1", "--no-baseline", "--output-dir", str(out), *SMALL]
    assert main(arguments) == 0
    assert main(arguments) == 2
    assert "is not empty" in _one_line_error(capsys) and (out / "summary.json").is_file()
    (out / "stray.txt").write_text("from another run")

    import folora_ds.training.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    monkeypatch.setattr(folora_ds.training.run, "train_steps", interrupted)  # a run killed mid-training
    with pytest.raises(KeyboardInterrupt):
        main([*arguments, "--overwrite"])
    # the interrupted run's partial files are gone and the earlier run is back, whole
    after = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    assert after == before and (out / "folora_adapter").is_dir()
    assert [path.name for path in tmp_path.iterdir()] == ["run"], "nothing may be left aside"


def test_overwrite_with_bad_data_keeps_the_previous_run(tmp_path, capsys):
    """The new run's data is checked after the model loads; until it has finished, the old run stays."""
    out = tmp_path / "run"
    arguments = ["train", "--steps", "2", "--calibration-steps", "1", "--no-baseline", "--output-dir", str(out), *SMALL]
    assert main(arguments) == 0
    before = sorted(path.name for path in out.iterdir())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"\n')
    assert main([*arguments, "--data", str(bad), "--overwrite"]) == 2
    assert "not valid JSON" in _one_line_error(capsys)
    assert sorted(path.name for path in out.iterdir()) == before and (out / "summary.json").is_file()


def test_an_output_directory_that_cannot_be_written_is_one_named_line(tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    out = tmp_path / "file" / "run"
    assert main(["train", "--steps", "2", "--output-dir", str(out), *SMALL]) == 2
    assert f"cannot write or read {str(out)!r}" in _one_line_error(capsys)


def test_overwrite_never_deletes_the_runs_own_inputs(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    data = out / "task.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n')
    assert main(["train", "--data", str(data), "--overwrite", "--output-dir", str(out), *SMALL]) == 2
    assert "holds the run's input" in _one_line_error(capsys) and data.is_file()


def test_sample_proxy_refuses_a_config_without_a_folora_block(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text('{"train_micro_batch_size_per_gpu": 2}')
    assert main(["sample-proxy", "--config", str(path), "--output", str(tmp_path / "p.jsonl")]) == 2
    assert 'has no "folora" block' in _one_line_error(capsys)


def test_errors_under_a_launcher_name_the_rank(monkeypatch):
    from folora_ds.cli import _rank_label

    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert _rank_label() == "[rank 3] "
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _rank_label() == ""


def test_shipped_config_loads_and_overrides_apply():
    config = load_folora_config(str(REPO / "ds_configs" / "single_process.json"), ["tau=2.5", "proxy.seed=7"])
    assert config.tau == 2.5 and config.proxy.seed == 7 and config.refresh_interval == 20


@pytest.mark.slow
def test_launch_script_runs_as_a_subprocess(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--steps", "3", "--batch-size", "4",
         "--calibration-steps", "1", "--no-baseline", "--output-dir", str(tmp_path / "run"), *SMALL],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gated steps per rank [[3]]" in result.stdout


def test_deepspeed_monitor_gets_folora_metrics_and_the_run_plots_its_gates(tmp_path):
    """A csv_monitor in the DeepSpeed config receives FoLoRA's values at calibration, every refresh and every
    steps_per_print steps (TensorBoard / W&B take the same events)."""
    import csv

    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 2,
              "zero_optimization": {"stage": 0}, "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
              "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "run"},
              "folora": {}}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "ds.json"), "--steps", "8", "--calibration-steps", "1",
                 "--no-baseline", "--output-dir", str(out), *SMALL]) == 0
    logs = tmp_path / "csv" / "run"

    def rows(name):
        with open(logs / f"{name}.csv") as handle:
            return [(int(step), float(value)) for step, value in list(csv.reader(handle))[1:]]

    forgetting = rows("folora_relative_forgetting")
    # DeepSpeed's x-axis is samples (4 per optimizer step here): calibration, then refresh_interval=4 steps
    assert [step for step, _ in forgetting] == [0, 16, 32]
    assert forgetting[0][1] == 0.0 and forgetting[-1][1] > 0  # B = 0 at calibration, then the adapter moves
    assert [step for step, _ in rows("folora_gated_steps")] == [0, 8, 16, 24, 32]  # + every steps_per_print
    assert all(samples == 4 * value for samples, value in rows("folora_gated_steps"))
    assert all(0 < value <= 1 for _, value in rows("folora_effective_rank_fraction"))
    per_input = sorted(p.name for p in logs.glob("folora_effective_rank_layers*.csv"))
    assert len(per_input) == 8 and "folora_effective_rank_layers.1.mlp.down_proj.csv" in per_input  # every input
    assert [step for step, _ in rows("folora_tau_layers.0.self_attn.q_proj")] == [0, 16, 32]
    assert rows("folora_statistics_tokens")[1][1] > 0  # the window folded at the first refresh counted tokens
    assert (out / "gates.png").read_bytes()[:4] == b"\x89PNG"

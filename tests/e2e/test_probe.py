"""``folora-ds grid SPEC --noise-floor`` and ``--probe-kl`` on the tiny Llama: random adapters reach each KL target,
their retention is scored like a run's, the base model is left untouched, bad targets are refused before any model
loads; every finished run's KL on the probe's answers is measured beside its KL on passages."""

from __future__ import annotations

import json

import pytest
import torch

from folora_ds.cli import main
from folora_ds.toolkit.grid import load_spec, noise_floor, run_grid
from folora_ds.toolkit.grid.artifacts import SharedArtifacts

SETTINGS = {"model": "tiny-llama", "batch_size": 4, "calibration_steps": 2, "target_modules": ["q_proj", "down_proj"],
            "proxy": {"num_sequences": 8, "seq_len": 12, "batch_size": 4},
            "evaluation": {"test_records": 3, "question_records": 6, "heldout_passages": 2, "max_length": 32,
                           "max_new_tokens": 3}}
SPEC = {"settings": SETTINGS, "runs": [{"label": "plain LoRA", "method": "lora", "lrs": [1e-3], "seeds": [0],
                                        "steps": [2]}]}


def _base_logits(spec, output) -> torch.Tensor:
    shared = SharedArtifacts(spec.settings, output / "shared", progress=False)
    model, tokenizer = shared.base()
    encoded = tokenizer(["the base model must come back untouched"], return_tensors="pt")
    with torch.no_grad():
        return model(**encoded).logits


def test_random_adapters_reach_each_kl_and_leave_the_base_untouched(tmp_path):
    spec = load_spec(SPEC)
    before = _base_logits(spec, tmp_path)
    text = noise_floor(spec, tmp_path, kls=(0.001, 0.01, 1.0), seeds=(0, 1), progress=False)
    rows = json.loads((tmp_path / "noise_floor.json").read_text())
    assert sorted((row["seed"], row["target_kl"]) for row in rows) == [(s, k) for s in (0, 1)
                                                                      for k in (0.001, 0.01, 1.0)]
    for row in rows:
        assert 0.0 <= row["retention"] <= 1.0 and 0 <= row["kept"] <= row["base_correct"]
        if row["target_kl"] < 1.0:
            assert row["reached"] and row["kl_per_token"] == pytest.approx(row["target_kl"], rel=0.2)
        else:  # this tiny model's random adapters saturate near KL 0.025: said, not hidden
            assert not row["reached"] and row["kl_per_token"] < 0.5
    by_seed = {row["seed"]: row for row in rows if row["target_kl"] == 0.01}
    assert by_seed[0]["scale"] != by_seed[1]["scale"]  # two different random draws
    assert "| 0.001 |" in text and "| 0.01 |" in text and "(not reached)" in text
    assert (tmp_path / "noise_floor.md").read_text() == text
    torch.testing.assert_close(_base_logits(spec, tmp_path), before, rtol=0, atol=0)


def test_the_cli_writes_the_floor_and_refuses_bad_targets(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(SPEC))
    with pytest.raises(ValueError, match="KL targets must be positive"):
        noise_floor(load_spec(SPEC), tmp_path, kls=(0.01, -1.0))
    assert not (tmp_path / "shared").exists()  # refused before anything was computed
    assert main(["grid", str(path), "--output", str(tmp_path), "--noise-floor", "--no-progress"]) == 0
    assert (tmp_path / "noise_floor.md").read_text().startswith("# The retention probe's noise floor")


def test_probe_kl_measures_every_finished_run_at_its_last_step(tmp_path, capsys):
    spec = load_spec({**SPEC, "runs": [{"label": "plain LoRA", "method": "lora", "lrs": [2e-3], "seeds": [0],
                                        "steps": [2, 3]}]})
    path = tmp_path / "words.json"  # not spec.json: the grid writes its own there
    path.write_text(json.dumps({**SPEC, "runs": [{"label": "plain LoRA", "method": "lora", "lrs": [2e-3],
                                                  "seeds": [0], "steps": [2, 3]}]}))
    assert main(["grid", str(path), "--output", str(tmp_path), "--probe-kl", "--no-progress"]) == 2
    assert "no finished run" in capsys.readouterr().err
    run_grid(spec, tmp_path, progress=False)
    assert main(["grid", str(path), "--output", str(tmp_path), "--probe-kl", "--no-progress"]) == 0
    rows = json.loads((tmp_path / "probe_kl.json").read_text())
    assert [(row["label"], row["steps"]) for row in rows] == [("plain LoRA", 3)]
    assert rows[0]["answer_kl"] > 0 and rows[0]["answer_tokens"] > 0 and rows[0]["kl_per_token"] > 0
    assert "| plain LoRA | 0.002 | 0 | 3 |" in (tmp_path / "probe_kl.md").read_text()

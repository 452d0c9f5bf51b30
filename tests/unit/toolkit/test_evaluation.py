"""``folora_ds.toolkit.evaluation``: the `folora-ds evaluate` command measures each adapter against its base, names bad
input, and runs in the dtype asked for."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from folora_ds.method.peft_layers import lora_b_weight, lora_layers
from folora_ds.toolkit import evaluation
from folora_ds.training.models import load_model


def _saved_adapter(directory, moved: bool) -> str:
    base, _ = load_model("tiny-llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    if moved:
        with torch.no_grad():
            for layer in lora_layers(model).values():
                lora_b_weight(layer).normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(str(directory))
    return str(directory)


def test_evaluate_command_measures_each_adapter_against_the_base(tmp_path, capsys):
    import json

    from folora_ds.cli import main

    still = _saved_adapter(tmp_path / "still", moved=False)
    moved = _saved_adapter(tmp_path / "moved", moved=True)
    assert main(["evaluate", "--model", "tiny-llama", "--adapter", f"still={still}", "--adapter", f"moved={moved}",
                 "--test-records", "3", "--heldout", "4", "--output", str(tmp_path / "eval.json"),
                 "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "| moved |" in table and "| base |" in table
    results = json.loads((tmp_path / "eval.json").read_text())
    assert set(results) == {"base", "still", "moved"}
    assert results["still"]["kl_per_token"] == pytest.approx(0.0, abs=1e-12)  # B = 0: the base model itself
    assert results["still"]["target_accuracy"] == results["base"]["target_accuracy"]
    assert results["still"]["questions_correct"] == results["base"]["questions_correct"]
    assert results["moved"]["kl_per_token"] > 1e-4
    assert results["moved"]["base_perplexity"] == pytest.approx(results["still"]["base_perplexity"], rel=1e-9)


@pytest.mark.parametrize(("arguments", "message"), [
    (["--adapter", "nonsense"], "NAME=DIR"),
    (["--adapter", "a=/no/such/adapter"], "no adapter_config.json"),
    (["--adapter", "base=/x"], "is used twice"),
    (["--test-data", "/no/such.jsonl"], "does not exist"),
    (["--heldout", "0"], "heldout_passages=0"),
])
def test_evaluate_command_names_bad_input(arguments, message, capsys):
    from folora_ds.cli import main

    assert main(["evaluate", "--model", "tiny-llama", "--no-progress", *arguments]) == 2
    assert message in capsys.readouterr().err


def test_evaluate_command_runs_in_the_dtype_asked_for(tmp_path, monkeypatch, capsys):
    from folora_ds.cli import main
    seen = []
    real_measure = evaluation.measure_base

    def spy(model, *args, **kwargs):
        seen.append((next(model.parameters()).dtype, next(model.parameters()).device.type))
        return real_measure(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "measure_base", spy)
    still = _saved_adapter(tmp_path / "still", moved=False)
    assert main(["evaluate", "--model", "tiny-llama", "--adapter", f"still={still}", "--test-records", "2",
                 "--heldout", "2", "--dtype", "bfloat16", "--device", "cpu", "--no-progress"]) == 0
    assert seen == [(torch.bfloat16, "cpu")]
    assert "| still |" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated", "other_model"])
def test_every_adapter_is_opened_before_the_base_is_measured(tmp_path, monkeypatch, damage):
    """A truncated adapter was found only after minutes of measuring the base model."""
    def never(*args, **kwargs):
        raise AssertionError("the base model was measured before every adapter was opened")

    monkeypatch.setattr(evaluation, "measure_base", never)
    good = _saved_adapter(tmp_path / "good", moved=True)
    bad = tmp_path / "bad"
    if damage == "truncated":
        _saved_adapter(bad, moved=True)
        weights = bad / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        message = r"adapter 'bad' weights '.*adapter_model\.safetensors' is truncated"
    else:  # an adapter of a wider model: the shapes do not fit this one
        from folora_ds.training.models import build_byte_tokenizer, build_tiny_llama

        wide = build_tiny_llama(len(build_byte_tokenizer()), hidden_size=96, intermediate_size=160, num_layers=2)
        get_peft_model(wide, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(bad))
        message = r"adapter 'bad' \('.*bad'\) does not load on 'tiny-llama'"
    settings = evaluation.EvaluationSettings(test_records=1, question_records=1, heldout_passages=1)
    with pytest.raises(ValueError, match=message):
        evaluation.evaluate_adapters("tiny-llama", {"good": good, "bad": str(bad)}, settings)


def test_a_legacy_probe_is_scored_beside_the_retention_questions(tmp_path):
    """A grid that moves to a new retention probe keeps the old one as a second column, scored the same way."""
    still = _saved_adapter(tmp_path / "still", moved=False)
    settings = evaluation.EvaluationSettings(test_records=2, heldout_passages=2, question_records=3,
                                             legacy_questions=str(evaluation.QUESTIONS_FILE))
    results = evaluation.evaluate_adapters("tiny-llama", {"still": still}, settings)
    assert 0 <= results["base"]["legacy_questions_correct"] <= 1
    assert "legacy_correct" not in results["base"] and "correct" not in results["base"]
    assert results["still"]["legacy_questions_correct"] == results["base"]["legacy_questions_correct"]
    assert "legacy_retention" in results["still"]
    suite = evaluation.EvaluationSuite.load(settings)
    assert len(suite.questions) == 3 and len(suite.legacy_questions) == 63  # question_records cuts the first only
    with pytest.raises(ValueError, match="base_legacy_correct"):
        evaluation.measure_adapted(None, None, suite, [True])

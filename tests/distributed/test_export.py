"""The exported peft adapter, loaded with plain PeftModel.from_pretrained, reproduces the engine's logits."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from folora_ds.models import build_tiny_llama
from tests.distributed.spawn import run_ranks
from tests.distributed.test_equivalence import ADAMW, FOLORA, _batch, _micro_batch, _model, _proxy


def _train_and_export(rank: int, world: int, stage: int, directory: str):
    import folora_ds.engine

    zero = {"stage": stage}
    if stage == 3:  # small params are otherwise kept whole on every rank, and a missing gather would go unseen
        zero["stage3_param_persistence_threshold"] = 0
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": zero, "optimizer": {"type": "AdamW", "params": ADAMW},
              "folora": FOLORA}
    engine, controller = folora_ds.engine.initialize(
        _model(), config, proxy_batches=[_proxy(rank)], task_batches=[_batch(rank)])
    for step in range(3):
        batch = _micro_batch(step, rank)
        with controller.track_task(batch):
            loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        controller.after_engine_step()
    controller.export_adapter(directory)
    engine.eval()
    with torch.no_grad():
        probe = _batch(99)
        return engine(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_exported_adapter_reproduces_engine_logits(tmp_path, stage):
    logits = run_ranks(2, _train_and_export, stage, str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base = build_tiny_llama(64, hidden_size=24, intermediate_size=40, num_layers=1, num_heads=4, num_kv_heads=2,
                            seed=3)
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    probe = _batch(99)
    with torch.no_grad():
        expected = adapted(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    for rank_logits in logits:
        torch.testing.assert_close(rank_logits, expected, rtol=1e-5, atol=1e-5)
    untrained = build_tiny_llama(64, hidden_size=24, intermediate_size=40, num_layers=1, num_heads=4,
                                 num_kv_heads=2, seed=3)
    with torch.no_grad():
        assert not torch.allclose(untrained(input_ids=probe["input_ids"]).logits, expected, atol=1e-4)

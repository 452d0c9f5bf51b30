"""The exported peft adapter, loaded with plain PeftModel.from_pretrained, reproduces the engine's logits."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from tests.testing.ranks import base_model, batch, ds_config, proxy_batch, run_ranks, tiny_model, train_steps


def _train_and_export(rank: int, world: int, stage: int, directory: str):
    import folora_ds

    # ZeRO-3: small params are otherwise kept whole on every rank, and a missing gather would go unseen
    zero = {"stage3_param_persistence_threshold": 0} if stage == 3 else None
    engine, controller = folora_ds.initialize(tiny_model(), ds_config(stage, zero=zero),
                                              proxy_batches=[proxy_batch(rank)], task_batches=[batch(rank)])
    train_steps(engine, controller, rank, world, 0, 3, 1)
    controller.export_adapter(directory)
    engine.eval()
    with torch.no_grad():
        probe = batch(99)
        return engine(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_exported_adapter_reproduces_engine_logits(tmp_path, stage):
    logits = run_ranks(2, _train_and_export, stage, str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    adapted = PeftModel.from_pretrained(base_model(), str(tmp_path / "adapter")).eval()
    probe = batch(99)
    with torch.no_grad():
        expected = adapted(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    for rank_logits in logits:
        torch.testing.assert_close(rank_logits, expected, rtol=1e-5, atol=1e-5)
    untrained = base_model()
    with torch.no_grad():
        assert not torch.allclose(untrained(input_ids=probe["input_ids"]).logits, expected, atol=1e-4)

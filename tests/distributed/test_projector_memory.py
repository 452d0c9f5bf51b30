"""Projectors reach only the ranks that gate rows of their modules: under ZeRO-1/2 the ranks together hold about
one copy; under ZeRO-0 and ZeRO-3 (every rank holds a piece of every LoRA-A) every rank needs all of them."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model

from folora_ds.models import build_tiny_llama
from tests.distributed.spawn import run_ranks
from tests.distributed.test_equivalence import ADAMW, _batch, _proxy


def _held_bytes(rank: int, world: int, stage: int) -> dict:
    import folora_ds.engine

    base = build_tiny_llama(64, hidden_size=24, intermediate_size=40, num_layers=6, num_heads=4, num_kv_heads=2,
                            seed=1)
    model = get_peft_model(base, LoraConfig(r=3, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": ADAMW}, "folora": {"lora_rank": 3, "k": 6}}
    _, controller = folora_ds.engine.initialize(model, config, proxy_batches=[_proxy(rank)],
                                                task_batches=[_batch(rank)])
    full_copy = sum((2 * dim * controller.projector_rank(key) + controller.projector_rank(key)) * 4
                    for key, dim in controller.dims.items())
    return {"held": controller.projector_bytes(), "full": full_copy}


@pytest.mark.parametrize("world", [2, 3])
def test_zero2_ranks_hold_about_one_copy_of_the_projectors(world):
    results = run_ranks(world, _held_bytes, 2)
    total = sum(result["held"] for result in results)
    assert all(result["held"] > 0 for result in results)
    assert total <= 1.25 * results[0]["full"], (total, results[0]["full"])


@pytest.mark.parametrize("stage", [0, 3])
def test_zero0_and_zero3_every_rank_holds_every_projector(stage):
    results = run_ranks(2, _held_bytes, stage)
    assert all(result["held"] == result["full"] for result in results)

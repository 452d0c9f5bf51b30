"""Projectors reach only the ranks that gate rows of their modules: under ZeRO-1/2 the ranks together hold about
one copy; under ZeRO-0 and ZeRO-3 (every rank holds a piece of every LoRA-A) every rank needs all of them."""

from __future__ import annotations

import pytest

from tests.testing.ranks import batch, ds_config, proxy_batch, run_ranks, tiny_model


def _held_bytes(rank: int, world: int, stage: int) -> dict:
    import folora_ds

    model = tiny_model(3, num_layers=6, seed=1)
    config = ds_config(stage, folora={"lora_rank": 3, "k": 6})
    _, controller = folora_ds.initialize(model, config, proxy_batches=[proxy_batch(rank)],
                                         task_batches=[batch(rank)])
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

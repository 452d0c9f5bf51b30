"""Statistics across gloo ranks: reduce-to-owner equals one process; bad input fails on every rank, never hangs."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from folora_ds.config import FoLoRAConfig
from folora_ds.controller import FoLoRAController
from tests.distributed.spawn import run_ranks
from tests.distributed.test_equivalence import FOLORA, _batch, _model, _proxy


def _calibrate(rank: int, world: int, mode: str) -> dict:
    from folora_ds.engine import DistributedFoLoRAController

    model = _model()
    if mode == "mismatched" and rank == 1:
        from peft import LoraConfig, get_peft_model

        from folora_ds.models import build_tiny_llama

        base = build_tiny_llama(64, hidden_size=24, intermediate_size=40, num_layers=1, num_heads=4,
                                num_kv_heads=2, seed=3)
        model = get_peft_model(base, LoraConfig(r=3, target_modules=["q_proj"]))
    controller = DistributedFoLoRAController(model, FoLoRAConfig(**FOLORA))
    proxy = [_proxy(i) for i in range(6) if i % world == rank]
    task = [_batch(i) for i in range(6) if i % world == rank]
    if mode == "empty_rank" and rank == 1:
        proxy, task = [], []
    if mode == "nan" and rank == 1:
        controller._forward("pre", proxy, False)
        for sums in controller.collector.sums("pre").values():
            sums.sum[0, 0] = float("nan")
        proxy = []
    controller.calibrate(proxy, task)
    controller.solve()
    return {"pre": controller.pre_covariances, "task": {k: controller.task_ema[k] for k in controller.pre_covariances},
            "owners": controller.owners}


def test_reduce_to_owner_equals_single_process_over_the_union():
    reference = FoLoRAController(_model(), FoLoRAConfig(**FOLORA))
    reference.calibrate([_proxy(i) for i in range(6)], [_batch(i) for i in range(6)])
    results = run_ranks(3, _calibrate, "ok")
    owners = results[0]["owners"]
    assert all(result["owners"] == owners for result in results)
    assert sorted(set(owners.values())) == [0, 1, 2], "4 inputs over 3 ranks: every rank owns one"
    seen = set()
    for rank, result in enumerate(results):
        assert set(result["pre"]) == {key for key, owner in owners.items() if owner == rank}
        for key in result["pre"]:
            torch.testing.assert_close(result["pre"][key], reference.pre_covariance(key), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(result["task"][key], reference.task_ema[key], rtol=1e-12, atol=1e-12)
            seen.add(key)
    assert seen == set(reference.collector.keys())


@pytest.mark.parametrize(("mode", "message"), [
    ("empty_rank", "rank 1: no statistics have been collected"),
    ("mismatched", "rank 1 has different LoRA inputs"),
    ("nan", "NaN"),
])
def test_bad_input_on_one_rank_fails_every_rank_with_its_name(mode, message):
    with pytest.raises(ProcessRaisedException, match=message):
        run_ranks(2, _calibrate, mode)


def _initialize_with_tokenizer(rank: int, world: int) -> dict:
    from peft import LoraConfig, get_peft_model

    import folora_ds
    from folora_ds.engine import proxy_batches_for_this_rank
    from folora_ds.models import load_model

    base, tokenizer = load_model("tiny-llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    folora = {"lora_rank": 4, "target_modules": ["q_proj", "v_proj", "down_proj"],
              "proxy": {"num_sequences": 4, "seq_len": 8, "batch_size": 2, "seed": 5}}
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "folora": folora}
    mine = proxy_batches_for_this_rank(model, tokenizer, FoLoRAConfig(**folora), max_length=64)
    engine, controller = folora_ds.initialize(model, config, task_batches=[_batch(rank)], tokenizer=tokenizer)
    batch = _batch(10 + rank)
    with controller.track_task(batch):
        loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    controller.after_engine_step()
    controller.check_gating()
    return {"proxy_ids": [b["input_ids"] for b in mine], "keys": sorted(controller.dims)}


def test_initialize_samples_each_ranks_share_of_the_proxy_set_from_the_config():
    results = run_ranks(2, _initialize_with_tokenizer)
    assert results[0]["keys"] == results[1]["keys"] and len(results[0]["keys"]) == 4  # attn-in (q, v), down-in × 2
    first, second = (torch.cat([ids.flatten() for ids in r["proxy_ids"]]) for r in results)
    assert len(results[0]["proxy_ids"]) == 1 and not torch.equal(first, second), "ranks must sample distinct shares"


def test_initialize_without_calibration_data_names_what_is_missing():
    import folora_ds

    with pytest.raises(ValueError, match="task_batches and proxy_batches"):
        folora_ds.initialize(_model(), {"folora": {}}, task_batches=[_batch(0)])

"""Statistics across gloo ranks: token rows sent to owners equal one process; each rank holds only its inputs;
bad input fails on every rank, never hangs."""

from __future__ import annotations

import re

import pytest
import torch

from folora_ds.controller import FoLoRAController
from folora_ds.method.config import FoLoRAConfig
from tests.testing.ranks import FOLORA, batch, calibration_shards, micro_step, proxy_batch, run_ranks, tiny_model


def _calibrate_or_error(rank: int, world: int, mode: str) -> str:
    """What this rank raised (every rank must raise, none may hang in a collective)."""
    try:
        _calibrate(rank, world, mode)
    except Exception as error:  # the message each rank got is the point
        return str(error)
    return "no error"


def _calibrate(rank: int, world: int, mode: str) -> dict:
    model = tiny_model(3, ["q_proj"]) if mode == "mismatched" and rank == 1 else tiny_model()
    controller = FoLoRAController(model, FoLoRAConfig(**FOLORA))
    shards = calibration_shards(rank, world)
    proxy, task = shards["proxy_batches"], shards["task_batches"]
    if mode == "empty_rank" and rank == 1:
        proxy, task = [], []
    if mode == "nan" and rank == 1:  # this rank's proxy statistics come out NaN
        forward = controller._forward

        def poisoned(source, batches, progress):
            count = forward(source, batches, progress)
            if source == "pre":
                for sums in controller.collector.sums("pre").values():
                    sums.sum[0, 0] = float("nan")
            return count

        controller._forward = poisoned
    controller.calibrate(proxy, task)
    controller.solve()
    return {"pre": controller.pre_covariances, "task": {k: controller.task_ema[k] for k in controller.pre_covariances},
            "owners": controller.owners}


def test_rows_sent_to_owners_equal_single_process_over_the_union():
    reference = FoLoRAController(tiny_model(), FoLoRAConfig(**FOLORA))
    reference.calibrate([proxy_batch(i) for i in range(6)], [batch(i) for i in range(6)])
    results = run_ranks(3, _calibrate, "ok")
    owners = results[0]["owners"]
    assert all(result["owners"] == owners for result in results)
    assert sorted(set(owners.values())) == [0, 1, 2], "4 inputs over 3 ranks: every rank owns one"
    seen = set()
    for rank, result in enumerate(results):
        assert set(result["pre"]) == {key for key, owner in owners.items() if owner == rank}
        for key in result["pre"]:
            torch.testing.assert_close(result["pre"][key], reference.pre_covariances[key], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(result["task"][key], reference.task_ema[key], rtol=1e-12, atol=1e-12)
            seen.add(key)
    assert seen == set(reference.collector.keys())


def _calibrate_uneven_and_track(rank: int, world: int) -> dict:
    """7 calibration batches over 3 ranks (3, 2, 2: the short ranks run padding forwards), then two sampled
    training forwards; what each rank holds. The owners' gather buffer is cut to 2 rows of width 24 (1 of width
    40) per rank, so every input's rows arrive in several blocks."""
    from folora_ds.distributed import statistics

    statistics.EXCHANGE_BUFFER_BYTES = 3 * 2 * 24 * 4
    controller = FoLoRAController(tiny_model(), FoLoRAConfig(**{**FOLORA, "statistics_tokens": 4}))
    shards = calibration_shards(rank, world, count=7)
    controller.calibrate(shards["proxy_batches"], shards["task_batches"])
    after_calibration = controller.statistics_bytes()
    for step in range(2):
        with controller.track_task(batch(50 + 3 * step + rank)), torch.no_grad():
            controller.model(**batch(50 + 3 * step + rank))
    window = controller.collector.sums("task")
    return {"pre": controller.pre_covariances, "owners": controller.owners, "dims": controller.dims,
            "bytes_after_calibration": after_calibration, "window_keys": sorted(window),
            "window_tokens": {key: int(sums.tokens) for key, sums in window.items()},
            "bytes_sent": controller.collector._exchange.bytes_sent,
            "rows_per_gather": {dim: statistics.rows_per_gather(world, dim, 4) for dim in (24, 40)}}


def test_each_rank_holds_only_its_inputs_statistics_and_uneven_shards_equal_one_process():
    reference = FoLoRAController(tiny_model(), FoLoRAConfig(**FOLORA))
    reference.calibrate([proxy_batch(i) for i in range(7)], [batch(i) for i in range(7)])
    results = run_ranks(3, _calibrate_uneven_and_track)
    owners, dims = results[0]["owners"], results[0]["dims"]
    everything = sum(dim * dim for dim in dims.values()) * 8  # float64: what every rank held before
    for rank, result in enumerate(results):
        owned = [key for key, owner in owners.items() if owner == rank]
        for key in owned:
            torch.testing.assert_close(result["pre"][key], reference.pre_covariances[key], rtol=1e-12, atol=1e-12)
        # C_pre and the C_task EMA of the owned inputs, nothing else
        assert result["bytes_after_calibration"] == 2 * sum(dims[key] ** 2 for key in owned) * 8
        assert result["bytes_after_calibration"] < everything
        assert result["window_keys"] == sorted(owned)
        # two sampled forwards: 4 tokens from each of 3 ranks per input
        assert set(result["window_tokens"].values()) == {2 * 3 * 4}
        assert result["bytes_sent"] > 0
        assert result["rows_per_gather"] == {24: 2, 40: 1}


@pytest.mark.parametrize(("mode", "message"), [
    ("empty_rank", "rank 1: the proxy calibration set produced no batches"),
    ("mismatched", "rank 1 has different LoRA inputs"),
    ("nan", "NaN"),
])
def test_bad_input_on_one_rank_fails_every_rank_with_its_name(mode, message):
    for rank, raised in enumerate(run_ranks(2, _calibrate_or_error, mode)):
        assert re.search(message, raised), f"rank {rank}: {raised}"


def _initialize_with_tokenizer(rank: int, world: int) -> dict:
    from peft import LoraConfig, get_peft_model

    import folora_ds
    from folora_ds.controller.proxy import proxy_samples_for_this_rank
    from folora_ds.training.models import load_model

    base, tokenizer = load_model("tiny-llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    folora = {"lora_rank": 4, "target_modules": ["q_proj", "v_proj", "down_proj"],
              "proxy": {"num_sequences": 4, "seq_len": 8, "batch_size": 2, "seed": 5}}
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "folora": folora}
    mine = proxy_samples_for_this_rank(model, tokenizer, FoLoRAConfig(**folora))
    engine, controller = folora_ds.initialize(model, config, task_batches=[batch(rank)], tokenizer=tokenizer)
    micro_step(engine, controller, batch(10 + rank))
    controller.check_gating()
    return {"proxy_ids": [torch.tensor(sample.token_ids) for sample in mine], "keys": sorted(controller.dims)}


def test_initialize_samples_each_ranks_share_of_the_proxy_set_from_the_config():
    results = run_ranks(2, _initialize_with_tokenizer)
    assert results[0]["keys"] == results[1]["keys"] and len(results[0]["keys"]) == 4  # attn-in (q, v), down-in × 2
    first, second = (torch.cat([ids.flatten() for ids in r["proxy_ids"]]) for r in results)
    assert len(results[0]["proxy_ids"]) == 2, "4 sequences over 2 ranks"
    assert not torch.equal(first, second), "ranks must sample distinct shares"


def test_initialize_without_calibration_data_names_what_is_missing():
    import folora_ds

    with pytest.raises(ValueError, match="task_batches and proxy_batches"):
        folora_ds.initialize(tiny_model(), {"folora": {}}, task_batches=[batch(0)])


def _fitted_schedule(rank: int, world: int) -> tuple:
    controller = FoLoRAController(tiny_model(), FoLoRAConfig(**FOLORA | {"statistics_flops_share": 0.05}))
    shards = calibration_shards(rank, world, count=5)  # rank 0 three task batches, rank 1 two
    if rank == 1:  # and shorter ones: the ranks' own means differ
        for task_batch in shards["task_batches"]:
            task_batch["attention_mask"][:, 4:] = 0
            task_batch["labels"] = task_batch["labels"].masked_fill(task_batch["attention_mask"] == 0, -100)
    controller.calibrate(shards["proxy_batches"], shards["task_batches"])
    return controller.statistics_schedule, dict(controller.dims)


def test_ranks_agree_on_the_schedule_fitted_to_every_ranks_calibration_batches():
    """The collecting forwards are collective, so every rank must collect on the same micro-batches: the schedule
    comes from the mean calibration micro-batch over all ranks, not each rank's own."""
    from folora_ds.controller.calibration import linear_parameters
    from folora_ds.distributed.ownership import assign_owners
    from folora_ds.method.statistics_cost import StatisticsSchedule, StepShape, owner_imbalance, schedule_within_share

    results = run_ranks(2, _fitted_schedule)
    assert results[0] == results[1]
    counted = []
    for index in range(5):
        task_batch = batch(index)
        mask = task_batch["attention_mask"].clone()
        if index % 2 == 1:
            mask[:, 4:] = 0
        counted.append(int(mask.sum()))
    dims = results[0][1]
    shape = StepShape(tokens=20, counted_tokens=sum(counted) / 5, input_widths=tuple(dims.values()),
                      linear_parameters=linear_parameters(tiny_model()),
                      owner_imbalance=owner_imbalance(assign_owners(dims, 2), dims, 2))  # the busier owner counts
    assert results[0][0] == schedule_within_share(0.05, StatisticsSchedule(None, 1), shape)
    assert results[0][0] != StatisticsSchedule(None, 1)

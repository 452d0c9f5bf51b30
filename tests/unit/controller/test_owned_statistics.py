"""The statistics a rank owns: covariances from the collector's sums (an input without a counted token is named),
and their way out of a state part and back into a rank that owns some of the inputs."""

from __future__ import annotations

import pytest
import torch

from folora_ds.controller.owned_statistics import load_owned_statistics, owned_covariances, save_owned_statistics
from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.covariance import CovarianceEMA, CovarianceSums
from tests.testing.controller import calibrated_controller


def _spd(dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return x @ x.T / dim + torch.eye(dim, dtype=torch.float64)


def test_owned_covariances_divide_the_sums_by_the_token_count_and_name_an_input_without_tokens():
    _, controller = calibrated_controller(FoLoRAConfig())
    collector, keys = controller.collector, list(controller.dims)
    total = torch.stack([torch.full((controller.dims[key], controller.dims[key]), 6.0) for key in keys[:2]])
    for key, block in zip(keys[:2], total, strict=True):
        collector.add_sums("task", key, CovarianceSums(block.clone(), torch.tensor(3)))
    covariances = owned_covariances(collector, "task", keys[:2], in_place=False)
    assert list(covariances) == keys[:2], "only the keys asked for (the owned ones), in their order"
    for covariance in covariances.values():
        assert torch.all(covariance == 2.0)
    with pytest.raises(ValueError, match=rf"'{keys[2]}' \[task\]: zero unmasked tokens"):
        owned_covariances(collector, "task", keys[:3], in_place=False)


def test_owned_statistics_saved_by_one_rank_load_into_the_rank_that_owns_them_now():
    dims = {"attn": 4, "o": 4, "down": 6}
    pre = {key: _spd(dim, seed) for seed, (key, dim) in enumerate(dims.items())}
    ema = CovarianceEMA(0.9)
    for seed, (key, dim) in enumerate(dims.items()):
        ema.update(key, _spd(dim, 10 + seed), rows=None if key == "o" else 3 + seed)
    window = {"down": CovarianceSums(_spd(6, 20) * 5, torch.tensor(5))}  # the only input with an open window
    state = save_owned_statistics(pre, ema, window)
    assert state["pre"]["attn"] is pre["attn"], "CPU tensors are saved live, not copied (gigabytes at 70B)"
    assert state["task_window"]["down"]["tokens"] == 5

    loaded = load_owned_statistics(state, ["down", "o"], torch.device("cpu"), ema_decay=0.5)
    assert set(loaded.pre_covariances) == {"down", "o"}
    for key in ("down", "o"):
        torch.testing.assert_close(loaded.pre_covariances[key], pre[key], rtol=0, atol=0)
        torch.testing.assert_close(loaded.task_ema[key], ema[key], rtol=0, atol=0)
    assert loaded.task_ema.rows("down") == 5 and loaded.task_ema.rows("o") is None, "the rank bounds travel too"
    assert "attn" not in loaded.task_ema, "an input this rank does not own is not loaded"
    assert loaded.task_ema.decay == 0.5, "the configured decay applies from here on"
    assert set(loaded.task_window) == {"down"}
    torch.testing.assert_close(loaded.task_window["down"].sum, window["down"].sum, rtol=0, atol=0)
    assert int(loaded.task_window["down"].tokens) == 5


def test_a_state_saved_before_the_ema_rows_were_counted_loads_with_them_unknown():
    ema = CovarianceEMA(0.9)
    ema.update("attn", _spd(4, 1), rows=2)
    state = save_owned_statistics({"attn": _spd(4, 0)}, ema, {})
    del state["ema_rows"]
    loaded = load_owned_statistics(state, ["attn"], torch.device("cpu"), ema_decay=0.9)
    assert loaded.task_ema.rows("attn") is None
    torch.testing.assert_close(loaded.task_ema["attn"], ema["attn"], rtol=0, atol=0)


def test_a_state_without_an_input_this_rank_owns_is_refused_naming_the_merge():
    ema = CovarianceEMA(0.9)
    ema.update("attn", _spd(4, 1))
    state = save_owned_statistics({"attn": _spd(4, 0)}, ema, {})  # one rank's part, not the merged parts
    with pytest.raises(ValueError, match=r"lacks input 'down' \(1 missing\).*merge_state_parts"):
        load_owned_statistics(state, ["attn", "down"], torch.device("cpu"), ema_decay=0.9)

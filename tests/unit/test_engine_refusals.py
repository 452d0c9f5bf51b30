"""Unsupported DeepSpeed combinations stop at initialize with a message saying what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from folora_ds.config import FoLoRAConfig
from folora_ds.engine import _optimizer_arguments, _refuse_unsupported, load_ds_config

DS_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "ds_configs").glob("zero*.json"))


@pytest.mark.parametrize(("ds_config", "match"), [
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "offload"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}, "offload"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload"),
    ({"zero_optimization": {"stage": 1, "round_robin_gradients": True}}, "round_robin_gradients"),
    ({"zero_optimization": {"stage": 2, "zero_quantized_weights": True}}, "ZeRO\\+\\+"),
    ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}, "ZeRO\\+\\+"),
    ({"zero_optimization": {"stage": 3, "mics_shard_size": 2}}, "MiCS"),
    ({"zero_optimization": {"stage": 2, "zenflow": {"topk_ratio": 0.1}}}, "zenflow"),
    ({"fp16": {"enabled": True}}, "fp16"),
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}, "bf16"),
    ({"optimizer": {"type": "OneBitAdam", "params": {}}}, "would replace"),
    ({"optimizer": {"type": "Lamb"}}, "would replace"),
])
def test_unsupported_combinations_are_refused(ds_config, match):
    with pytest.raises((ValueError, NotImplementedError), match=match):
        _refuse_unsupported(ds_config, FoLoRAConfig())


def test_whole_row_options_are_refused_on_partitions():
    with pytest.raises(ValueError, match="whole LoRA-A rows"):
        _refuse_unsupported({"zero_optimization": {"stage": 2}}, FoLoRAConfig(variant="B"))
    with pytest.raises(ValueError, match="whole LoRA-A rows"):
        _refuse_unsupported({"zero_optimization": {"stage": 1}}, FoLoRAConfig(cap_update_norm=True))
    assert _refuse_unsupported({"zero_optimization": {"stage": 0}}, FoLoRAConfig(variant="B")) == 0


def test_adamw_block_feeds_gated_adamw_and_is_removed():
    config = {"optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}}}
    assert _refuse_unsupported(config, FoLoRAConfig()) == 0
    assert _optimizer_arguments(config) == {"lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}
    assert "optimizer" not in config


def test_unknown_optimizer_params_are_refused():
    with pytest.raises(ValueError, match="amsgrad"):
        _optimizer_arguments({"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}})


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda path: path.name)
def test_shipped_deepspeed_configs_are_accepted_with_the_stage_in_their_name(path):
    ds_config = load_ds_config(path)
    stage = _refuse_unsupported(ds_config, FoLoRAConfig.from_deepspeed_config(ds_config))
    assert path.name.startswith(f"zero{stage}")
    assert _optimizer_arguments(ds_config)["lr"] > 0


def test_every_zero_stage_has_a_shipped_config():
    names = {path.name for path in DS_CONFIGS}
    assert {"zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero3_bf16.json"} <= names


def test_initialize_is_exported_at_the_package_top_level():
    import folora_ds
    import folora_ds.engine

    assert folora_ds.initialize is folora_ds.engine.initialize
    with pytest.raises(AttributeError, match="no attribute 'initialise'"):
        folora_ds.initialise  # noqa: B018


def test_default_valued_zero_options_are_not_refused():
    zero = {"stage": 3, "zero_hpz_partition_size": 1, "mics_shard_size": -1, "zero_quantized_weights": False}
    assert _refuse_unsupported({"zero_optimization": zero}, FoLoRAConfig()) == 3


def test_a_missing_checkpoint_directory_stops_before_any_work(tmp_path):
    import folora_ds

    with pytest.raises(FileNotFoundError, match="does not exist"):
        folora_ds.initialize(None, {"folora": {}}, resume_from=tmp_path / "missing")  # no model is even touched

"""A DeepSpeed config is read once and checked before any work: unsupported combinations, batch sizes, and what
GatedAdamW gets, each with a message saying what to change."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from folora_ds.adapters.ds_config import (
    _optimizer_arguments,
    deepspeed_config_keys,
    load_ds_config,
    prepare_ds_config,
    refuse_unsupported,
    resolve_batch_sizes,
)
from folora_ds.method.config import FoLoRAConfig

DS_CONFIGS = sorted((Path(__file__).resolve().parents[3] / "ds_configs").glob("zero*.json"))


@pytest.mark.parametrize(("ds_config", "match"), [
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "offload"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}, "offload"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "needs ZeRO stage 1, 2 or 3"),
    ({"zero_force_ds_cpu_optimizer": True, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
     "zero_force_ds_cpu_optimizer"),
    ({"zero_optimization": {"stage": 2, "cpu_offload": True}}, "cpu_offload"),
    ({"zero_optimization": {"stage": 3, "cpu_offload_param": True}}, "cpu_offload_param"),
    ({"bfloat16": {"enabled": True}, "zero_optimization": {"stage": 0}}, "bf16"),
    ({"zero_optimization": {"stage": 5}}, "stage=5"),
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
        refuse_unsupported(ds_config, FoLoRAConfig())


def test_whole_row_options_are_refused_on_partitions():
    with pytest.raises(ValueError, match="whole LoRA-A rows"):
        refuse_unsupported({"zero_optimization": {"stage": 2}}, FoLoRAConfig(variant="B"))
    with pytest.raises(ValueError, match="whole LoRA-A rows"):
        refuse_unsupported({"zero_optimization": {"stage": 1}}, FoLoRAConfig(cap_update_norm=True))
    assert refuse_unsupported({"zero_optimization": {"stage": 0}}, FoLoRAConfig(variant="B")) == 0


def test_adamw_block_feeds_gated_adamw_and_is_removed():
    config = {"optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}}}
    assert refuse_unsupported(config, FoLoRAConfig()) == 0
    assert _optimizer_arguments(config.get("optimizer")) == {"lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}
    assert "optimizer" not in prepare_ds_config({**config, "folora": {}}).ds_config


def test_unknown_optimizer_params_are_refused():
    with pytest.raises(ValueError, match="amsgrad"):
        _optimizer_arguments({"type": "AdamW", "params": {"amsgrad": True}})


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda path: path.name)
def test_shipped_deepspeed_configs_are_accepted_with_the_stage_in_their_name(path):
    ds_config = load_ds_config(path)
    stage = refuse_unsupported(ds_config, FoLoRAConfig.from_deepspeed_config(ds_config))
    assert path.name.startswith(f"zero{stage}")
    assert _optimizer_arguments(ds_config.get("optimizer"))["lr"] > 0


def test_every_zero_stage_has_a_shipped_config():
    names = {path.name for path in DS_CONFIGS}
    assert {"zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero3_bf16.json"} <= names


def test_initialize_is_exported_at_the_package_top_level():
    import folora_ds
    import folora_ds.adapters.checkpoint
    import folora_ds.adapters.engine

    assert folora_ds.initialize is folora_ds.adapters.engine.initialize
    assert folora_ds.convert_to_universal_checkpoint is folora_ds.adapters.checkpoint.convert_to_universal_checkpoint
    with pytest.raises(AttributeError, match="no attribute 'initialise'"):
        folora_ds.initialise  # noqa: B018


def test_default_valued_zero_options_are_not_refused():
    zero = {"stage": 3, "zero_hpz_partition_size": 1, "mics_shard_size": -1, "zero_quantized_weights": False}
    assert refuse_unsupported({"zero_optimization": zero}, FoLoRAConfig()) == 3


def test_a_missing_checkpoint_directory_stops_before_any_work(tmp_path):
    import folora_ds

    with pytest.raises(FileNotFoundError, match="does not exist"):
        folora_ds.initialize(None, {"folora": {}}, resume_from=tmp_path / "missing")  # no model is even touched


@pytest.mark.parametrize(("keys", "world", "expected"), [
    ({"train_micro_batch_size_per_gpu": 4}, 2, (4, 1)),
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2, (4, 3)),
    ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 4}, 2, (4, 3)),
    ({"train_batch_size": 24, "gradient_accumulation_steps": 3}, 2, (4, 3)),
    ({"train_batch_size": 8}, 2, (4, 1)),
    ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2, (4, 3)),
])
def test_batch_sizes_are_resolved_as_deepspeed_does(keys, world, expected):
    assert resolve_batch_sizes(keys, world) == expected


@pytest.mark.parametrize(("keys", "world", "match"), [
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}, 2,
     "contradicts"),
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}, 2, "not divisible"),
    ({"train_batch_size": 10, "gradient_accumulation_steps": 3}, 2, "not divisible"),
    ({"gradient_accumulation_steps": 3}, 1, "train_micro_batch_size_per_gpu"),
])
def test_contradicting_batch_sizes_are_named(keys, world, match):
    with pytest.raises(ValueError, match=match):
        resolve_batch_sizes(keys, world)


@pytest.mark.parametrize(("key", "value"), [("gradient_accumulation_steps", 0), ("train_batch_size", -1),
                                            ("train_micro_batch_size_per_gpu", 1.5)])
def test_bad_batch_values_are_refused_when_the_config_is_read(key, value):
    with pytest.raises(ValueError, match=f"{key}={value}"):
        prepare_ds_config({"train_micro_batch_size_per_gpu": 2, key: value, "folora": {}})


def test_a_config_is_read_once_into_what_deepspeed_and_gated_adamw_get(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},'
                    ' "folora": {"tau": 2.0}, "train_micro_batch_size_per_gpu": 2}')
    prepared = prepare_ds_config(path)
    assert prepared.stage == 2 and prepared.folora.tau == 2.0
    assert prepared.optimizer_arguments == {"lr": 0.01, "weight_decay": 0.0}
    assert "folora" not in prepared.ds_config and "optimizer" not in prepared.ds_config
    assert prepare_ds_config(prepared) is prepared
    path.write_text('{"folora": {}, ')
    with pytest.raises(ValueError, match="not valid JSON \\(line 1"):
        prepare_ds_config(path)


def test_adam_with_l2_regularisation_is_refused():
    with pytest.raises(ValueError, match="adam_w_mode"):
        _optimizer_arguments({"type": "Adam", "params": {"adam_w_mode": False}})


def test_initialize_refuses_arguments_it_would_ignore(tmp_path):
    import folora_ds

    with pytest.raises(ValueError, match="would be ignored"):
        folora_ds.initialize(None, {"folora": {}}, resume_from=tmp_path, task_batches=[])
    with pytest.raises(ValueError, match="pass resume_from too"):
        folora_ds.initialize(None, {"folora": {}}, task_batches=[], proxy_batches=[], tag="global_step4")


@pytest.mark.parametrize(("extra", "message"), [
    ({"gradient_acumulation_steps": 2}, r"unknown key 'gradient_acumulation_steps'; did you mean "
                                        r"'gradient_accumulation_steps'\?"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}}, r"unknown key zero_optimization\.'overlap_com'; "
                                                               r"did you mean 'overlap_comm'\?"),
    ({"optimizer": {"type": "AdamW", "param": {"lr": 1e-3}}}, r"unknown key optimizer\.'param'; did you mean "
                                                              r"'params'\?"),
    ({"scheduler": {"type": "WarmupLr", "params": {}}}, r"scheduler\.type='WarmupLr' is not a DeepSpeed schedule; "
                                                        r"did you mean 'WarmupLR'\?"),
    ({"scheduler": {"type": "Cosine"}}, r"scheduler\.type='Cosine' is not a DeepSpeed schedule.*\(allowed: "
                                        r"LRRangeTest, OneCycle, WarmupLR"),
    ({"totally_unknown_block": {}}, r"unknown key 'totally_unknown_block' \(DeepSpeed would ignore it\)"),
])
def test_a_key_deepspeed_would_ignore_is_named_with_the_closest_valid_one(extra, message):
    """DeepSpeed ignores unknown top-level keys: a misspelt accumulation once trained with accumulation 1."""
    with pytest.raises(ValueError, match=message):
        prepare_ds_config({"train_micro_batch_size_per_gpu": 1, "folora": {}, **extra})


def test_keys_deepspeed_knows_but_folora_does_not_read_are_passed_on():
    config = {"train_micro_batch_size_per_gpu": 1, "folora": {}, "steps_per_print": 5, "wall_clock_breakdown": True,
              "tensorboard": {"enabled": False}, "flops_profiler": {"enabled": False},
              "activation_checkpointing": {"partition_activations": False}, "communication_data_type": "fp32",
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": True},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3}}}
    prepared = prepare_ds_config(config)
    assert prepared.ds_config["tensorboard"] == {"enabled": False} and prepared.ds_config["steps_per_print"] == 5
    assert "gradient_accumulation_steps" in deepspeed_config_keys() and "tensorboard" in deepspeed_config_keys()


@pytest.mark.parametrize(("params", "message"), [
    ({"lr": "fast"}, r"optimizer\.params\.lr='fast' is invalid"),
    ({"lr": -1e-3}, r"optimizer\.params\.lr=-0\.001 is invalid"),
    ({"betas": [0.9]}, r"optimizer\.params\.betas=\[0\.9\] is invalid; allowed: two numbers in \[0, 1\)"),
    ({"betas": [0.9, 1.0]}, r"optimizer\.params\.betas\[1\]=1\.0 is invalid"),
    ({"eps": None}, r"optimizer\.params\.eps=None is invalid"),
    ({"weight_decay": "0.1"}, r"optimizer\.params\.weight_decay='0\.1' is invalid"),
])
def test_optimizer_values_of_the_wrong_type_are_named_when_the_config_is_read(params, message):
    with pytest.raises(ValueError, match=message):
        prepare_ds_config({"train_micro_batch_size_per_gpu": 1, "folora": {},
                           "optimizer": {"type": "AdamW", "params": params}})


@pytest.mark.parametrize("value", ["abc", -1.0, True])
def test_a_gradient_clipping_that_is_not_a_number_is_named(value):
    with pytest.raises(ValueError, match=r"gradient_clipping=.* is invalid"):
        prepare_ds_config({"train_micro_batch_size_per_gpu": 1, "folora": {}, "gradient_clipping": value})


@pytest.mark.parametrize(("extra", "message"), [
    ({"zero_optimization": "abc"}, "zero_optimization='abc' must be a JSON object"),
    ({"bf16": "abc"}, "bf16='abc' must be a JSON object"),
    ({"bf16": {"enabled": "yes"}, "zero_optimization": {"stage": 1}}, "bf16.enabled='yes' must be true or false"),
    ({"steps_per_print": "x"}, "steps_per_print='x' must be an integer"),
    ({"wall_clock_breakdown": "maybe"}, "wall_clock_breakdown='maybe' must be true or false"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}},
     "zero_optimization.reduce_bucket_size='big': Input should be a valid integer"),
    ({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": -5}},
     "zero_optimization.stage3_max_live_parameters=-5: Input should be greater than or equal to 0"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": "x"}}},
     "zero_optimization.offload_optimizer.pin_memory='x'"),
    ({"tensorboard": {"enabled": True, "output_path": 5}}, "tensorboard.output_path=5: Input should be a valid string"),
    ({"flops_profiler": {"enabled": "x"}}, "DeepSpeed refuses it"),
])
def test_values_deepspeed_would_trip_on_later_are_named_when_the_config_is_read(extra, message):
    """Each of these once ended in a raw pydantic/TypeError/AttributeError inside deepspeed.initialize, after the
    proxy set was sampled (or at the first training step)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare_ds_config({"train_micro_batch_size_per_gpu": 2, **extra, "folora": {}})


def test_deepspeed_parses_the_config_without_the_real_world_size():
    """A train_batch_size valid only at the launch's world size is not refused by the early parse."""
    prepared = prepare_ds_config({"train_batch_size": 16, "gradient_accumulation_steps": 2,
                                  "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "folora": {}})
    assert prepared.ds_config["train_batch_size"] == 16

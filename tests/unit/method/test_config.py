"""folora_ds.method.config: every field is validated with an error naming it, typos get suggestions, dicts
round-trip."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

from folora_ds.method.config import FoLoRAConfig, ProxyConfig

# (field, invalid value); every dataclass field must appear at least once (see the coverage tests below).
TOP_LEVEL_BAD = [
    ("lora_rank", 0), ("lora_rank", 2.0), ("lora_rank", True),
    ("lora_alpha", 0.0), ("lora_alpha", -1), ("lora_alpha", math.inf), ("lora_alpha", "16"),
    ("lora_dropout", 1.0), ("lora_dropout", -0.1),
    ("target_modules", []), ("target_modules", ("q_proj", "")), ("target_modules", "q_proj"),
    ("target_modules", [1]),
    ("gate", "step"),
    ("temperature", 0.0), ("temperature", math.nan),
    ("tau", 0.0), ("tau", -1.0), ("tau", True),
    ("tau_mode", "relative_mean"),
    ("k", 0), ("k", 2.5),
    ("gate_tie_tolerance", -1e-6), ("gate_tie_tolerance", 1.0), ("gate_tie_tolerance", math.nan),
    ("statistics_tokens", 0), ("statistics_tokens", 1.5), ("statistics_every", 0), ("statistics_every", None),
    ("statistics_flops_share", 0.0), ("statistics_flops_share", 1.5), ("statistics_flops_share", float("nan")),
    ("statistics_flop_cost", 0.0), ("statistics_flop_cost", -1.0), ("statistics_flop_cost", float("inf")),
    ("ridge", 0.0), ("ridge", 1.5),
    ("max_ridge_escalations", -1),
    ("solve_dtype", "float16"),
    ("eigensolver", "lobpcg"),
    ("top_k_residual", 0.0), ("top_k_residual", 0.5), ("top_k_residual", float("nan")),
    ("retry_float64", 1), ("retry_float64", "true"),
    ("max_consecutive_failures", 0),
    ("refresh_interval", -1), ("refresh_interval", 1.5),
    ("ema_decay", 1.0), ("ema_decay", -0.01),
    ("variant", "C"), ("variant", "a"),
    ("cap_update_norm", 0),
    ("init", "zeros"),
    ("task_token_mask", "loss"),
    ("statistics_dtype", "bfloat16"),
    ("max_seq_len", 1),
    ("forgetting_budget", 0.0), ("forgetting_budget", -0.1), ("forgetting_budget", math.inf),
    ("forgetting_budget", "0.1"),
    ("budget_step_size", 0.0), ("budget_step_size", -0.5),
    ("budget_max_tau_scale", 0.5), ("budget_max_tau_scale", math.nan),
    ("proxy", "default"), ("proxy", 3),
]

PROXY_BAD = [
    ("num_sequences", 0), ("num_sequences", 8.0),
    ("seq_len", 0),
    ("batch_size", 0), ("batch_size", True),
    ("temperature", 0.0), ("temperature", -1.0),
    ("top_p", 0.0), ("top_p", 1.01),
    ("seed", -1), ("seed", 1.5),
    ("prompt", "eos"),
    ("greedy_prefix_tokens", -1),
    ("path", ""), ("path", 3),
    ("prompts_path", "prompts.jsonl"), ("prompts_path", ""), ("prompts_path", 3),  # without prompt="chat_prompts"
]

TOP_LEVEL_VALID = [
    ("lora_rank", 1), ("lora_alpha", 1e-9), ("lora_alpha", 16), ("lora_dropout", 0.0), ("lora_dropout", 0.999),
    ("target_modules", "all-linear"), ("target_modules", ("q_proj",)),
    ("gate", "rational"), ("gate", "sigmoid"), ("gate", "hard"),
    ("temperature", 1e-6), ("tau", 1e-12), ("tau", 1e6), ("tau_mode", "absolute"),
    ("k", 1), ("k", None), ("ridge", 1.0), ("ridge", 1e-12), ("max_ridge_escalations", 0),
    ("solve_dtype", "float32"), ("retry_float64", False), ("max_consecutive_failures", 1),
    ("refresh_interval", 0), ("ema_decay", 0.0), ("ema_decay", 0.999), ("variant", "B"),
    ("cap_update_norm", True), ("init", "kaiming"), ("init", "eigenvectors"), ("task_token_mask", "attention"),
    ("statistics_dtype", "float64"),
    ("max_seq_len", 2), ("forgetting_budget", None), ("forgetting_budget", 1e-6), ("forgetting_budget", 5.0),
    ("budget_step_size", 1e-6), ("budget_max_tau_scale", 1.0),
]

PROXY_VALID = [
    ("num_sequences", 1), ("seq_len", 1), ("batch_size", 1), ("temperature", 1e-3), ("temperature", 5.0),
    ("top_p", 1.0), ("top_p", 1e-6), ("seed", 0), ("seed", 2**40), ("prompt", "bos"), ("prompt", "random_token"),
    ("prompt", "chat_empty_user"), ("prompt", "mixed"), ("greedy_prefix_tokens", 0), ("path", "proxy.jsonl"),
    ("path", None),
]


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _names_field(field: str) -> str:
    """The error must start by naming the field and its value: "folora config: <field>=<value> is invalid"."""
    return rf"^folora config: {re.escape(field)}=.* is invalid; allowed: "


# ---------------------------------------------------------------------------------------------- invalid values
@pytest.mark.parametrize(("field", "value"), TOP_LEVEL_BAD)
def test_invalid_top_level_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=_names_field(field)):
        FoLoRAConfig(**{field: value})
    with pytest.raises(ValueError, match=_names_field(field)):
        FoLoRAConfig.from_dict({field: value})


@pytest.mark.parametrize(("field", "value"), PROXY_BAD)
def test_invalid_proxy_value_raises_naming_the_nested_field(field, value):
    with pytest.raises(ValueError, match=_names_field(f"proxy.{field}")):
        ProxyConfig(**{field: value})
    with pytest.raises(ValueError, match=_names_field(f"proxy.{field}")):
        FoLoRAConfig(proxy={field: value})
    with pytest.raises(ValueError, match=_names_field(f"proxy.{field}")):
        FoLoRAConfig.from_dict({"proxy": {field: value}})


def test_every_top_level_field_has_an_invalid_value_case():
    assert _field_names(FoLoRAConfig) == {field for field, _ in TOP_LEVEL_BAD}


def test_every_proxy_field_has_an_invalid_value_case():
    assert _field_names(ProxyConfig) == {field for field, _ in PROXY_BAD}


def test_error_message_states_value_and_allowed_range():
    with pytest.raises(ValueError, match=r"^folora config: lora_rank=0 is invalid; allowed: an integer >= 1$"):
        FoLoRAConfig(lora_rank=0)
    with pytest.raises(ValueError, match=r"lora_dropout=1\.0 is invalid; allowed: a finite number in \[0\.0, 1\.0\)"):
        FoLoRAConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match=r"gate='step' is invalid; allowed: one of 'rational', 'sigmoid', 'hard'"):
        FoLoRAConfig(gate="step")


def test_variant_b_requires_all_directions():
    with pytest.raises(ValueError, match=_names_field("k") + r".*variant=\"B\""):
        FoLoRAConfig(variant="B", k=4)
    assert FoLoRAConfig(variant="A", k=4).k == 4


def test_eigenvector_init_requires_all_directions():
    with pytest.raises(ValueError, match=_names_field("k") + r".*init=\"eigenvectors\""):
        FoLoRAConfig(init="eigenvectors", k=4)
    assert FoLoRAConfig(init="eigenvectors").k is None


def test_forgetting_budget_requires_refreshes():
    with pytest.raises(ValueError, match=_names_field("forgetting_budget") + r".*refresh_interval=0"):
        FoLoRAConfig(forgetting_budget=0.1, refresh_interval=0)
    assert FoLoRAConfig(forgetting_budget=None, refresh_interval=0).forgetting_budget is None
    assert FoLoRAConfig(forgetting_budget=0.1, refresh_interval=1).forgetting_budget == 0.1


# ---------------------------------------------------------------------------------------------- valid boundaries
@pytest.mark.parametrize(("field", "value"), TOP_LEVEL_VALID)
def test_valid_boundary_top_level_values_are_accepted(field, value):
    assert getattr(FoLoRAConfig(**{field: value}), field) == value


@pytest.mark.parametrize(("field", "value"), PROXY_VALID)
def test_valid_boundary_proxy_values_are_accepted(field, value):
    assert getattr(ProxyConfig(**{field: value}), field) == value
    assert getattr(FoLoRAConfig(proxy={field: value}).proxy, field) == value


def test_chat_prompts_and_prompts_path_come_together():
    config = ProxyConfig(prompt="chat_prompts", prompts_path="prompts.jsonl")
    assert (config.prompt, config.prompts_path) == ("chat_prompts", "prompts.jsonl")
    assert FoLoRAConfig.from_dict({"proxy": {"prompt": "chat_prompts", "prompts_path": "p.jsonl"}}).proxy == \
        ProxyConfig(prompt="chat_prompts", prompts_path="p.jsonl")
    with pytest.raises(ValueError, match=_names_field("proxy.prompts_path") + r".*proxy.prompt='chat_prompts'"):
        ProxyConfig(prompt="chat_prompts")
    with pytest.raises(ValueError, match=_names_field("proxy.prompts_path")):
        ProxyConfig(prompt="chat_prompts", prompts_path="")


def test_target_modules_list_becomes_tuple():
    config = FoLoRAConfig(target_modules=["q_proj", "v_proj"])
    assert config.target_modules == ("q_proj", "v_proj")
    hash(config)  # frozen and hashable, as a tuple makes it


def test_config_is_frozen():
    config = FoLoRAConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tau = 2.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.proxy.seed = 1  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize(("values", "suggestion"), [
    ({"lora_rnak": 4}, "lora_rank"),
    ({"tau_mod": "absolute"}, "tau_mode"),
    ({"ema_decy": 0.5}, "ema_decay"),
    ({"forgeting_budget": 0.1}, "forgetting_budget"),
    ({"proxy": {"num_sequence": 2}}, "proxy.num_sequences"),
    ({"proxy": {"topp": 0.5}}, "proxy.top_p"),
    ({"proxy": {"greedy_prefix_token": 1}}, "proxy.greedy_prefix_tokens"),
])
def test_unknown_key_suggests_closest_valid_key(values, suggestion):
    typo = next(iter(values))
    if isinstance(values[typo], dict):
        typo = f"{typo}.{next(iter(values[typo]))}"
    with pytest.raises(ValueError, match=rf"unknown key '{re.escape(typo)}'; did you mean '{re.escape(suggestion)}'\?"):
        FoLoRAConfig.from_dict(values)


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown key 'zzz'; valid keys: lora_rank, lora_alpha, .*proxy$"):
        FoLoRAConfig.from_dict({"zzz": 1})
    with pytest.raises(ValueError, match=r"unknown key 'proxy.zzz'; valid keys: num_sequences, .*path$"):
        FoLoRAConfig.from_dict({"proxy": {"zzz": 1}})


def test_unknown_nested_key_is_rejected_in_keyword_construction_too():
    with pytest.raises(ValueError, match=r"unknown key 'proxy.seeed'; did you mean 'proxy.seed'\?"):
        FoLoRAConfig(proxy={"seeed": 1})


@pytest.mark.parametrize("block", [None, [("tau", 1.0)], "tau=1"])
def test_folora_block_that_is_not_a_mapping_is_rejected(block):
    with pytest.raises(ValueError, match=r"folora config: folora must be a mapping"):
        FoLoRAConfig.from_dict(block)
    with pytest.raises(ValueError, match=r"folora config: folora must be a mapping"):
        FoLoRAConfig.from_deepspeed_config({"folora": block})


# ---------------------------------------------------------------------------------------------- DeepSpeed config
def _deepspeed_config(folora: dict | None) -> dict:
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}}
    if folora is not None:
        config["folora"] = folora
    return config


def test_from_deepspeed_config_reads_the_folora_block_from_dict_str_and_path(tmp_path):
    block = {"tau": 2.5, "k": 16, "proxy": {"num_sequences": 32, "prompt": "bos"}}
    expected = FoLoRAConfig(tau=2.5, k=16, proxy=ProxyConfig(num_sequences=32, prompt="bos"))
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_deepspeed_config(block)))
    assert FoLoRAConfig.from_deepspeed_config(_deepspeed_config(block)) == expected
    assert FoLoRAConfig.from_deepspeed_config(str(path)) == expected
    assert FoLoRAConfig.from_deepspeed_config(Path(path)) == expected


def test_empty_folora_block_means_all_defaults():
    assert FoLoRAConfig.from_deepspeed_config(_deepspeed_config({})) == FoLoRAConfig()


def test_missing_folora_block_raises_key_error(tmp_path):
    with pytest.raises(KeyError, match=r'no "folora" block'):
        FoLoRAConfig.from_deepspeed_config(_deepspeed_config(None))
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_deepspeed_config(None)))
    with pytest.raises(KeyError, match=r'no "folora" block'):
        FoLoRAConfig.from_deepspeed_config(path)


def test_missing_deepspeed_config_file_raises_file_not_found(tmp_path):
    missing = tmp_path / "nope" / "ds.json"
    with pytest.raises(FileNotFoundError, match=r"DeepSpeed config .*ds\.json' does not exist"):
        FoLoRAConfig.from_deepspeed_config(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FoLoRAConfig.from_deepspeed_config(str(tmp_path))  # a directory is not a config file


def test_invalid_value_in_deepspeed_file_names_the_field(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_deepspeed_config({"proxy": {"top_p": 2}})))
    with pytest.raises(ValueError, match=_names_field("proxy.top_p")):
        FoLoRAConfig.from_deepspeed_config(path)


# ---------------------------------------------------------------------------------------------- round trip
NON_DEFAULT = FoLoRAConfig(
    lora_rank=4, lora_alpha=8.0, lora_dropout=0.05, target_modules=("q_proj", "down_proj"), gate="sigmoid",
    temperature=0.5, tau=3.0, tau_mode="absolute", k=12, gate_tie_tolerance=1e-4, ridge=1e-4,
    max_ridge_escalations=2, solve_dtype="float32", eigensolver="top_k", top_k_residual=1e-4, statistics_tokens=16,
    statistics_every=3,
    statistics_flops_share=0.02, statistics_flop_cost=3.0,
    retry_float64=False, max_consecutive_failures=5, refresh_interval=10, ema_decay=0.5, variant="A",
    cap_update_norm=True, init="kaiming", task_token_mask="attention", statistics_dtype="float64", max_seq_len=64,
    forgetting_budget=0.02, budget_step_size=0.25, budget_max_tau_scale=50.0,
    proxy=ProxyConfig(num_sequences=16, seq_len=32, batch_size=4, temperature=0.9, top_p=0.95, seed=7,
                      prompt="chat_prompts", greedy_prefix_tokens=1, path="calib.jsonl",
                      prompts_path="prompts.jsonl"),
)


@pytest.mark.parametrize("config", [FoLoRAConfig(), NON_DEFAULT,
                                    FoLoRAConfig(target_modules="all-linear", variant="B")],
                         ids=["defaults", "non_default", "all_linear_variant_b"])
def test_to_dict_from_dict_round_trip_through_json(config):
    values = config.to_dict()
    assert set(values) == _field_names(FoLoRAConfig)
    assert set(values["proxy"]) == _field_names(ProxyConfig)
    assert FoLoRAConfig.from_dict(values) == config
    assert FoLoRAConfig.from_dict(json.loads(json.dumps(values))) == config


def test_non_default_round_trip_case_sets_every_field():
    """Guards the round-trip test: a newly added field must be given a non-default value there."""
    defaults = FoLoRAConfig()
    unchanged = {f for f in _field_names(FoLoRAConfig) if getattr(NON_DEFAULT, f) == getattr(defaults, f)}
    assert unchanged <= {"variant"}  # "B" excludes k, so variant stays "A" here and is covered by another case
    proxy_unchanged = {f for f in _field_names(ProxyConfig)
                       if getattr(NON_DEFAULT.proxy, f) == getattr(defaults.proxy, f)}
    assert not proxy_unchanged


def test_to_dict_writes_target_modules_as_list_and_keeps_all_linear_string():
    assert FoLoRAConfig(target_modules=("q_proj",)).to_dict()["target_modules"] == ["q_proj"]
    assert FoLoRAConfig(target_modules="all-linear").to_dict()["target_modules"] == "all-linear"

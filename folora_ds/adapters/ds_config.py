"""A DeepSpeed config read once and checked before any work: what FoLoRA refuses, what GatedAdamW gets.

``prepare_ds_config`` turns a JSON path or dict with a ``"folora"`` block into a ``PreparedConfig``: the validated
``FoLoRAConfig``, the ZeRO stage, the AdamW arguments for GatedAdamW, and the dict ``deepspeed.initialize`` gets
(without the ``"folora"`` and ``"optimizer"`` blocks). Every setting DeepSpeed would honour on its own is left
to it; every setting that would bypass or break the gate is refused here, by name, before a model is loaded.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic  # DeepSpeed's config classes are pydantic models

from folora_ds.common.checks import require, require_int, require_real
from folora_ds.common.files import read_json_file
from folora_ds.method.config import FoLoRAConfig

_CONSTANT = re.compile(r"""^\s*[A-Z][A-Z0-9_]*\s*=\s*["']([a-z][a-z0-9_]*)["']""", re.M)
_READ_KEY = re.compile(r"""(?:param_dict|config_dict|ds_config)(?:\.get\(|\[)\s*["']([a-z][a-z0-9_]*)["']""")
_LITERAL = re.compile(r"""["']([a-z][a-z0-9_]*)["']""")
_CONFIG_READERS = ("runtime/config.py", "monitor/config.py")  # every literal here may be a top-level key
_SCHEDULER_KEYS = ("type", "params")
_OPTIMIZER_KEYS = ("type", "params", "legacy_fusion")
_ADAMW_TYPES = ("adamw", "adam")
_ADAMW_PARAMS = ("lr", "betas", "eps", "weight_decay")
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_BLOCKS = ("zero_optimization", "optimizer", "scheduler", "bf16", "bfloat16", "fp16", "amp", "checkpoint",
           "tensorboard", "wandb", "csv_monitor", "comet", "activation_checkpointing", "flops_profiler",
           "comms_logger", "data_types", "aio", "elasticity", "autotuning")
"""Top-level keys whose value DeepSpeed reads as a JSON object (a string there fails deep inside it)."""
_SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    "steps_per_print": (int,), "wall_clock_breakdown": (bool,), "memory_breakdown": (bool,),
    "prescale_gradients": (bool,), "gradient_predivide_factor": (int, float), "sparse_gradients": (bool,),
    "dump_state": (bool,), "zero_allow_untested_optimizer": (bool,), "zero_force_ds_cpu_optimizer": (bool,)}
"""Top-level scalars DeepSpeed takes unchecked and uses minutes later (``"steps_per_print": "x"`` ends in a
TypeError at the first step)."""
_KIND_NAMES = {(int,): "an integer", (bool,): "true or false", (int, float): "a number"}


@dataclass(frozen=True)
class PreparedConfig:
    """A checked DeepSpeed config.

    Attributes:
        ds_config: what ``deepspeed.initialize`` gets (no ``"folora"``/``"optimizer"`` blocks; a private copy).
        folora: the validated ``"folora"`` block.
        stage: the ZeRO stage (0–3).
        optimizer_arguments: ``lr``/``betas``/``eps``/``weight_decay`` from the ``"optimizer"`` block (AdamW).
    """

    ds_config: dict[str, Any]
    folora: FoLoRAConfig
    stage: int
    optimizer_arguments: dict[str, Any]


def load_ds_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A private copy of a DeepSpeed config given as a JSON path or a dict.

    Raises:
        FileNotFoundError: no such file. ValueError: the file is not a JSON object (with the line and column).
    """
    if not isinstance(config, (str, Path)):
        return copy.deepcopy(dict(config))
    path = Path(config)
    loaded = read_json_file(path, what="DeepSpeed config")
    if not isinstance(loaded, dict):
        raise ValueError(f"DeepSpeed config {str(path)!r}: expected a JSON object, got {type(loaded).__name__}")
    return loaded


def prepare_ds_config(config: str | Path | Mapping[str, Any] | PreparedConfig) -> PreparedConfig:
    """Read and check a DeepSpeed config with a ``"folora"`` block (a ``PreparedConfig`` is returned as is).

    Raises:
        KeyError: no ``"folora"`` block. ValueError: an unsupported combination or a bad value, named.
    """
    if isinstance(config, PreparedConfig):
        return config
    ds_config = load_ds_config(config)
    check_known_keys(ds_config)
    check_value_types(ds_config)
    folora = FoLoRAConfig.from_deepspeed_config(ds_config)
    stage = refuse_unsupported(ds_config, folora)
    _check_batch_values(ds_config)
    check_with_deepspeed(ds_config)
    ds_config.pop("folora")
    arguments = _optimizer_arguments(ds_config.pop("optimizer", None))
    ds_config["zero_allow_untested_optimizer"] = True  # GatedAdamW under ZeRO is what tests/distributed/ checks
    ds_config.setdefault("zero_force_ds_cpu_optimizer", False)  # with optimizer offload: GatedAdamW steps on CPU
    return PreparedConfig(ds_config=ds_config, folora=folora, stage=stage, optimizer_arguments=arguments)


def resolve_batch_sizes(ds_config: Mapping[str, Any], world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, accumulation steps) from the DeepSpeed batch keys, as DeepSpeed derives them.

    Any two of ``train_batch_size``, ``train_micro_batch_size_per_gpu`` and ``gradient_accumulation_steps`` fix
    the third (``train_batch_size`` = micro × accumulation × world); all three must agree.

    Raises:
        ValueError: no batch size, or values that contradict each other at this world size (all named).
    """
    total, micro, accumulation = (ds_config.get(key) for key in _BATCH_KEYS)
    if micro is None and total is None:
        raise ValueError("DeepSpeed config: set train_micro_batch_size_per_gpu (or train_batch_size)")
    if micro is None:
        accumulation = accumulation or 1
        micro, remainder = divmod(total, accumulation * world_size)
        if remainder or micro == 0:
            raise ValueError(f"DeepSpeed config: train_batch_size={total} is not divisible by "
                             f"gradient_accumulation_steps={accumulation} × world size {world_size}")
    elif accumulation is None:
        accumulation = 1 if total is None else total // (micro * world_size)
        if total is not None and (accumulation == 0 or accumulation * micro * world_size != total):
            raise ValueError(f"DeepSpeed config: train_batch_size={total} is not divisible by "
                             f"train_micro_batch_size_per_gpu={micro} × world size {world_size}")
    if total is not None and total != micro * accumulation * world_size:
        raise ValueError(f"DeepSpeed config: train_batch_size={total} contradicts train_micro_batch_size_per_gpu="
                         f"{micro} × gradient_accumulation_steps={accumulation} × world size {world_size} = "
                         f"{micro * accumulation * world_size}; drop train_batch_size or make them agree")
    return micro, accumulation


def _check_batch_values(ds_config: Mapping[str, Any]) -> None:
    for key in _BATCH_KEYS:
        require_int(key, ds_config.get(key), optional=True, where="DeepSpeed config: ")
    if ds_config.get("gradient_clipping") is not None:
        require_real("gradient_clipping", ds_config["gradient_clipping"], low=0.0, low_open=False,
                     where="DeepSpeed config: ")


def refuse_unsupported(ds_config: Mapping[str, Any], folora: FoLoRAConfig) -> int:
    """Stop combinations FoLoRA does not handle, before any work; returns the ZeRO stage."""
    zero = ds_config.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ValueError(f"zero_optimization.stage={stage!r}: DeepSpeed's ZeRO stages are 0, 1, 2 and 3")
    device = (zero.get("offload_optimizer") or {}).get("device", "none")
    if device not in (None, "none", "cpu"):
        raise ValueError(f"zero_optimization.offload_optimizer.device={device!r}: only \"cpu\" offload is supported "
                         "(NVMe would step outside GatedAdamW's flat partitions)")
    if device == "cpu" and stage == 0:
        raise ValueError("zero_optimization.offload_optimizer needs ZeRO stage 1, 2 or 3")
    if ds_config.get("zero_force_ds_cpu_optimizer"):
        raise ValueError("zero_force_ds_cpu_optimizer=true replaces GatedAdamW with DeepSpeedCPUAdam under offload; "
                         "set it to false (folora_ds does when it is unset)")
    param_device = (zero.get("offload_param") or {}).get("device", "none")
    if param_device not in (None, "none"):
        raise ValueError(f"zero_optimization.offload_param.device={param_device!r}: parameter offload is not "
                         "supported with FoLoRA; remove the offload_param block (optimizer offload is)")
    for key in ("cpu_offload", "cpu_offload_param"):  # DeepSpeed's deprecated spellings of the same
        if zero.get(key):
            raise ValueError(f"zero_optimization.{key}=true offloads the optimizer/parameters outside GatedAdamW; "
                             "remove it")
    if zero.get("round_robin_gradients"):
        raise ValueError("zero_optimization.round_robin_gradients=true reorders ZeRO partitions; set it to false")
    for key in ("zero_quantized_weights", "zero_quantized_gradients"):
        if zero.get(key):
            raise ValueError(f"zero_optimization.{key} (ZeRO++) is not supported with FoLoRA; remove it")
    if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
        raise ValueError("zero_optimization.zero_hpz_partition_size > 1 (ZeRO++ hierarchical partitioning) is not "
                         "supported with FoLoRA; remove it")
    if int(zero.get("mics_shard_size", -1) or -1) > 0:
        raise ValueError("zero_optimization.mics_shard_size (MiCS) re-partitions ZeRO-3 in a way folora_ds does not "
                         "map; remove it")
    if zero.get("zenflow") is not None:
        raise ValueError("zero_optimization.zenflow steps parameters outside GatedAdamW's flat layout; remove it")
    if (ds_config.get("fp16") or {}).get("enabled"):
        raise ValueError("fp16 is not supported with FoLoRA: dynamic loss scaling skips optimizer steps on overflow, "
                         "which FoLoRA's step and gate accounting does not follow yet, and no fp16 run could be "
                         "tested (README, Troubleshooting); use bf16 (ZeRO 1/2/3, same range as fp32) or fp32")
    if any((ds_config.get(key) or {}).get("enabled") for key in ("bf16", "bfloat16")) and stage == 0:
        raise ValueError("bf16 at ZeRO stage 0 wraps the client optimizer; use ZeRO stage 1, 2 or 3 for bf16")
    if stage > 0 and (folora.variant != "A" or folora.cap_update_norm):
        raise ValueError("variant='B' and cap_update_norm need whole LoRA-A rows; use ZeRO stage 0 for them")
    optimizer = ds_config.get("optimizer")
    if optimizer is not None and str(optimizer.get("type", "")).lower() not in _ADAMW_TYPES:
        raise ValueError(f"DeepSpeed optimizer type {optimizer.get('type')!r} would replace FoLoRA's GatedAdamW; use "
                         '"AdamW" (its params are passed to GatedAdamW) or remove the "optimizer" block')
    return stage


def _optimizer_arguments(block: Mapping[str, Any] | None) -> dict[str, Any]:
    """GatedAdamW's keyword arguments from an ``"optimizer"`` block (AdamW); weight decay 0 when unset."""
    params = dict((block or {}).get("params", {}))
    unknown = sorted(set(params) - set(_ADAMW_PARAMS) - {"torch_adam", "adam_w_mode"})
    if unknown:
        raise ValueError(f"optimizer.params {unknown} are not supported by GatedAdamW (allowed: "
                         f"{sorted(_ADAMW_PARAMS)})")
    if params.get("adam_w_mode", True) is not True:
        raise ValueError("optimizer.params.adam_w_mode=false (Adam with L2 regularisation) is not what GatedAdamW "
                         "does (decoupled weight decay, AdamW); remove it")
    arguments = {key: params[key] for key in _ADAMW_PARAMS if key in params}
    for key in ("lr", "eps", "weight_decay"):  # named here, not minutes later inside the optimizer
        if key in arguments:
            require_real(f"optimizer.params.{key}", arguments[key], low=0.0, low_open=False)
    if "betas" in arguments:
        betas = arguments["betas"]
        valid = isinstance(betas, (list, tuple)) and len(betas) == 2
        require(valid, "optimizer.params.betas", betas, "two numbers in [0, 1)")
        for index, beta in enumerate(betas):
            require_real(f"optimizer.params.betas[{index}]", beta, low=0.0, high=1.0, low_open=False,
                         high_open=True)
        arguments["betas"] = tuple(betas)
    arguments.setdefault("weight_decay", 0.0)
    return arguments


@functools.cache
def deepspeed_config_keys() -> frozenset[str]:
    """Every name DeepSpeed's sources define as a string constant or read from its config dict (without importing
    DeepSpeed): the top-level keys DeepSpeed knows, with room to spare (a misspelling is in none of them)."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    names: set[str] = set()
    for root in spec.submodule_search_locations:
        for path in Path(root).rglob("*.py"):
            text = path.read_text(encoding="utf-8", errors="replace")
            names.update(_CONSTANT.findall(text))
            names.update(_READ_KEY.findall(text))
            if path.relative_to(root).as_posix() in _CONFIG_READERS:  # incl. the keys of removed features,
                names.update(_LITERAL.findall(text))                  # which DeepSpeed itself refuses by name
    return frozenset(names)


def _unknown(keys, known, where: str) -> None:
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"DeepSpeed config: unknown key {where}{key!r}{hint} (DeepSpeed would ignore it)")


def check_known_keys(ds_config: Mapping[str, Any]) -> None:
    """Raise ValueError, with the closest valid name, for a top-level key DeepSpeed does not know and for an unknown
    key inside the blocks folora_ds reads (``zero_optimization``, ``optimizer``, ``scheduler``, whose ``type``
    must be one of DeepSpeed's schedules); keys DeepSpeed knows are passed on untouched.

    DeepSpeed silently ignores an unknown top-level key: ``"gradient_acumulation_steps": 2`` trained with
    accumulation 1. Skipped when DeepSpeed's sources cannot be read (no known keys).
    """
    known = deepspeed_config_keys()
    if not known:
        return
    _unknown([key for key in ds_config if key != "folora"], known, "")
    zero = ds_config.get("zero_optimization")
    if isinstance(zero, Mapping):
        zero_config = importlib.import_module("deepspeed.runtime.zero.config").DeepSpeedZeroConfig
        fields = {alias for name, info in zero_config.model_fields.items() for alias in (name, info.alias) if alias}
        _unknown(list(zero), fields, "zero_optimization.")
    for block, allowed in (("optimizer", _OPTIMIZER_KEYS), ("scheduler", _SCHEDULER_KEYS)):
        if isinstance(ds_config.get(block), Mapping):
            _unknown(list(ds_config[block]), allowed, f"{block}.")
    scheduler = ds_config.get("scheduler")
    if isinstance(scheduler, Mapping):
        schedules = importlib.import_module("deepspeed.runtime.lr_schedules").VALID_LR_SCHEDULES
        if scheduler.get("type") not in schedules:
            close = difflib.get_close_matches(str(scheduler.get("type")), schedules, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"DeepSpeed config: scheduler.type={scheduler.get('type')!r} is not a DeepSpeed schedule"
                             f"{hint} (allowed: {', '.join(schedules)})")


def check_value_types(ds_config: Mapping[str, Any]) -> None:
    """Raise ValueError naming the key when a block (``_BLOCKS``) is not a JSON object, a precision block's
    ``enabled`` is not true/false, or a top-level scalar of ``_SCALAR_TYPES`` has the wrong type: DeepSpeed would
    fail on them with a bare TypeError/AttributeError, or (``"enabled": "yes"``) take them as something else."""
    for key in _BLOCKS:
        if ds_config.get(key) is not None and not isinstance(ds_config[key], Mapping):
            raise ValueError(f"DeepSpeed config: {key}={ds_config[key]!r} must be a JSON object")
    for key in ("bf16", "bfloat16", "fp16", "amp"):
        enabled = (ds_config.get(key) or {}).get("enabled")
        if enabled is not None and not isinstance(enabled, bool):
            raise ValueError(f"DeepSpeed config: {key}.enabled={enabled!r} must be true or false")
    for key, kinds in _SCALAR_TYPES.items():
        value = ds_config.get(key)
        if value is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
            raise ValueError(f"DeepSpeed config: {key}={value!r} must be {_KIND_NAMES[kinds]}")


def check_with_deepspeed(ds_config: Mapping[str, Any]) -> None:
    """Parse ``ds_config`` with DeepSpeed's own ``DeepSpeedConfig`` now, before any model is loaded, instead of
    inside ``deepspeed.initialize`` after minutes of proxy sampling; a refusal becomes a ValueError naming the key
    (``zero_optimization.reduce_bucket_size='big': Input should be a valid integer``).

    The batch keys are replaced by 1s for the parse (``resolve_batch_sizes`` checks them against the real world
    size, which DeepSpeed would read from a process group that may not exist yet)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = {key: value for key, value in ds_config.items() if key not in (*_BATCH_KEYS, "folora")}
    parsed.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    try:
        DeepSpeedConfig(parsed)
    except pydantic.ValidationError as error:
        prefix = _PYDANTIC_BLOCKS.get(error.title, "")
        problems = [f"{prefix}{'.'.join(str(part) for part in problem['loc'])}={problem.get('input')!r}: "
                    f"{problem['msg']}" for problem in error.errors()]
        raise ValueError(f"DeepSpeed config: {'; '.join(problems)}") from error
    except (TypeError, AttributeError, AssertionError, ValueError, KeyError) as error:
        raise ValueError(f"DeepSpeed config: DeepSpeed refuses it ({type(error).__name__}: {error})") from error


_PYDANTIC_BLOCKS = {"DeepSpeedZeroConfig": "zero_optimization.", "DeepSpeedBF16Config": "bf16.",
                    "DeepSpeedFP16Config": "fp16.", "DeepSpeedMonitorConfig": "", "DeepSpeedCheckpointConfig":
                    "checkpoint.", "DeepSpeedFlopsProfilerConfig": "flops_profiler.",
                    "DeepSpeedCommsConfig": "comms_logger.", "DeepSpeedActivationCheckpointingConfig":
                    "activation_checkpointing."}
"""Where the fields of DeepSpeed's pydantic config models sit in the JSON (their errors name only the field)."""

"""folora_ds: FoLoRA (Foundation-Preserving LoRA) as a DeepSpeed plugin.

Public API:
    FoLoRAConfig, ProxyConfig        every knob, validated (``folora_ds.method.config``)
    FoLoRAController                 statistics → solves → projectors → gated optimizer, one process or N ranks
                                     (``folora_ds.controller``)
    GatedAdamW, folora_param_groups  the gated optimizer (``folora_ds.method.gated_adamw``)
    initialize                       ``folora_ds.initialize(model, ds_config, ...)`` → (engine, controller),
                                     mirroring ``deepspeed.initialize`` (``folora_ds.adapters.engine``)
    convert_to_universal_checkpoint  resume on another number of ranks at ZeRO 1/2/3 (``folora_ds.adapters.checkpoint``)
    generalized_eigh, Projector      the math (``folora_ds.method.eigensolve``, ``folora_ds.method.projector``)
    CovarianceCollector              input statistics of LoRA layers (``folora_ds.method.covariance``)
    folora_ds.hf                     FoLoRATrainer, folora_trainer_class (Hugging Face Trainer / TRL)

The package is split by role (docs/architecture.md): ``method/`` (pure torch), ``distributed/`` (every
collective), ``controller/``, ``adapters/`` (DeepSpeed, Hugging Face), ``training/`` (``folora-ds train``, ``plan``)
and ``toolkit/`` (the comparison grid); ``common/`` holds the small helpers all of them share.
DeepSpeed itself is imported only when a process group or an engine is needed.
"""

from folora_ds.adapters.checkpoint import convert_to_universal_checkpoint
from folora_ds.adapters.engine import initialize
from folora_ds.controller import FoLoRAController
from folora_ds.method.config import FoLoRAConfig, ProxyConfig
from folora_ds.method.covariance import CovarianceCollector
from folora_ds.method.eigensolve import generalized_eigh
from folora_ds.method.gated_adamw import GatedAdamW, folora_param_groups
from folora_ds.method.projector import Projector

__version__ = "0.1.0"

__all__ = [
    "CovarianceCollector",
    "FoLoRAConfig",
    "FoLoRAController",
    "GatedAdamW",
    "Projector",
    "ProxyConfig",
    "convert_to_universal_checkpoint",
    "folora_param_groups",
    "generalized_eigh",
    "initialize",
]

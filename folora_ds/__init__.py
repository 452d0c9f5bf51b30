"""folora_ds: FoLoRA (Foundation-Preserving LoRA) as a DeepSpeed plugin.

Public API:
    FoLoRAConfig, ProxyConfig        every knob, validated (``folora_ds.config``)
    FoLoRAController                 statistics → solves → projectors → gated optimizer, one process or N ranks
    GatedAdamW, folora_param_groups  the gated optimizer (``folora_ds.optim``)
    initialize                       ``folora_ds.initialize(model, ds_config, ...)`` → (engine, controller),
                                     mirroring ``deepspeed.initialize`` (``folora_ds.engine``)
    convert_to_universal_checkpoint  resume on another number of ranks at ZeRO 1/2/3 (``folora_ds.checkpoint``)
    generalized_eigh, Projector      the math (``folora_ds.spectral``)
    CovarianceCollector              input statistics of LoRA layers (``folora_ds.stats``)

DeepSpeed itself is imported only when a process group or an engine is needed.
"""

from folora_ds.checkpoint import convert_to_universal_checkpoint
from folora_ds.config import FoLoRAConfig, ProxyConfig
from folora_ds.controller import FoLoRAController
from folora_ds.engine import initialize
from folora_ds.optim import GatedAdamW, folora_param_groups
from folora_ds.projector import Projector
from folora_ds.spectral import generalized_eigh
from folora_ds.stats import CovarianceCollector

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

"""folora_ds: FoLoRA (Foundation-Preserving LoRA) as a DeepSpeed plugin.

Public API (single process):
    FoLoRAConfig, ProxyConfig      every knob, validated (``folora_ds.config``)
    generalized_eigh, Projector    the math (``folora_ds.spectral``)
    CovarianceCollector            input statistics of LoRA layers (``folora_ds.stats``)
    GatedAdamW, folora_param_groups  the gated optimizer (``folora_ds.optim``)
    FoLoRAController               statistics → solves → projectors for one model (``folora_ds.controller``)

DeepSpeed:
    initialize                     ``folora_ds.initialize(model, ds_config, ...)`` → (engine, controller), mirroring
                                   ``deepspeed.initialize`` (``folora_ds.engine``; imported on first use, since
                                   importing DeepSpeed takes seconds)
"""

from folora_ds.config import FoLoRAConfig, ProxyConfig
from folora_ds.controller import FoLoRAController
from folora_ds.optim import GatedAdamW, folora_param_groups
from folora_ds.spectral import Projector, generalized_eigh
from folora_ds.stats import CovarianceCollector

__version__ = "0.1.0"



def __getattr__(name: str):
    if name == "initialize":
        from folora_ds.engine import initialize

        return initialize
    raise AttributeError(f"module 'folora_ds' has no attribute {name!r}")


__all__ = [
    "CovarianceCollector",
    "FoLoRAConfig",
    "FoLoRAController",
    "GatedAdamW",
    "Projector",
    "ProxyConfig",
    "folora_param_groups",
    "generalized_eigh",
    "initialize",
]

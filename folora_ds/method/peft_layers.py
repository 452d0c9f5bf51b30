"""Finding peft LoRA layers and their A/B weights, by type (never by class-name strings)."""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """All peft LoRA layers of ``model`` by qualified module name, in module order.

    Raises:
        ValueError: the model has no LoRA layer, or a layer has more than one active adapter.
    """
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    if not layers:
        raise ValueError("the model has no peft LoRA layers; wrap it with peft.get_peft_model first")
    for name, layer in layers.items():
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if len(active) != 1:
            raise ValueError(f"{name!r}: FoLoRA needs exactly one active LoRA adapter, found {active}")
    return layers


def active_adapter(layer: LoraLayer) -> str:
    """The single active adapter name of ``layer``."""
    return next(a for a in layer.active_adapters if a in layer.lora_A)


def lora_a_weight(layer: LoraLayer) -> nn.Parameter:
    """LoRA-A weight (r, d_in) of the active adapter."""
    return layer.lora_A[active_adapter(layer)].weight


def lora_b_weight(layer: LoraLayer) -> nn.Parameter:
    """LoRA-B weight (d_out, r) of the active adapter."""
    return layer.lora_B[active_adapter(layer)].weight


def lora_scaling(layer: LoraLayer) -> float:
    """The adapter scale s (lora_alpha / r, or alpha/sqrt(r) with rsLoRA)."""
    return float(layer.scaling[active_adapter(layer)])


def base_weight_matrix(layer: LoraLayer) -> torch.Tensor:
    """The frozen base weight W as (d_out, d_in), detached (GPT-2 ``Conv1D`` layers, adapted with peft's
    ``fan_in_fan_out=True``, store Wᵀ and are transposed back here)."""
    weight = layer.get_base_layer().weight.detach()
    return weight.mT if getattr(layer, "fan_in_fan_out", False) else weight

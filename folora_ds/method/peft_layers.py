"""Finding LoRA layers and their A/B weights, by type (never by class-name strings): peft's ``LoraLayer`` and
``TensorParallelLoRA``, the base of LoRA layers laid out for tensor parallelism (``adapters.megatron``)."""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

TP_KINDS = ("column", "row")


class TensorParallelLoRA(nn.Module):
    """A LoRA layer on a tensor-parallel base (``adapters.megatron.LoRAParallelLinear``), as FoLoRA sees it.

    ``kind`` says where the layer's input lives across the tensor-parallel (TP) group:

        "column": the input x (..., d_in) is whole and identical on every TP rank; A (r, d_in) is whole on every
                  TP rank (a copy), B (d_out / TP, r) split. Statistics count x once per TP group.
        "row":    the input is split along d_in: this rank holds columns ``local_columns`` of x, and A
                  (r, d_in / TP) holds the same columns. Statistics join the TP ranks' column blocks into whole
                  rows; the gate sums partial spectral coordinates over TP (``projector.apply_projector_shard``).

    Subclasses set: ``kind``, ``in_features`` (the whole d_in), ``local_columns`` ((start, stop) of d_in held
    here), ``lora_a``, ``lora_b``, ``scaling``, ``base`` (the frozen base layer, its weight this rank's shard) and
    ``tp_group`` (the process group of the TP ranks; the method layer only passes it on).
    """

    kind: str
    in_features: int
    local_columns: tuple[int, int]
    scaling: float
    tp_group: object

    def get_base_layer(self) -> nn.Module:
        """The frozen base layer (as peft's ``LoraLayer.get_base_layer``)."""
        return self.base


def lora_layers(model: nn.Module) -> dict[str, LoraLayer | TensorParallelLoRA]:
    """All LoRA layers of ``model`` (peft's, and ``TensorParallelLoRA``) by qualified module name, in module order.

    Raises:
        ValueError: the model has no LoRA layer, or a peft layer has more than one active adapter.
    """
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, (LoraLayer, TensorParallelLoRA))}
    if not layers:
        raise ValueError("the model has no LoRA layers; wrap it with peft.get_peft_model first (or, under Megatron "
                         "tensor parallelism, with folora_ds.adapters.megatron.LoRAParallelLinear)")
    for name, layer in layers.items():
        if isinstance(layer, TensorParallelLoRA):
            continue
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if len(active) != 1:
            raise ValueError(f"{name!r}: FoLoRA needs exactly one active LoRA adapter, found {active}")
    return layers


def active_adapter(layer: LoraLayer) -> str:
    """The single active adapter name of ``layer``."""
    return next(a for a in layer.active_adapters if a in layer.lora_A)


def tensor_parallel_kind(layer: nn.Module) -> str | None:
    """"column" or "row" for a ``TensorParallelLoRA`` (``TP_KINDS``), None for a layer with whole inputs."""
    return layer.kind if isinstance(layer, TensorParallelLoRA) else None


def split_dimension(layer: nn.Module, weight: str) -> int | None:
    """The dimension along which ``weight`` ("base", "lora_a" or "lora_b", each as (d_out, d_in) / (r, d_in) /
    (d_out, r)) is split over the TP ranks, None when it is whole on every rank (every weight of a peft layer).

        column layer: base (d_out / TP, d_in) → 0, A whole → None, B (d_out / TP, r) → 0
        row layer:    base (d_out, d_in / TP) → 1, A (r, d_in / TP) → 1, B whole → None
    """
    if weight not in ("base", "lora_a", "lora_b"):
        raise ValueError(f"weight {weight!r}; allowed: 'base', 'lora_a', 'lora_b'")
    kind = tensor_parallel_kind(layer)
    if kind is None:
        return None
    split = ("base", "lora_b") if kind == "column" else ("base", "lora_a")
    return (0 if kind == "column" else 1) if weight in split else None


def lora_a_weight(layer: nn.Module) -> nn.Parameter:
    """LoRA-A weight (r, d_in) of the active adapter ((r, d_in / TP) on a row-parallel layer)."""
    if isinstance(layer, TensorParallelLoRA):
        return layer.lora_a
    return layer.lora_A[active_adapter(layer)].weight


def lora_b_weight(layer: nn.Module) -> nn.Parameter:
    """LoRA-B weight (d_out, r) of the active adapter ((d_out / TP, r) on a column-parallel layer)."""
    if isinstance(layer, TensorParallelLoRA):
        return layer.lora_b
    return layer.lora_B[active_adapter(layer)].weight


def lora_scaling(layer: nn.Module) -> float:
    """The adapter scale s (lora_alpha / r, or alpha/sqrt(r) with rsLoRA)."""
    if isinstance(layer, TensorParallelLoRA):
        return float(layer.scaling)
    return float(layer.scaling[active_adapter(layer)])


def base_weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The frozen base weight W as (d_out, d_in), detached (GPT-2 ``Conv1D`` layers, adapted with peft's
    ``fan_in_fan_out=True``, store Wᵀ and are transposed back here; a ``TensorParallelLoRA`` gives this rank's
    shard: (d_out / TP, d_in) on a column layer, (d_out, d_in / TP) on a row layer)."""
    weight = layer.get_base_layer().weight.detach()
    return weight.mT if getattr(layer, "fan_in_fan_out", False) else weight


def adapter_delta_weight(layer: LoraLayer) -> torch.Tensor:
    """The adapter's ΔW = s·B·A of a peft LoRA layer as (d_out, d_in), detached (``fan_in_fan_out`` layers
    transposed back, as ``base_weight_matrix``)."""
    delta = layer.get_delta_weight(active_adapter(layer)).detach()
    return delta.mT if getattr(layer, "fan_in_fan_out", False) else delta

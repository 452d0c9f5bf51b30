"""Forgetting measured against C_pre, per LoRA module: the base energy tr(W C_pre Wᵀ) of its frozen weight and the
penalty tr(ΔW C_pre ΔWᵀ) of its adapter, ΔW = s·B·A (the math is ``method.budget``; this module places it).

Only the owner of a module's input holds its C_pre (d_in, d_in), so each owner evaluates the modules of its inputs
and every rank receives all values::

    rank 0 (owns attention-in):  {q_proj: e, k_proj: e, v_proj: e}  ─┐
    rank 1 (owns o-in):          {o_proj: e}                         ├─ all_gather_objects ─► all, on every rank
    rank 2 (owns down-in):       {down_proj: e}                      ─┘

ZeRO-3-partitioned weights are gathered for the evaluation on every rank (a collective, also on ranks that own
none of the module's inputs). Under tensor parallelism the owner joins the TP shards of a split weight (its
replica's TP ranks send them: ``tensor_parallel.join_on_owner``): the base weight once per calibration, A (row
layers) or B (column layers) at each evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from folora_ds.distributed import comm
from folora_ds.distributed.statistics import raise_if_any
from folora_ds.distributed.tensor_parallel import TensorParallelLayout, join_on_owner
from folora_ds.method.budget import adapter_penalty, base_energy
from folora_ds.method.peft_layers import base_weight_matrix, lora_a_weight, lora_b_weight, lora_scaling, split_dimension


class WholeWeights:
    """A LoRA module's weights whole on the owner of its input: TP shards joined there (``join_on_owner``),
    whole weights as they are; nothing on other ranks (at TP = 1 every rank gets its own, unused off the owner).

    Args:
        owners: input key → owner rank; layout: the TP x DP grid (None: no tensor parallelism).
    """

    def __init__(self, owners: Mapping[str, int], layout: TensorParallelLayout | None, group=None) -> None:
        self.owners, self.layout, self.group = owners, layout, group

    def __call__(self, layer: nn.Module, weight: str, value: torch.Tensor, key: str) -> torch.Tensor | None:
        if self.layout is None or self.layout.tp_size == 1:
            return value
        return join_on_owner(value, split_dimension(layer, weight), self.owners[key], self.layout, self.group)


def _gathered_by_name(mine: Mapping[str, float], names: list[str], group) -> dict[str, float]:
    """Collective: every rank's ``mine`` (module name → value) as one dict in the order of ``names``."""
    merged = {name: value for values in comm.all_gather_objects(dict(mine), group) for name, value in values.items()}
    return {name: merged[name] for name in names}


def base_energy_per_module(layers: Mapping[str, nn.Module], pre_covariances: Mapping[str, torch.Tensor],
                           key_of: Callable[[str], str], group=None, *,
                           whole: WholeWeights | None = None) -> dict[str, float]:
    """Collective: tr(W C_pre Wᵀ) of every LoRA module, the scale its forgetting is measured against.

    Args:
        layers: module name → peft LoRA layer (the same modules, in the same order, on every rank).
        pre_covariances: C_pre (d_in, d_in) of the input keys this rank owns.
        key_of: module name → its input key.
        whole: joins tensor-parallel shards on the owner (None: every weight is whole).

    Returns:
        Module name → base energy, in the order of ``layers``; ZeRO-3 base weights are gathered one module at a
        time (a whole base weight of every module at once would not fit at 70B).
    """
    whole = whole or WholeWeights({}, None)
    mine = {}
    for name, layer in layers.items():
        key = key_of(name)
        c_pre = pre_covariances.get(key)
        with torch.no_grad(), comm.gathered([layer.get_base_layer().weight]):
            weight = whole(layer, "base", base_weight_matrix(layer), key)
            if c_pre is not None:
                mine[name] = float(base_energy(weight, c_pre))
    return _gathered_by_name(mine, list(layers), group)


def adapter_penalty_per_module(layers: Mapping[str, nn.Module], pre_covariances: Mapping[str, torch.Tensor],
                               key_of: Callable[[str], str], group=None, *,
                               whole: WholeWeights | None = None) -> dict[str, float]:
    """Collective: tr(ΔW C_pre ΔWᵀ) of every LoRA module's adapter, ΔW = s·B·A with A (r, d_in), B (d_out, r);
    module name → penalty in the order of ``layers`` (arguments as ``base_energy_per_module``). Every LoRA weight
    is gathered at once under ZeRO-3 (adapters are small).

    Raises:
        DistributedStatisticsError: on every rank, when any rank's evaluation failed (e.g. A's width is not C_pre's).
    """
    whole = whole or WholeWeights({}, None)
    mine, error = {}, None
    weights = [w for layer in layers.values() for w in (lora_a_weight(layer), lora_b_weight(layer))]
    with torch.no_grad(), comm.gathered(weights):
        for name, layer in layers.items():
            key = key_of(name)
            c_pre = pre_covariances.get(key)
            a_weight = whole(layer, "lora_a", lora_a_weight(layer).detach(), key)
            b_weight = whole(layer, "lora_b", lora_b_weight(layer).detach(), key)
            if c_pre is None or error is not None:
                continue
            try:
                mine[name] = float(adapter_penalty(a_weight, b_weight, lora_scaling(layer), c_pre))
            except (ValueError, RuntimeError) as problem:
                error = f"forgetting penalty of {name!r}: {problem}"
    raise_if_any(error, group)
    return _gathered_by_name(mine, list(layers), group)

"""Forgetting measured against C_pre, per LoRA module: the base energy tr(W C_pre Wᵀ) of its frozen weight and the
penalty tr(ΔW C_pre ΔWᵀ) of its adapter, ΔW = s·B·A (the math is ``method.budget``; this module places it).

Only the owner of a module's input holds its C_pre (d_in, d_in), so each owner evaluates the modules of its inputs
and every rank receives all values::

    rank 0 (owns attention-in):  {q_proj: e, k_proj: e, v_proj: e}  ─┐
    rank 1 (owns o-in):          {o_proj: e}                         ├─ all_gather_objects ─► all, on every rank
    rank 2 (owns down-in):       {down_proj: e}                      ─┘

ZeRO-3-partitioned weights are gathered for the evaluation on every rank (a collective, also on ranks that own
none of the module's inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from folora_ds.distributed import comm
from folora_ds.distributed.statistics import raise_if_any
from folora_ds.method.budget import adapter_penalty, base_energy
from folora_ds.method.peft_layers import base_weight_matrix, lora_a_weight, lora_b_weight, lora_scaling


def _gathered_by_name(mine: Mapping[str, float], names: list[str], group) -> dict[str, float]:
    """Collective: every rank's ``mine`` (module name → value) as one dict in the order of ``names``."""
    merged = {name: value for values in comm.all_gather_objects(dict(mine), group) for name, value in values.items()}
    return {name: merged[name] for name in names}


def base_energy_per_module(layers: Mapping[str, nn.Module], pre_covariances: Mapping[str, torch.Tensor],
                           key_of: Callable[[str], str], group=None) -> dict[str, float]:
    """Collective: tr(W C_pre Wᵀ) of every LoRA module, the scale its forgetting is measured against.

    Args:
        layers: module name → peft LoRA layer (the same modules, in the same order, on every rank).
        pre_covariances: C_pre (d_in, d_in) of the input keys this rank owns.
        key_of: module name → its input key.

    Returns:
        Module name → base energy, in the order of ``layers``; ZeRO-3 base weights are gathered one module at a
        time (a whole base weight of every module at once would not fit at 70B).
    """
    mine = {}
    for name, layer in layers.items():
        c_pre = pre_covariances.get(key_of(name))
        with torch.no_grad(), comm.gathered([layer.get_base_layer().weight]):
            if c_pre is not None:
                mine[name] = float(base_energy(base_weight_matrix(layer), c_pre))
    return _gathered_by_name(mine, list(layers), group)


def adapter_penalty_per_module(layers: Mapping[str, nn.Module], pre_covariances: Mapping[str, torch.Tensor],
                               key_of: Callable[[str], str], group=None) -> dict[str, float]:
    """Collective: tr(ΔW C_pre ΔWᵀ) of every LoRA module's adapter, ΔW = s·B·A with A (r, d_in), B (d_out, r);
    module name → penalty in the order of ``layers`` (arguments as ``base_energy_per_module``). Every LoRA weight
    is gathered at once under ZeRO-3 (adapters are small).

    Raises:
        DistributedStatisticsError: on every rank, when any rank's evaluation failed (e.g. A's width is not C_pre's).
    """
    mine, error = {}, None
    weights = [w for layer in layers.values() for w in (lora_a_weight(layer), lora_b_weight(layer))]
    with torch.no_grad(), comm.gathered(weights):
        try:
            for name, layer in layers.items():
                c_pre = pre_covariances.get(key_of(name))
                if c_pre is not None:
                    mine[name] = float(adapter_penalty(lora_a_weight(layer), lora_b_weight(layer),
                                                       lora_scaling(layer), c_pre))
        except (ValueError, RuntimeError) as problem:
            error = f"forgetting penalty: {problem}"
    raise_if_any(error, group)
    return _gathered_by_name(mine, list(layers), group)

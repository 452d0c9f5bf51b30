"""Where the LoRA-A weights sit in the optimizer partitions of a DeepSpeed engine (deepspeed 0.19.8 internals).

The only module that reads DeepSpeed's private ZeRO attributes. Each stage has a test in
``tests/distributed/``, so a DeepSpeed upgrade that moves them fails loudly.

ZeRO 0 (fp32): the client optimizer steps the original parameters; nothing to map.
ZeRO 1/2: group i is flattened (params in group order) and cut into equal contiguous chunks, one per rank:

    group 0 flat (LoRA-A of q, v):  [ q(3×8) | v(3×8) | pad ]
                   rank 0 ────────────┤├──────── rank 1
    rank 0: single_partition_of_fp32_groups[0] = q[0:24] v[0:4]     → Fragment(q, 0, 24, 0), Fragment(v, 0, 4, 24)
    rank 1: single_partition_of_fp32_groups[0] = v[4:24] pad         → Fragment(v, 4, 20, 0)

    ``param._hp_mapping.lp_fragment_address`` = (start, numel) inside the parameter, and
    ``param._hp_mapping.get_hp_fragment_address().start`` = offset inside this rank's flat partition.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from folora_ds.distributed import comm
from folora_ds.flat import CutRow, Fragment, local_cut_rows
from folora_ds.optim import FlatPartitionLayout, GatedAdamW


def _zero12_fragments(zero_optimizer, group_index: int, names: Mapping[int, str]) -> list[Fragment]:
    fragments = []
    for param in zero_optimizer.bit16_groups[group_index]:
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            continue
        name = names.get(id(param))
        if name is None:
            raise RuntimeError("a parameter in a gated ZeRO group is not a LoRA-A weight of the model")
        rows, cols = param.shape
        fragments.append(Fragment(name=name, rows=rows, cols=cols, start=mapping.lp_fragment_address.start,
                                  numel=mapping.lp_fragment_address.numel,
                                  offset=mapping.get_hp_fragment_address().start))
    return fragments


def _global_cut_rows(fragments: list[Fragment], rank_of_name: Callable[[str], int], group) -> list[CutRow]:
    """Union over the group of each rank's partly-held rows, in one order every rank agrees on."""
    local = [(name, row, rank_of_name(name)) for name, row in local_cut_rows(fragments)]
    union = {tuple(item) for rank_rows in comm.all_gather_objects(local, group) for item in rank_rows}
    return sorted(union)


def register_zero_partitions(engine, optimizer: GatedAdamW, lora_a_names: Mapping[int, str],
                             projector_rank: Callable[[str], int]) -> list[FlatPartitionLayout]:
    """Register every gated flat partition of ``engine`` with ``optimizer``; returns the layouts (empty at ZeRO 0).

    Args:
        engine: a DeepSpeed engine whose client optimizer is ``optimizer``.
        lora_a_names: ``id(param) → name`` of every LoRA-A weight.
        projector_rank: k of the projector a LoRA-A name will carry (must be the same on every rank).

    Raises:
        NotImplementedError: ZeRO stage 3 (not supported yet).
        ValueError: ``round_robin_gradients`` is on (it reorders the flat partitions).
    """
    stage = engine.zero_optimization_stage()
    if stage == 0:
        return []
    if stage == 3:
        raise NotImplementedError("ZeRO stage 3 is not supported yet by folora_ds; use stage 0, 1 or 2")
    zero_optimizer = engine.optimizer
    if getattr(zero_optimizer, "round_robin_gradients", False):
        raise ValueError('zero_optimization.round_robin_gradients=true reorders ZeRO partitions; set it to false '
                         "for FoLoRA")
    layouts = []
    for group_index, group in enumerate(optimizer.param_groups):
        if not group["gated"]:
            continue
        flat = zero_optimizer.single_partition_of_fp32_groups[group_index]
        if not (len(group["params"]) == 1 and group["params"][0] is flat):
            raise RuntimeError(f"ZeRO param group {group_index} does not step the expected flat partition; "
                               "DeepSpeed's layout changed")
        process_group = zero_optimizer.real_dp_process_group[group_index]
        fragments = _zero12_fragments(zero_optimizer, group_index, lora_a_names)
        cut_rows = _global_cut_rows(fragments, projector_rank, process_group)
        layout = FlatPartitionLayout(
            fragments=fragments, cut_rows=cut_rows,
            sum_across_ranks=lambda tensor, g=process_group: comm.all_reduce_sum(tensor, g))
        optimizer.register_flat_partition(flat, layout)
        layouts.append(layout)
    return layouts


def lora_a_parameter(param: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 value of a LoRA-A weight on every rank (a collective in stages 1–3)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    return param.detach() if full is None else full

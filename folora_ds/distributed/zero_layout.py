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

ZeRO 3: every parameter is cut on its own into ``world`` equal pieces of ``p = ceil(numel / world)`` elements
(the last one padded); param group i is split into sub-groups, and sub-group j is one flat fp32 tensor that
concatenates this rank's piece of each of its parameters. DeepSpeed steps the sub-groups one at a time, putting
the flat tensor alone into the client's param group ``sub_group_to_group_id[j]`` for that call:

    sub-group 0 (LoRA-A of q (3×8), v (3×8)), 2 ranks, p = 12 each:
    rank 0: fp32_partitioned_groups_flat[0] = q[0:12]  v[0:12]   → Fragment(q, 0, 12, 0),  Fragment(v, 0, 12, 12)
    rank 1: fp32_partitioned_groups_flat[0] = q[12:24] v[12:24]  → Fragment(q, 12, 12, 0), Fragment(v, 12, 12, 12)
                                                 (a padded tail, when numel % world ≠ 0, is not a fragment)

    ``param.ds_shape`` is the (r, d) shape (``param.shape`` is empty between steps), ``param.partition_numel()``
    is p, and the group-rank of this process in ``_get_sub_group_process_group(j)`` says which piece it holds.
    Every row can be cut (up to world − 1 cut rows per LoRA-A), so every rank needs the projector of every
    LoRA-A it holds a piece of: under ZeRO-3 each rank holds one full copy of the projectors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from folora_ds.distributed import comm
from folora_ds.method.flat_partitions import CutRow, Fragment, local_cut_rows
from folora_ds.method.gated_adamw import FlatPartitionLayout, GatedAdamW


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


def _zero3_fragments(zero_optimizer, sub_group_index: int, names: Mapping[int, str], group_rank: int
                     ) -> list[Fragment]:
    fragments = []
    offset = 0
    for param in zero_optimizer.fp16_groups[sub_group_index]:
        name = names.get(id(param))
        if name is None:
            raise RuntimeError("a parameter in a gated ZeRO-3 sub-group is not a LoRA-A weight of the model")
        shape = tuple(getattr(param, "ds_shape", ()))
        if len(shape) != 2:
            raise RuntimeError(f"ZeRO-3 parameter {name!r} has ds_shape {shape}; expected (r, d_in) — DeepSpeed's "
                               "partitioned-parameter layout changed")
        rows, cols = shape
        piece = param.partition_numel()
        start = group_rank * piece
        numel = min(piece, rows * cols - start)
        if numel > 0:
            fragments.append(Fragment(name=name, rows=rows, cols=cols, start=start, numel=numel, offset=offset))
        offset += piece
    return fragments


def _register_zero3(zero_optimizer, optimizer: GatedAdamW, lora_a_names: Mapping[int, str],
                    projector_rank: Callable[[str], int], split: dict) -> list[FlatPartitionLayout]:
    gated_groups = {index for index, group in enumerate(optimizer.param_groups) if group["gated"]}
    layouts = []
    for sub_group_index, flat in enumerate(zero_optimizer.fp32_partitioned_groups_flat):
        if zero_optimizer.sub_group_to_group_id[sub_group_index] not in gated_groups:
            continue
        expected = zero_optimizer.fp16_partitioned_groups_flat_numel[sub_group_index]
        if flat.ndim != 1 or flat.numel() != expected:
            raise RuntimeError(f"ZeRO-3 sub-group {sub_group_index}: flat fp32 partition of shape "
                               f"{tuple(flat.shape)}, expected ({expected},); DeepSpeed's layout changed")
        process_group = zero_optimizer._get_sub_group_process_group(sub_group_index)
        fragments = _zero3_fragments(zero_optimizer, sub_group_index, lora_a_names,
                                     comm.rank(process_group))
        if fragments and fragments[-1].offset + fragments[-1].numel > flat.numel():
            raise RuntimeError(f"ZeRO-3 sub-group {sub_group_index}: LoRA-A pieces run past the flat partition")
        layouts.append(_register_layout(optimizer, flat, fragments, projector_rank, process_group, split))
    if not layouts:
        raise RuntimeError("ZeRO-3 engine has no sub-group of the gated LoRA-A param group; nothing would be gated")
    return layouts


def _register_layout(optimizer: GatedAdamW, flat: torch.Tensor, fragments: list[Fragment],
                     projector_rank: Callable[[str], int], process_group, split: dict) -> FlatPartitionLayout:
    """Collective: agree on the cut rows over ``process_group`` and register ``flat``'s layout with the optimizer."""
    layout = FlatPartitionLayout(
        fragments=fragments, cut_rows=_global_cut_rows(fragments, projector_rank, process_group),
        sum_across_ranks=lambda tensor: comm.all_reduce_sum(tensor, process_group), **split)
    optimizer.register_flat_partition(flat, layout)
    return layout


def _global_cut_rows(fragments: list[Fragment], rank_of_name: Callable[[str], int], group) -> list[CutRow]:
    """Union over the group of each rank's partly-held rows, in one order every rank agrees on."""
    local = [(name, row, rank_of_name(name)) for name, row in local_cut_rows(fragments)]
    union = {tuple(item) for rank_rows in comm.all_gather_objects(local, group) for item in rank_rows}
    return sorted(union)


def register_zero_partitions(engine, optimizer: GatedAdamW, lora_a_names: Mapping[int, str],
                             projector_rank: Callable[[str], int], *, split_names: frozenset[str] = frozenset(),
                             sum_over_shards: Callable[[torch.Tensor], torch.Tensor] | None = None
                             ) -> list[FlatPartitionLayout]:
    """Register every gated flat partition of ``engine`` with ``optimizer``; returns the layouts (empty at ZeRO 0).

    Args:
        engine: a DeepSpeed engine whose client optimizer is ``optimizer``.
        lora_a_names: ``id(param) → name`` of every LoRA-A weight.
        projector_rank: k of the projector a LoRA-A name will carry (must be the same on every rank).
        split_names, sum_over_shards: LoRA-A weights split along d_in over tensor-parallel ranks and the sum over
            their TP group (``flat_partitions.gate_flat_update``); ZeRO partitions over the data-parallel group.

    Raises:
        ValueError: ``round_robin_gradients`` is on (it reorders the flat partitions).
        RuntimeError: DeepSpeed's partition layout is not the one this module reads (an upgrade changed it).
    """
    stage = engine.zero_optimization_stage()
    if stage == 0:
        return []
    split = {"split_names": frozenset(split_names), "sum_over_shards": sum_over_shards}
    zero_optimizer = engine.optimizer
    if stage == 3:
        return _register_zero3(zero_optimizer, optimizer, lora_a_names, projector_rank, split)
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
        layouts.append(_register_layout(optimizer, flat, fragments, projector_rank, process_group, split))
    return layouts

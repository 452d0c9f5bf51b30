"""The initial LoRA-A rows written from the solved bases (``config.init`` "projected" or "eigenvectors").

Only the owner of a module's input holds its projector, so the owner computes the new rows and every other rank
receives them::

    module q_proj, input owned by rank 1:
      every rank:  A (r, d_in) ─ gathered (ZeRO-3) ─► rank 1: A ← rows(A, P) ─► broadcast ─► every rank copies it

The owner's rows reach every rank by ``comm.broadcast``; under ZeRO-3 each rank writes them into the gathered
weight and DeepSpeed partitions them back on exit. A row-parallel A (split along d_in over TP) is first
joined on the owner from its replica's TP ranks; every rank keeps its columns of the broadcast rows. B is zero at
this point, so the model's output does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from folora_ds.distributed import comm
from folora_ds.distributed.tensor_parallel import TensorParallelLayout, join_on_owner
from folora_ds.method.peft_layers import lora_a_weight, split_dimension
from folora_ds.method.projector import Projector

RowRule = Callable[[torch.Tensor, Projector], torch.Tensor]
"""New LoRA-A rows (r, d_in) from the current ones (r, d_in, float32) and the input's projector
(``projector.project_rows`` or ``projector.eigenvector_rows``)."""


def write_initial_lora_a(layers: Mapping[str, nn.Module], key_of: Callable[[str], str], owners: Mapping[str, int],
                         projectors: Mapping[str, Projector], rows: RowRule, group=None, *,
                         layout: TensorParallelLayout | None = None) -> None:
    """Collective: the owner of each module's input rewrites that module's LoRA-A with ``rows`` and every rank
    receives the result; ZeRO-3-partitioned weights are gathered one module at a time.

    Args:
        layers: module name → peft LoRA layer (the same modules, in the same order, on every rank).
        key_of: module name → its input key.
        owners: input key → owner rank in ``group``.
        projectors: the projectors this rank solved (at least every key it owns).
        rows: how the owner computes the new rows.
        layout: the TP x DP grid; needed when a layer's A is split over TP.
    """
    me = comm.rank(group)
    with torch.no_grad():
        for name, layer in layers.items():
            key, weight = key_of(name), lora_a_weight(layer)
            split = split_dimension(layer, "lora_a")
            if split is not None and layout is None:
                raise ValueError(f"{name!r}: a LoRA-A split over tensor-parallel ranks needs the TP layout")
            # ZeRO-3: every rank writes the same rows, so the data-parallel group's rank 0 (modifier_rank is a rank
            # of the parameter's group, which under TP is not the world) partitions them back on exit
            with comm.gathered([weight], modifier_rank=0):
                value = weight.detach().clone().float()
                if split is not None:  # (r, d_in / TP) → the owner joins its replica's blocks into (r, d_in)
                    joined = join_on_owner(value, split, owners[key], layout, group)
                    value = joined if joined is not None else value.new_empty(value.shape[0], layer.in_features)
                if owners[key] == me:
                    value = rows(value, projectors[key].to(value.device))
                value = comm.broadcast(value, owners[key], group)
                if split is not None:
                    value = value[:, layer.local_columns[0]:layer.local_columns[1]]
                weight.copy_(value)

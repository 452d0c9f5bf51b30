"""Where each rank sits in the tensor-parallel (TP) x data-parallel (DP) grid, as FoLoRA's statistics see it.

FoLoRA's group is the whole world (owners solve across every rank); the model's TP groups split some LoRA inputs
and replicate others. Every rank learns every rank's place once (one object all-gather)::

    world of 4, TP = 2:      rank      0  1  2  3
                             TP rank   0  1  0  1
                             replica   0  0  1  1      (the DP rank: which copy of the model; TP ranks of one
                                                        replica run the same batches)

A rank's replica seeds its token draws and picks its data shard, so the TP ranks of one replica count the same
tokens. Without TP layers every rank is its own replica with TP rank 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from folora_ds.distributed import comm


@dataclass(frozen=True)
class TensorParallelLayout:
    """Every rank's place in the TP x DP grid of FoLoRA's group.

    Attributes:
        tp_size: ranks per TP group (1 without tensor parallelism).
        tp_ranks: the TP rank of every rank of the group, in group-rank order.
        replicas: the replica (DP rank) of every rank of the group.
        tp_group: this rank's TP process group (None at TP = 1).
        me: this rank in the group.
    """

    tp_size: int
    tp_ranks: tuple[int, ...]
    replicas: tuple[int, ...]
    tp_group: object = None
    me: int = 0

    @property
    def tp_rank(self) -> int:
        """This rank's TP rank."""
        return self.tp_ranks[self.me]

    @property
    def dp_rank(self) -> int:
        """This rank's replica: its data shard and token-draw seed."""
        return self.replicas[self.me]

    @property
    def dp_size(self) -> int:
        """How many replicas (the data-parallel size)."""
        return max(self.replicas) + 1

    def members(self) -> list[list[int]]:
        """The group ranks of each replica, in TP-rank order (``members()[dp][tp]``)."""
        grid = [[0] * self.tp_size for _ in range(self.dp_size)]
        for rank, (tp_rank, replica) in enumerate(zip(self.tp_ranks, self.replicas)):
            grid[replica][tp_rank] = rank
        return grid

    def sum_over_tp(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function that sums a tensor over this rank's TP group (an all-reduce; every TP rank must call it)."""
        group = self.tp_group
        return lambda tensor: comm.all_reduce_sum(tensor, group)


def gather_layout(tp_group=None, group=None) -> TensorParallelLayout:
    """Collective over ``group``: every rank's TP rank and replica, from each rank's ``tp_group`` (None: TP = 1).

    Replicas are numbered by their lowest global rank (Megatron's DP order for TP-contiguous groups).

    Raises:
        ValueError: TP groups of different sizes, or a TP group that is not wholly inside ``group``.
    """
    mine = (0, 1, None) if tp_group is None else (comm.rank(tp_group), comm.world_size(tp_group),
                                                  tuple(comm.group_ranks(tp_group)))
    everyone = comm.all_gather_objects(mine, group)
    world_ranks = comm.group_ranks(group)
    sizes = sorted({size for _, size, _ in everyone})
    if len(sizes) != 1:
        raise ValueError(f"tensor-parallel groups of different sizes {sizes}: every rank must use the same TP size")
    tp_size = sizes[0]
    if tp_size == 1:
        return TensorParallelLayout(1, (0,) * len(everyone), tuple(range(len(everyone))), None, comm.rank(group))
    tp_sets = [members for _, _, members in everyone]
    outside = sorted({rank for members in tp_sets for rank in members} - set(world_ranks))
    if outside:
        raise ValueError(f"tensor-parallel groups reach ranks {outside[:4]} outside FoLoRA's group")
    order = {members: index for index, members in enumerate(sorted(set(tp_sets), key=min))}
    return TensorParallelLayout(tp_size, tuple(tp_rank for tp_rank, _, _ in everyone),
                                tuple(order[members] for members in tp_sets), tp_group, comm.rank(group))


def chunk_bounds(count: int, part: int, parts: int) -> tuple[int, int]:
    """Rows [start, stop) of ``count`` that part ``part`` of ``parts`` takes (contiguous, sizes differ by ≤ 1)."""
    return count * part // parts, count * (part + 1) // parts


def join_on_owner(shard: torch.Tensor, split_dim: int | None, owner: int, layout: TensorParallelLayout,
                  group=None) -> torch.Tensor | None:
    """Collective (point to point inside the owner's replica): a tensor split over TP, whole on ``owner``.

    The owner's replica's TP ranks send their shards to ``owner``, which joins them in TP order along
    ``split_dim``; other ranks send nothing. Every rank calls this for the same tensors in the same order.

    Args:
        shard: this rank's piece (every TP rank's piece has the same shape).
        split_dim: the dimension the tensor is split along; None: it is whole on every rank (no traffic).
        owner: the group rank that gets the whole tensor.

    Returns:
        The whole tensor on ``owner`` (``shard`` itself when nothing is split), None on every other rank.
    """
    if split_dim is None or layout.tp_size == 1:
        return shard if layout.me == owner else None
    replica = layout.members()[layout.replicas[owner]]
    if layout.me == owner:
        pieces = [shard if rank == owner else
                  comm.receive_tensors([tuple(shard.shape)], shard.dtype, rank, shard.device, group)[0]
                  for rank in replica]
        return torch.cat(pieces, dim=split_dim)
    if layout.me in replica:
        comm.send_tensors([shard], owner, group)
    return None

"""The collectives folora_ds uses, each a small function over ``deepspeed.comm`` (one place for all of them).

Every function here is a collective or point-to-point operation: all ranks of the group must call the
collective ones in the same order. Process-group timeouts (``init_distributed(timeout=...)``) bound every wait.
"""

from __future__ import annotations

from typing import Any

import deepspeed.comm as dist
import torch


def rank(group=None) -> int:
    return dist.get_rank(group=group)


def world_size(group=None) -> int:
    return dist.get_world_size(group=group)


def global_rank(group, group_rank: int) -> int:
    """The global rank of ``group_rank`` within ``group`` (identity for the world group)."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over the group in place and return it."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def reduce_sum_to(tensor: torch.Tensor, owner: int, group=None) -> torch.Tensor:
    """Sum ``tensor`` over the group into ``owner``'s copy (other ranks' copies are undefined afterwards)."""
    dist.reduce(tensor, dst=global_rank(group, owner), op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_gather_objects(obj: Any, group=None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    gathered: list[Any] = [None] * world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def send_tensors(tensors: list[torch.Tensor], destination: int, group=None) -> None:
    """Send tensors to ``destination`` (a group rank); the receiver must post matching ``receive_tensors``."""
    for tensor in tensors:
        dist.send(tensor.contiguous(), dst=global_rank(group, destination), group=group)


def receive_tensors(shapes: list[tuple[int, ...]], dtype: torch.dtype, source: int, device, group=None):
    """Receive tensors of the given shapes from ``source`` (a group rank)."""
    received = []
    for shape in shapes:
        tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(tensor, src=global_rank(group, source), group=group)
        received.append(tensor)
    return received


def broadcast(tensor: torch.Tensor, source: int, group=None) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with ``source``'s (a group rank) and return it."""
    dist.broadcast(tensor, src=global_rank(group, source), group=group)
    return tensor

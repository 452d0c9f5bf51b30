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


def barrier(group=None) -> None:
    """Wait until every rank of the group arrives."""
    dist.barrier(group=group)


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


def init_distributed(timeout_seconds: float = 600.0) -> None:
    """Start the process group from the launcher's environment (deepspeed, torchrun, SLURM-less MPI via mpi4py).

    On CPU-only machines the gloo backend is used. DeepSpeed's CPU accelerator would JIT-compile its shared-memory
    inference all-reduce op here (~55 s on a fresh machine); training never uses it, so that build is skipped.
    Every collective then fails after ``timeout_seconds`` instead of hanging forever when a rank dies.
    """
    import datetime
    import importlib
    import os

    import deepspeed

    if dist.is_initialized():
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    backend = None if torch.cuda.is_available() else "gloo"
    mpi = "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" in os.environ
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=mpi,
                               timeout=datetime.timedelta(seconds=timeout_seconds))

"""The collectives folora_ds uses, each a small function over ``deepspeed.comm`` (one place for all of them).

No process group running means world size 1: ``rank()`` is 0, ``world_size()`` is 1 and every collective returns
its input untouched, so the one ``FoLoRAController`` serves a plain single process and N ranks alike (as
kfac-pytorch's ``distributed.py`` does). DeepSpeed is imported only once a process group exists.

Every function here is a collective or point-to-point operation: all ranks of the group must call the
collective ones in the same order. Process-group timeouts (``init_distributed(timeout_seconds=...)``) bound
every wait.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import socket
from collections.abc import Iterable
from typing import Any

import torch

from folora_ds.distributed.slurm import rendezvous_from_slurm


def is_running() -> bool:
    """Whether a process group is running (otherwise this process is the whole world)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _dist():
    import deepspeed.comm as dist

    if not dist.is_initialized():  # torch's process group started by the user: let deepspeed.comm adopt it
        dist.init_distributed(dist_backend=torch.distributed.get_backend())
    return dist


def rank(group=None) -> int:
    return _dist().get_rank(group=group) if is_running() else 0


def world_size(group=None) -> int:
    return _dist().get_world_size(group=group) if is_running() else 1


def global_rank(group, group_rank: int) -> int:
    """The global rank of ``group_rank`` within ``group`` (identity for the world group)."""
    return group_rank if group is None else _dist().get_global_rank(group, group_rank)


def group_ranks(group=None) -> list[int]:
    """The global ranks of ``group``'s members in group-rank order (``[0]`` without a process group)."""
    if not is_running():
        return [0]
    return list(torch.distributed.get_process_group_ranks(group or torch.distributed.group.WORLD))


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over the group in place and return it.

    A CPU tensor on an NCCL group (the cut-row coordinates of ZeRO-Offload's CPU partitions) is reduced through
    the rank's accelerator and copied back: NCCL reduces device memory only. (Not run here: this machine has no GPU;
    gloo, which reduces CPU tensors directly, is what the tests use.)"""
    if is_running():
        dist = _dist()
        if tensor.device.type == "cpu" and "nccl" in str(torch.distributed.get_backend(group)).lower():
            from deepspeed.accelerator import get_accelerator

            staged = tensor.to(get_accelerator().current_device_name(), copy=True)
            dist.all_reduce(staged, op=dist.ReduceOp.SUM, group=group)
            tensor.copy_(staged)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def barrier(group=None) -> None:
    """Wait until every rank of the group arrives."""
    if is_running():
        _dist().barrier(group=group)


def all_gather_objects(obj: Any, group=None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not is_running():
        return [obj]
    gathered: list[Any] = [None] * world_size(group)
    _dist().all_gather_object(gathered, obj, group=group)
    return gathered


def all_gather_counts(count: int, device, group=None) -> list[int]:
    """Every rank's ``count`` (a non-negative int), in rank order: one small tensor all-gather."""
    if not is_running():
        return [count]
    mine = torch.tensor([count], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world_size(group))]
    _dist().all_gather(everyone, mine, group=group)
    return [int(value) for value in torch.cat(everyone).cpu()]


def gather_to(tensor: torch.Tensor, destination: int, group=None) -> list[torch.Tensor] | None:
    """Every rank's ``tensor`` (same shape and dtype everywhere) on ``destination`` (a group rank), in rank order;
    None on the other ranks."""
    if not is_running():
        return [tensor]
    tensor = tensor.contiguous()
    receiving = rank(group) == destination
    pieces = [torch.empty_like(tensor) for _ in range(world_size(group))] if receiving else None
    _dist().gather(tensor, gather_list=pieces, dst=global_rank(group, destination), group=group)
    return pieces


def send_tensors(tensors: list[torch.Tensor], destination: int, group=None) -> None:
    """Send tensors to ``destination`` (a group rank); the receiver must post matching ``receive_tensors``."""
    for tensor in tensors:
        _dist().send(tensor.contiguous(), dst=global_rank(group, destination), group=group)


def receive_tensors(shapes: list[tuple[int, ...]], dtype: torch.dtype, source: int, device, group=None):
    """Receive tensors of the given shapes from ``source`` (a group rank)."""
    received = []
    for shape in shapes:
        tensor = torch.empty(shape, dtype=dtype, device=device)
        _dist().recv(tensor, src=global_rank(group, source), group=group)
        received.append(tensor)
    return received


def broadcast(tensor: torch.Tensor, source: int, group=None) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with ``source``'s (a group rank) and return it."""
    if is_running():
        _dist().broadcast(tensor, src=global_rank(group, source), group=group)
    return tensor


def gathered(params: Iterable[torch.nn.Parameter], modifier_rank: int | None = None):
    """A context in which ZeRO-3-partitioned ``params`` are whole on every rank (an all-gather, so collective);
    with ``modifier_rank`` (a group rank), that rank's changes are partitioned back on exit. A no-op for
    parameters DeepSpeed has not partitioned."""
    params = list(params)
    if not any(hasattr(param, "ds_id") for param in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


_TIMEOUT_SECONDS: list[float] = []
"""The collective timeout of the group ``init_distributed`` started (empty when the user started it)."""

_SET_BY_US: set[str] = set()
"""Environment variables ``init_distributed`` set for a plain process (removed again by ``shutdown``)."""


def init_distributed(timeout_seconds: float = 600.0) -> bool:
    """Start the process group from the launcher's environment (deepspeed, torchrun, mpirun via mpi4py, or ``srun``
    itself: ``slurm.rendezvous_from_slurm``), or a group of one for a plain process (so the DeepSpeed engine can
    run there too).

    On CPU-only machines the gloo backend is used. DeepSpeed's CPU accelerator would JIT-compile its shared-memory
    inference all-reduce op here (~55 s on a fresh machine); training never uses it, so that build is skipped.
    Every collective then fails after ``timeout_seconds`` instead of hanging forever when a rank dies.

    Returns:
        Whether this call started the group (False when one was running already).

    Raises:
        ValueError: the environment announces several processes (WORLD_SIZE or PMI_SIZE > 1) without a RANK.
    """
    if is_running():
        return False

    os.environ.update(rendezvous_from_slurm(os.environ))  # a rank started by srun itself: SLURM's variables mapped
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not torch.cuda.is_available():
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    mpi = "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" in os.environ
    backend = None if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_seconds)
    _TIMEOUT_SECONDS[:] = [timeout_seconds]
    if "RANK" in os.environ or mpi:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=mpi, timeout=timeout)
        return True
    for variable in ("WORLD_SIZE", "PMI_SIZE"):  # N processes that would each think they are alone
        if int(os.environ.get(variable, "1")) > 1:
            raise ValueError(f"{variable}={os.environ[variable]} but RANK is not set: start the processes with "
                             "deepspeed, torchrun or Open MPI's mpirun (or set RANK, LOCAL_RANK, MASTER_ADDR and "
                             "MASTER_PORT), or each would train alone")
    # A plain process: a world of one on a free local port. LOCAL_RANK (which the engine reads) is set in the
    # environment for the group's lifetime and removed by shutdown(); DS_ACCELERATOR=cpu stays on CPU-only machines.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = "0"
        _SET_BY_US.add("LOCAL_RANK")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout,
                               init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return True


def collective_timeout() -> float | None:
    """Seconds after which a collective gives up, when ``init_distributed`` started the group (else None)."""
    return _TIMEOUT_SECONDS[0] if _TIMEOUT_SECONDS and is_running() else None


def shutdown() -> None:
    """Destroy the process group (call only where ``init_distributed`` returned True)."""
    if is_running():
        _dist().destroy_process_group()
    while _SET_BY_US:
        os.environ.pop(_SET_BY_US.pop(), None)

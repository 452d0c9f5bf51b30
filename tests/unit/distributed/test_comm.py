"""Without a process group the communication layer is a world of one: every collective returns its input."""

from __future__ import annotations

import sys

import torch

from folora_ds.distributed import comm
from folora_ds.distributed.statistics import DistributedStatisticsError, raise_if_any


def test_no_process_group_means_world_size_one_and_no_op_collectives():
    assert not comm.is_running()
    assert (comm.rank(), comm.world_size()) == (0, 1)
    tensor = torch.arange(4.0)
    assert comm.all_reduce_sum(tensor) is tensor and torch.equal(tensor, torch.arange(4.0))
    assert comm.broadcast(tensor, 0) is tensor
    assert comm.gather_to(tensor, 0) == [tensor] and comm.all_gather_counts(3, "cpu") == [3]
    assert comm.all_gather_objects({"a": 1}) == [{"a": 1}]
    comm.barrier()


def test_parameters_deepspeed_has_not_partitioned_need_no_gather():
    import contextlib

    assert isinstance(comm.gathered([torch.nn.Parameter(torch.ones(2))]), contextlib.nullcontext)


def test_a_single_process_error_is_raised_without_a_rank_prefix():
    raise_if_any(None)
    try:
        raise_if_any("the proxy calibration set produced no batches")
    except DistributedStatisticsError as error:
        assert str(error) == "the proxy calibration set produced no batches"
        assert isinstance(error, ValueError) and isinstance(error, RuntimeError)
    else:
        raise AssertionError("no error raised")


def test_the_communication_layer_imports_no_deepspeed_until_needed():
    import subprocess

    code = "import folora_ds, sys; print('deepspeed' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_several_processes_without_a_rank_are_refused(monkeypatch):
    """Every process would otherwise start its own world of one and train alone."""
    import pytest

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but RANK is not set"):
        comm.init_distributed()
    assert not comm.is_running()


def test_cpu_tensors_on_an_nccl_group_are_reduced_through_the_accelerator(monkeypatch):
    """ZeRO-Offload's cut-row coordinates live on the CPU; NCCL reduces device memory only, so they are staged."""
    import types

    import torch

    from folora_ds.distributed import comm

    seen = []

    def all_reduce(tensor, op=None, group=None):
        seen.append(tensor)
        tensor.mul_(2)  # "two ranks holding the same values"

    fake = types.SimpleNamespace(all_reduce=all_reduce, ReduceOp=types.SimpleNamespace(SUM="sum"))
    monkeypatch.setattr(comm, "is_running", lambda: True)
    monkeypatch.setattr(comm, "_dist", lambda: fake)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    values = torch.tensor([1.0, 2.0])
    assert comm.all_reduce_sum(values) is values
    assert seen[0] is not values, "an NCCL group must get a staged copy, not the CPU tensor itself"
    assert values.tolist() == [2.0, 4.0]
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    comm.all_reduce_sum(values)
    assert seen[1] is values and values.tolist() == [4.0, 8.0]  # gloo reduces the CPU tensor in place

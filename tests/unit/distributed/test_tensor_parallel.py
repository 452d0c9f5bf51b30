"""The TP x DP grid FoLoRA's statistics use, in one process (the collectives are tested on gloo ranks in
tests/distributed/test_megatron_training.py)."""

from __future__ import annotations

import pytest
import torch

from folora_ds.distributed.tensor_parallel import TensorParallelLayout, chunk_bounds, gather_layout, join_on_owner


def test_chunks_cover_the_rows_once_in_order():
    for count in range(0, 9):
        for parts in (1, 2, 3, 4):
            bounds = [chunk_bounds(count, part, parts) for part in range(parts)]
            assert bounds[0][0] == 0 and bounds[-1][1] == count
            assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:]))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_layout_members_are_replicas_in_tp_order():
    layout = TensorParallelLayout(2, (0, 1, 0, 1), (0, 0, 1, 1), None, me=2)
    assert layout.members() == [[0, 1], [2, 3]]
    assert (layout.tp_rank, layout.dp_rank, layout.dp_size) == (0, 1, 2)
    interleaved = TensorParallelLayout(2, (0, 0, 1, 1), (0, 1, 0, 1), None, me=3)
    assert interleaved.members() == [[0, 2], [1, 3]] and interleaved.dp_rank == 1


def test_one_process_is_one_replica_and_joins_nothing():
    layout = gather_layout(None)
    assert (layout.tp_size, layout.tp_ranks, layout.replicas, layout.me) == (1, (0,), (0,), 0)
    shard = torch.arange(6.0).view(2, 3)
    assert join_on_owner(shard, 1, owner=0, layout=layout) is shard
    assert join_on_owner(shard, None, owner=1, layout=layout) is None  # not the owner: nothing


@pytest.mark.parametrize("tp_size", [1, 2])
def test_the_tp_sum_is_the_identity_without_a_process_group(tp_size):
    layout = TensorParallelLayout(tp_size, (0,), (0,), None)
    partial = torch.ones(5, 4)
    assert torch.equal(layout.sum_over_tp()(partial.clone()), partial)

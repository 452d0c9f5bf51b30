"""Megatron tensor parallelism on 4 gloo ranks (TP = 2 x DP = 2, megatron-core's own groups): the mpu DeepSpeed
reads answers from the right groups, and the gate of a LoRA-A split along d_in over the TP group (one r x k
all-reduce) equals the gate of the whole A, on every TP rank of both data-parallel replicas."""

from __future__ import annotations

import pytest
import torch

from folora_ds.adapters.megatron import MegatronMpu, parallel_state
from folora_ds.distributed import comm
from folora_ds.method.projector import Projector, apply_projector, apply_projector_shard, projector_shard
from tests.testing.ranks import run_ranks

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the optional megatron extra)")

D_IN, R, K = 13, 5, 4  # d_in odd: the TP split is uneven (7 | 6 columns)


def _projector_and_update(seed: int) -> tuple[Projector, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    projector = Projector(torch.randn(D_IN, K, generator=generator, dtype=torch.float64),
                          torch.randn(D_IN, K, generator=generator, dtype=torch.float64),
                          torch.rand(K, generator=generator, dtype=torch.float64), base=0.5)
    return projector, torch.randn(R, D_IN, generator=generator, dtype=torch.float64)


def _tp2(rank: int, world: int) -> dict:
    state = parallel_state()
    state.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        mpu = MegatronMpu()
        tp_rank, tp_size = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
        start, stop = (0, 7) if tp_rank == 0 else (7, D_IN)
        projector, update = _projector_and_update(seed=mpu.get_data_parallel_rank())  # replicas differ
        reduces = []

        def over_tp(partial: torch.Tensor) -> torch.Tensor:
            reduces.append(partial.numel())
            return comm.all_reduce_sum(partial, mpu.get_tensor_model_parallel_group())

        gated = apply_projector_shard(update[:, start:stop], projector_shard(projector, start, stop), over_tp)
        return {"tp": (tp_rank, tp_size), "model_parallel": (mpu.get_model_parallel_rank(),
                                                               mpu.get_model_parallel_world_size()),
                "dp": (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()),
                "dp_ranks": mpu.get_data_parallel_group_ranks(), "reduced": reduces, "gated": gated,
                "answers_sequence_parallel": hasattr(mpu, "get_sequence_parallel_world_size"),
                "pipeline": (mpu.get_pipeline_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size()),
                "expected": apply_projector(update, projector)[:, start:stop]}
    finally:
        state.destroy_model_parallel()


def test_tp2_dp2_mpu_groups_and_the_split_gate_equal_the_whole():
    results = run_ranks(4, _tp2)
    # megatron-core's order: TP groups {0, 1} {2, 3}, DP groups {0, 2} {1, 3}
    assert [result["tp"] for result in results] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert [result["model_parallel"] for result in results] == [result["tp"] for result in results]
    assert [result["dp"] for result in results] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [result["dp_ranks"] for result in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(result["pipeline"] == (0, 1) for result in results)  # one stage
    assert not any(result["answers_sequence_parallel"] for result in results)  # DeepSpeed then takes the TP x DP path
    for rank, result in enumerate(results):
        assert result["reduced"] == [R * K], f"rank {rank}: one r x k all-reduce per LoRA-A"
        torch.testing.assert_close(result["gated"], result["expected"], rtol=0, atol=1e-12,
                                   msg=lambda m, r=rank: f"rank {r}: {m}")

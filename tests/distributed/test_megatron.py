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


# ------------------------------------------------------------------------ LoRA on Column/RowParallelLinear
HIDDEN, FFN, LORA_R, ALPHA, TOKENS = 8, 6, 3, 6.0, 4


def _gathered(shard: torch.Tensor, dim: int, group) -> torch.Tensor:
    return torch.cat([piece.detach() for piece in comm.all_gather_objects(shard.detach(), group)], dim=dim)


def _lora_mlp(rank: int, world: int) -> dict:
    """x → column (8 → 6, split output) → GELU → row (6 → 8, split input, summed output), LoRA on both."""
    import megatron.core.tensor_parallel as tensor_parallel
    from megatron.core import ModelParallelConfig

    from folora_ds.adapters.megatron import LoRAParallelLinear

    state = parallel_state()
    state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        config = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True)
        torch.manual_seed(0)  # every rank builds the same master weights and keeps its slice

        def init(weight):
            return torch.nn.init.normal_(weight, std=0.3)

        column = LoRAParallelLinear(tensor_parallel.ColumnParallelLinear(
            HIDDEN, FFN, config=config, init_method=init, bias=False, gather_output=False), LORA_R, ALPHA, seed=1)
        row = LoRAParallelLinear(tensor_parallel.RowParallelLinear(
            FFN, HIDDEN, config=config, init_method=init, bias=False, input_is_parallel=True, skip_bias_add=False),
            LORA_R, ALPHA, seed=2)
        unsplit_input = tensor_parallel.RowParallelLinear(FFN, HIDDEN, config=config, init_method=init, bias=False,
                                                          input_is_parallel=False, skip_bias_add=False)
        try:
            LoRAParallelLinear(unsplit_input, LORA_R, ALPHA)
            refused = ""
        except ValueError as error:
            refused = str(error)
        group = state.get_tensor_model_parallel_group()
        tp_rank = comm.rank(group)
        with torch.no_grad():  # B ≠ 0, so the adapter path carries gradient to A (the same draw as TP = 1)
            column.lora_b.copy_(torch.randn(FFN, LORA_R, generator=torch.Generator().manual_seed(3)).chunk(
                world, dim=0)[tp_rank])
            row.lora_b.copy_(torch.randn(HIDDEN, LORA_R, generator=torch.Generator().manual_seed(4)))
        x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(5))
        hidden, _ = column(x)
        output, _ = row(torch.nn.functional.gelu(hidden))
        (output ** 2).sum().backward()
        return {"output": output.detach(), "refused": refused,
                "weights": {"w1": _gathered(column.base.weight, 0, group), "w2": _gathered(row.base.weight, 1, group),
                            "a1": column.lora_a.detach(), "b1": _gathered(column.lora_b, 0, group),
                            "a2": _gathered(row.lora_a, 1, group), "b2": row.lora_b.detach()},
                "grads": {"a1": column.lora_a.grad, "b1": _gathered(column.lora_b.grad, 0, group),
                          "a2": _gathered(row.lora_a.grad, 1, group), "b2": row.lora_b.grad},
                "split": {name: getattr(param, "tensor_model_parallel", None) for name, param in
                          (("a1", column.lora_a), ("b1", column.lora_b), ("a2", row.lora_a), ("b2", row.lora_b))},
                "frozen": not any(p.requires_grad for p in (*column.base.parameters(), *row.base.parameters()))}
    finally:
        state.destroy_model_parallel()


def _unsharded(weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The same MLP and LoRA in one process from the gathered weights: output and LoRA gradients."""
    lora = {name: weights[name].clone().requires_grad_(True) for name in ("a1", "b1", "a2", "b2")}
    scale = ALPHA / LORA_R
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(5))
    hidden = x @ weights["w1"].T + scale * (x @ lora["a1"].T) @ lora["b1"].T
    activated = torch.nn.functional.gelu(hidden)
    output = activated @ weights["w2"].T + scale * (activated @ lora["a2"].T) @ lora["b2"].T
    (output ** 2).sum().backward()
    return output.detach(), {name: tensor.grad for name, tensor in lora.items()}


def test_lora_on_column_and_row_parallel_layers_at_tp2_equals_one_process():
    results = run_ranks(2, _lora_mlp)
    reference_output, reference_grads = _unsharded(results[0]["weights"])
    for rank, result in enumerate(results):
        assert result["frozen"]
        assert "needs input_is_parallel=True" in result["refused"]
        assert result["split"] == {"a1": False, "b1": True, "a2": True, "b2": False}  # what DeepSpeed's norm reads
        torch.testing.assert_close(result["output"], reference_output, rtol=1e-5, atol=1e-5)
        for name, grad in reference_grads.items():  # float32: gradients of ~1e2 agree to ~2e-7 relative
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, n=name, r=rank: f"rank {r} grad {n}: {m}")
    # A's draw is TP-independent: the row layer's two halves are the TP = 1 draw of seed 2
    bound = 1.0 / FFN ** 0.5
    whole = torch.empty(LORA_R, FFN).uniform_(-bound, bound, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(results[0]["weights"]["a2"], whole, rtol=0, atol=0)
    torch.testing.assert_close(results[0]["grads"]["a1"], results[1]["grads"]["a1"], rtol=0, atol=0)  # same copies

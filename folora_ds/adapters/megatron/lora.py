"""LoRA on megatron-core's tensor-parallel linears, in the layouts peft and NeMo use (``../shared`` notes, issue 23).

    column-parallel base (q/k/v, gate/up): input x whole and identical on every TP rank, output split along d_out
        A (r, d_in)       whole on every TP rank; h = x·Aᵀ is copied into the TP region, so its gradient (and
                          A's) is summed over TP and the copies of A stay identical
        B (d_out/TP, r)   split along d_out (marked tensor-parallel, dim 0)
    row-parallel base (o, down): input split along d_in, output summed over TP
        A (r, d_in/TP)    split along d_in (marked tensor-parallel, dim 1); h = Σ_TP x_i·A_iᵀ (all-reduce forward)
        B (d_out, r)      whole on every TP rank (the output, and so B's gradient, is the same on every TP rank)

    y = base(x) + (α/r)·B·A·x        (A: Kaiming-uniform of the whole (r, d_in), drawn from one seed on every TP
                                      rank and sliced, so TP = 2 starts where TP = 1 starts; B = 0)

Parameters split across TP carry megatron's ``tensor_model_parallel`` attributes, which DeepSpeed reads for the
gradient norm (each shard counted once; whole copies on TP rank 0 only). Our own wrapper, not peft's
``LoraParallelLinear``: that one is broken against megatron-core 0.16 (a ``fan_in_fan_out`` KeyError, ``lora_bias``,
and its forward scales the base's ``(output, bias)`` tuple). megatron-core is imported when a wrapper is built.
"""

from __future__ import annotations

import importlib
import math

import torch
from torch import nn

from folora_ds.common.checks import require_int, require_real
from folora_ds.distributed import comm
from folora_ds.method.peft_layers import TensorParallelLoRA


class LoRAParallelLinear(TensorParallelLoRA):
    """A frozen megatron-core ``ColumnParallelLinear`` or ``RowParallelLinear`` plus a LoRA adapter laid out for it.

    Args:
        base: the parallel linear (its weights are frozen here); a row-parallel one must take its input split
            (``input_is_parallel=True``).
        rank, alpha: LoRA rank r and α (scale α / r).
        seed: the seed of A's draw, the same on every TP rank (different layers should get different seeds).

    Raises:
        TypeError: ``base`` is not a Column/RowParallelLinear. ValueError: sequence parallelism, a row-parallel base
            whose input is not split, a bad rank or α (each named).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, seed: int = 0) -> None:
        super().__init__()
        require_int("rank", rank)
        require_real("alpha", alpha, low=0.0)
        layers = importlib.import_module("megatron.core.tensor_parallel.layers")
        self._mappings = importlib.import_module("megatron.core.tensor_parallel.mappings")
        if isinstance(base, layers.ColumnParallelLinear):
            self.kind, d_in, local = "column", base.input_size, (0, base.input_size)
            b_shape = (base.output_size_per_partition, rank)
        elif isinstance(base, layers.RowParallelLinear):
            if not base.input_is_parallel:
                raise ValueError("LoRA on a RowParallelLinear needs input_is_parallel=True (its input split along "
                                 "d_in, as after a ColumnParallelLinear)")
            self.kind, d_in = "row", base.input_size
            tp_rank = comm.rank(base.tp_group)
            local = (tp_rank * base.input_size_per_partition, (tp_rank + 1) * base.input_size_per_partition)
            b_shape = (base.output_size, rank)
        else:
            raise TypeError(f"LoRAParallelLinear wraps megatron-core Column/RowParallelLinear, not "
                            f"{type(base).__name__}")
        if base.sequence_parallel:
            raise ValueError("sequence parallelism is not supported by FoLoRA's Megatron LoRA yet: each rank sees "
                             "1/TP of the tokens; set sequence_parallel=False")
        for param in base.parameters():
            param.requires_grad_(False)
        self.base, self.rank, self.scaling = base, rank, alpha / rank
        self.tp_group = base.tp_group
        self.in_features, self.local_columns = d_in, local
        bound = 1.0 / math.sqrt(d_in)  # peft's Kaiming-uniform with a = √5
        whole = torch.empty(rank, d_in, dtype=base.weight.dtype).uniform_(
            -bound, bound, generator=torch.Generator().manual_seed(seed))
        self.lora_a = nn.Parameter(whole[:, local[0]:local[1]].clone().to(base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(b_shape, dtype=base.weight.dtype, device=base.weight.device))
        split, dim = (self.lora_b, 0) if self.kind == "column" else (self.lora_a, 1)
        layers.set_tensor_model_parallel_attributes(split, is_parallel=True, dim=dim, stride=1)
        whole_copy = self.lora_a if self.kind == "column" else self.lora_b
        layers.set_tensor_model_parallel_attributes(whole_copy, is_parallel=False, dim=-1, stride=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(base output + (α/r)·B·A·x, base bias)`` as megatron's parallel linears return them."""
        output, bias = self.base(x)
        hidden = x @ self.lora_a.mT  # (..., r): whole (column) or this rank's share of the sum (row)
        if self.kind == "column":
            hidden = self._mappings.copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)
        else:
            hidden = self._mappings.reduce_from_tensor_model_parallel_region(hidden, group=self.tp_group)
        return output + self.scaling * (hidden @ self.lora_b.mT), bias

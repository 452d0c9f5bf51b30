"""The trained adapter out: a standard peft adapter folder, written once for every rank.

A peft model writes its own (``save_adapter``). A tensor-parallel model's adapter (``LoRAParallelLinear``
layers) is written as the peft adapter of its unsharded twin — the same module tree with whole linears — every
split LoRA weight joined over TP on rank 0 first::

    TP rank 0: o_proj A (r, d/2) ─┐
    TP rank 1: o_proj A (r, d/2) ─┴─► rank 0: base_model.model.<name>.lora_A.weight (r, d)   (B likewise on column
                                                                                              layers, along d_out)
"""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from folora_ds.common.files import replace_atomically
from folora_ds.distributed import comm
from folora_ds.distributed.statistics import raise_if_any
from folora_ds.distributed.tensor_parallel import TensorParallelLayout, join_on_owner
from folora_ds.method.peft_layers import (
    lora_a_weight,
    lora_b_weight,
    lora_scaling,
    split_dimension,
    tensor_parallel_kind,
)


def export_adapter(model: nn.Module, layers: dict[str, nn.Module], layout: TensorParallelLayout, directory: Path,
                   group=None) -> None:
    """Collective: ``save_tensor_parallel_adapter`` for a model of tensor-parallel LoRA layers, else
    ``save_adapter`` (a peft model)."""
    if any(tensor_parallel_kind(layer) for layer in layers.values()):
        save_tensor_parallel_adapter(layers, layout, directory, group)
    else:
        save_adapter(model, directory)


def save_adapter(model: nn.Module, directory: Path) -> None:
    """Collective: rank 0 writes ``model``'s peft adapter to ``directory`` (ZeRO-3-partitioned adapter weights
    gathered for it; the frozen base is not); the folder appears complete or not at all."""
    trainable = [param for param in model.parameters() if param.requires_grad]
    error = None
    with comm.gathered(trainable):
        if comm.rank() == 0:
            try:
                with replace_atomically(Path(directory)) as scratch:
                    model.save_pretrained(str(scratch))
            except OSError as problem:
                error = f"cannot write the adapter to {str(directory)!r}: {problem}"
    raise_if_any(error)  # also the barrier: every rank waits for the write


def save_tensor_parallel_adapter(layers: dict[str, nn.Module], layout: TensorParallelLayout, directory: Path,
                                 group=None) -> None:
    """Collective: rank 0 writes the peft adapter of the unsharded twin of a tensor-parallel model: every LoRA
    weight joined over its TP group (``join_on_owner`` to rank 0), keys ``base_model.model.<module>.lora_A.weight``
    / ``lora_B.weight``, and an ``adapter_config.json`` targeting exactly these modules. ``PeftModel.from_pretrained``
    on the twin then computes what the tensor-parallel model computes. The folder appears complete or not at all.

    Raises:
        ValueError: the layers do not share one LoRA rank and scale (a peft config holds one of each).
    """
    shapes = {(lora_a_weight(layer).shape[0], lora_scaling(layer)) for layer in layers.values()}
    if len(shapes) != 1:
        raise ValueError(f"the LoRA layers have different ranks / scales {sorted(shapes)}; export needs one of each")
    (rank, scaling), = shapes
    weights = {}
    for name, layer in layers.items():
        for part, weight, suffix in (("lora_a", lora_a_weight(layer), "lora_A"),
                                     ("lora_b", lora_b_weight(layer), "lora_B")):
            with comm.gathered([weight]):
                whole = join_on_owner(weight.detach(), split_dimension(layer, part), 0, layout, group)
            if whole is not None:
                weights[f"base_model.model.{name}.{suffix}.weight"] = whole.float().cpu().contiguous()
    error = None
    if comm.rank(group) == 0:
        try:
            with replace_atomically(Path(directory)) as scratch:
                LoraConfig(r=rank, lora_alpha=rank * scaling, target_modules=sorted(layers)).save_pretrained(
                    str(scratch))
                save_file(weights, str(scratch / "adapter_model.safetensors"), metadata={"format": "pt"})
        except OSError as problem:
            error = f"cannot write the adapter to {str(directory)!r}: {problem}"
    raise_if_any(error, group)

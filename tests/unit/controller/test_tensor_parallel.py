"""What the controller reads off tensor-parallel LoRA layers, on stand-in layers (no megatron-core needed)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from folora_ds.controller.tensor_parallel import input_kinds, needed_rows, parallel_layout
from folora_ds.method.peft_layers import (
    TensorParallelLoRA,
    lora_a_weight,
    lora_b_weight,
    lora_layers,
    lora_scaling,
    split_dimension,
    tensor_parallel_kind,
)


class StandIn(TensorParallelLoRA):
    """A TensorParallelLoRA of TP = 2, this rank holding the second half of a row layer's input."""

    def __init__(self, kind: str, d_in: int = 8, d_out: int = 6, rank: int = 3, group=None) -> None:
        super().__init__()
        self.kind, self.in_features, self.scaling, self.tp_group = kind, d_in, 2.0, group
        self.local_columns = (d_in // 2, d_in) if kind == "row" else (0, d_in)
        local_in = self.local_columns[1] - self.local_columns[0]
        self.base = nn.Linear(local_in, d_out // 2 if kind == "column" else d_out, bias=False)
        self.lora_a = nn.Parameter(torch.zeros(rank, local_in))
        self.lora_b = nn.Parameter(torch.zeros(d_out // 2 if kind == "column" else d_out, rank))


def test_tensor_parallel_layers_are_found_and_read_like_peft_layers():
    model = nn.ModuleDict({"q": StandIn("column"), "o": StandIn("row")})
    layers = lora_layers(model)
    assert list(layers) == ["q", "o"]
    assert [tensor_parallel_kind(layer) for layer in layers.values()] == ["column", "row"]
    assert lora_a_weight(layers["o"]) is model["o"].lora_a and lora_b_weight(layers["q"]) is model["q"].lora_b
    assert lora_scaling(layers["q"]) == 2.0 and layers["o"].get_base_layer() is model["o"].base
    assert [split_dimension(layers["q"], w) for w in ("base", "lora_a", "lora_b")] == [0, None, 0]
    assert [split_dimension(layers["o"], w) for w in ("base", "lora_a", "lora_b")] == [1, 1, None]
    with pytest.raises(ValueError, match="allowed: 'base', 'lora_a', 'lora_b'"):
        split_dimension(layers["o"], "weight")


def test_peft_layers_are_whole():
    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    layer = next(iter(lora_layers(model).values()))
    assert tensor_parallel_kind(layer) is None
    assert all(split_dimension(layer, w) is None for w in ("base", "lora_a", "lora_b"))


def test_kinds_and_needed_rows_per_input():
    model = nn.ModuleDict({"q": StandIn("column"), "k": StandIn("column"), "o": StandIn("row")})
    layers = lora_layers(model)
    assert input_kinds(layers, {"q": ["q", "k"], "o": ["o"]}) == {"q": "column", "o": "row"}
    key_of = {"q": "q", "k": "q", "o": "o"}.__getitem__
    assert needed_rows(layers, ["q", "k", "o"], key_of, {"q": 8, "o": 8}) == {"q": (0, 8), "o": (4, 8)}
    with pytest.raises(ValueError, match=r"input 'q' feeds layers of different tensor-parallel kinds"):
        input_kinds(layers, {"q": ["q", "o"]})


def test_a_model_mixing_tensor_parallel_and_peft_layers_is_refused():
    peft_part = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    model = nn.ModuleDict({"q": StandIn("column"), "peft": peft_part})
    with pytest.raises(ValueError, match="mixes tensor-parallel LoRA layers with peft LoRA layers"):
        parallel_layout(lora_layers(model))


def test_tensor_parallel_layers_on_two_groups_are_refused():
    model = nn.ModuleDict({"q": StandIn("column", group="a"), "o": StandIn("row", group="b")})
    with pytest.raises(ValueError, match="2 different process groups"):
        parallel_layout(lora_layers(model))

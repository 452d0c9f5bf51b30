"""Forgetting per LoRA module in one process: the base energies are the traces tr(W C_pre Wᵀ) of every module, in
the model's module order, and a penalty that cannot be evaluated is raised as one error naming the penalty."""

from __future__ import annotations

import pytest
import torch

from folora_ds.controller.forgetting import adapter_penalty_per_module, base_energy_per_module
from folora_ds.distributed.statistics import DistributedStatisticsError
from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.peft_layers import base_weight_matrix
from tests.testing.controller import calibrated_controller


def test_base_energies_are_the_trace_of_w_c_pre_wt_for_every_module_in_module_order():
    _, controller = calibrated_controller(FoLoRAConfig())
    energies = base_energy_per_module(controller.layers, controller.pre_covariances, controller.collector.key_of)
    assert list(energies) == list(controller.layers)
    for name, layer in controller.layers.items():
        weight = base_weight_matrix(layer).detach().double()
        c_pre = controller.pre_covariances[controller.collector.key_of(name)].double()
        assert energies[name] == pytest.approx(float(torch.trace(weight @ c_pre @ weight.T)), rel=1e-9)


def test_a_penalty_that_cannot_be_evaluated_is_raised_naming_the_forgetting_penalty():
    _, controller = calibrated_controller(FoLoRAConfig())
    wrong_width = {key: torch.eye(dim + 1) for key, dim in controller.dims.items()}  # C_pre not (d_in, d_in)
    with pytest.raises(DistributedStatisticsError, match=r"forgetting penalty of .*q_proj.: adapter_penalty"):
        adapter_penalty_per_module(controller.layers, wrong_width, controller.collector.key_of)

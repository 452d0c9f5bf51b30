"""``toolkit.directions``: a weight change split by FoLoRA's passed and attenuated directions adds up to its
forgetting and task energies, follows the gate exactly, and names bad shapes."""

from __future__ import annotations

import pytest
import torch

from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.eigensolve import solve_generalized_eigenproblem
from folora_ds.toolkit.directions import DirectionSplit, gate_basis, split_change


def _pencil(d: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x_task = torch.randn(40, d, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 3.0, d,
                                                                                            dtype=torch.float64)
    x_pre = torch.randn(200, d, generator=generator, dtype=torch.float64)
    return x_task.T @ x_task / 40, x_pre.T @ x_pre / 200


def test_the_split_adds_up_to_the_forgetting_and_task_energies():
    c_task, c_pre = _pencil()
    config = FoLoRAConfig()
    basis = gate_basis(c_task, c_pre, config)
    delta = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    split = split_change(delta, basis)
    c_tilde = c_pre + config.ridge * torch.trace(c_pre) / 12 * torch.eye(12, dtype=torch.float64)
    forgetting = float(torch.einsum("oi,ij,oj->", delta, c_tilde, delta))
    task = float(torch.einsum("oi,ij,oj->", delta, c_task, delta))
    assert split.passed_forgetting + split.attenuated_forgetting == pytest.approx(forgetting, rel=1e-9)
    assert split.passed_task + split.attenuated_task == pytest.approx(task, rel=1e-9)
    assert 0 < split.passed_directions < split.directions == 12
    assert split.passed_size == pytest.approx(split.passed_forgetting ** 0.5)
    assert split.passed_task_size == pytest.approx(split.passed_task ** 0.5)
    assert 0 < split.forgetting_share_passed < 1


def test_passed_means_the_gate_lets_it_through_and_a_change_along_it_is_all_passed():
    c_task, c_pre = _pencil(seed=2)
    config = FoLoRAConfig()
    basis = gate_basis(c_task, c_pre, config)
    result = solve_generalized_eigenproblem(c_task, c_pre, ridge=config.ridge)
    median = float(result.eigenvalues[result.eigenvalues > 0].median())
    assert torch.equal(basis.passed, result.eigenvalues >= median)  # rational gate at τ = median λ: g ≥ ½ ⇔ λ ≥ τ
    v, _ = result.columns()
    passed_rows = v[:, basis.passed].T  # rows along passed directions: ΔW = Y·Vᵀ with Y zero on the attenuated
    split = split_change(torch.randn(3, int(basis.passed.sum()), dtype=torch.float64) @ passed_rows, basis)
    assert split.attenuated_forgetting == pytest.approx(0.0, abs=1e-18) and split.passed_forgetting > 0
    # a larger τ passes fewer directions; a hard gate passes the same ones as the rational at equal τ
    assert int(gate_basis(c_task, c_pre, config, tau_scale=4.0).passed.sum()) < int(basis.passed.sum())
    assert torch.equal(gate_basis(c_task, c_pre, FoLoRAConfig(gate="hard")).passed, basis.passed)


def test_splits_combine_and_bad_shapes_are_named():
    a, b = DirectionSplit(1.0, 2.0, 3.0, 4.0, 5, 10), DirectionSplit(1.0, 0.0, 1.0, 0.0, 1, 4)
    assert (a + b).as_tuple() == (2.0, 2.0, 4.0, 4.0, 6, 14)
    assert DirectionSplit(0.0, 0.0, 0.0, 0.0, 0, 4).forgetting_share_passed == 0.0
    c_task, c_pre = _pencil()
    with pytest.raises(ValueError, match="does not read an input of width 12"):
        split_change(torch.zeros(3, 11, dtype=torch.float64), gate_basis(c_task, c_pre, FoLoRAConfig()))

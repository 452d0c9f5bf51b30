"""Where an adapter's weight change lands in FoLoRA's generalized eigenbasis: passed or attenuated directions.

For one input with the pencil C_task v = λ C̃ v (VᵀC̃V = I, ``folora_ds.method.eigensolve``) a weight change ΔW
(d_out, d_in) has spectral coordinates Y = ΔW·C̃V (d_out, d), so ΔW = Y·Vᵀ, and with y_i = ‖Y[:, i]‖²:

    forgetting energy   tr(ΔW C̃ ΔWᵀ)     = Σ_i y_i            (the penalty FoLoRA trades against)
    task energy         tr(ΔW C_task ΔWᵀ) = Σ_i λ_i y_i        (what the change does on task inputs)

Splitting both sums by FoLoRA's gate (passed: g_i ≥ 0.5, ``controller.reporting.ATTENUATED_BELOW``) tells how far
an adapter moved along the directions FoLoRA lets through and how far along those it holds back — the same
yardstick for every method, so "FoLoRA's effective rate along the passed directions" is a measured ratio (its
passed size over plain LoRA's at the same rate, seed and step) rather than a guess. Pure torch; the grid pass that
reads saved adapters is ``folora_ds.toolkit.grid.rows.direction_rows``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from folora_ds.controller.reporting import ATTENUATED_BELOW
from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.eigensolve import solve_generalized_eigenproblem
from folora_ds.method.peft_layers import adapter_delta_weight, lora_layers
from folora_ds.method.spectral import configured_gates


@dataclass(frozen=True)
class GateBasis:
    """FoLoRA's gate on one input, as the yardstick for any weight change of the modules reading it.

    Attributes:
        c_tilde_v: (d, d) columns C̃ v_i (a row's spectral coordinates are row·C̃V).
        eigenvalues: (d,) λ_i ascending, the null space of C_task at exactly 0.
        passed: (d,) bool, g_i ≥ 0.5.
    """

    c_tilde_v: torch.Tensor
    eigenvalues: torch.Tensor
    passed: torch.Tensor


@dataclass(frozen=True)
class DirectionSplit:
    """A weight change's forgetting and task energies split by passed/attenuated directions (module docstring).

    Attributes:
        passed_forgetting / attenuated_forgetting: Σ y_i over passed / attenuated directions.
        passed_task / attenuated_task: Σ λ_i y_i over them.
        passed_directions / directions: passed count and d, summed over the modules combined.
    """

    passed_forgetting: float
    attenuated_forgetting: float
    passed_task: float
    attenuated_task: float
    passed_directions: int
    directions: int

    def __add__(self, other: DirectionSplit) -> DirectionSplit:
        return DirectionSplit(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple[float, float, float, float, int, int]:
        return (self.passed_forgetting, self.attenuated_forgetting, self.passed_task, self.attenuated_task,
                self.passed_directions, self.directions)

    @property
    def passed_size(self) -> float:
        """√(Σ_passed y_i): how far the change moved along the passed directions (C̃-norm)."""
        return math.sqrt(self.passed_forgetting)

    @property
    def attenuated_size(self) -> float:
        """√(Σ_attenuated y_i): how far it moved along the directions FoLoRA holds back."""
        return math.sqrt(self.attenuated_forgetting)

    @property
    def passed_task_size(self) -> float:
        """√(Σ_passed λ_i y_i): how far the change moved the outputs on task inputs along the passed directions."""
        return math.sqrt(max(self.passed_task, 0.0))

    @property
    def forgetting_share_passed(self) -> float:
        """Share of the forgetting energy that lies in passed directions (0 for no change)."""
        total = self.passed_forgetting + self.attenuated_forgetting
        return self.passed_forgetting / total if total > 0 else 0.0


def gate_basis(c_task: torch.Tensor, c_pre: torch.Tensor, config: FoLoRAConfig, *, tau_scale: float = 1.0,
               layer: str = "<unnamed>") -> GateBasis:
    """FoLoRA's gate of one input from its (d, d) covariances, exactly as the spectral solver computes it (ridge,
    null space, τ, gate kind of ``config``, τ multiplied by ``tau_scale``), in float64.

    Raises:
        SpectralSolveError (NonFiniteStatisticsError): bad statistics, named by ``layer``.
    """
    result = solve_generalized_eigenproblem(c_task, c_pre, ridge=config.ridge,
                                            max_ridge_escalations=config.max_ridge_escalations, layer=layer)
    eigenvalues, _, gates = configured_gates(result.eigenvalues, config, tau_scale)
    _, c_tilde_v = result.columns()
    return GateBasis(c_tilde_v=c_tilde_v, eigenvalues=eigenvalues, passed=gates >= ATTENUATED_BELOW)


def split_change(delta_w: torch.Tensor, basis: GateBasis) -> DirectionSplit:
    """``delta_w`` (d_out, d_in) split by ``basis`` (d_in = d); see the module docstring.

    Raises:
        ValueError: ``delta_w``'s input width is not the basis'.
    """
    if delta_w.ndim != 2 or delta_w.shape[1] != basis.c_tilde_v.shape[0]:
        raise ValueError(f"weight change {tuple(delta_w.shape)} does not read an input of width "
                         f"{basis.c_tilde_v.shape[0]}")
    energies = (delta_w.to(basis.c_tilde_v.dtype) @ basis.c_tilde_v).square().sum(dim=0)  # (d,) y_i
    passed, held = energies[basis.passed], energies[~basis.passed]
    return DirectionSplit(passed_forgetting=float(passed.sum()), attenuated_forgetting=float(held.sum()),
                          passed_task=float((basis.eigenvalues[basis.passed] * passed).sum()),
                          attenuated_task=float((basis.eigenvalues[~basis.passed].clamp_min(0) * held).sum()),
                          passed_directions=int(basis.passed.sum()), directions=int(basis.passed.numel()))


@torch.no_grad()
def adapter_direction_split(peft_model, bases: Mapping[str, GateBasis]) -> dict[str, DirectionSplit]:
    """Per LoRA module of ``peft_model``: its adapter's ΔW split by ``bases`` (module name → its input's basis,
    names as peft gives them).

    Raises:
        KeyError: a LoRA module without a basis (another model or target list than the statistics').
    """
    splits = {}
    for name, layer in lora_layers(peft_model).items():
        if name not in bases:
            raise KeyError(f"no gate basis for LoRA module {name!r}")
        splits[name] = split_change(adapter_delta_weight(layer).double(), bases[name])
    return splits

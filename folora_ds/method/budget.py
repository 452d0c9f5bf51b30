"""The optional forgetting budget: τ adapted by dual ascent on the measured relative forgetting. Pure torch.

The measured forgetting F of the adapter is the mean over LoRA modules of each module's proxy-output change
relative to what the base layer itself does on proxy inputs (docs/method.md):

    F = (1/M) Σ_m tr(ΔW_m C_pre ΔW_mᵀ) / tr(W_m C_pre W_mᵀ),     ΔW = s·B·A  (LoRA starts with B = 0)

Each module is normalised by its own base energy before averaging. An earlier version divided the *sums*
(Σ penalty / Σ energy); on a real model (SmolLM2-135M) a few inputs carry massive activations — one coordinate of
layer 11's ``down_proj`` input holds 88% of a C_pre trace 2,000× the median input's — so that one module decided
the whole figure, and its ranking of runs disagreed with measured KL on held-out text (docs/results.md). The
per-module mean weighs every module's *relative* output change equally.

With a budget b, τ plays the role of the Lagrange multiplier of the constraint F ≤ b (a larger τ attenuates more
directions, so the next steps forget less). At every refresh, before the bases are re-solved:

    θ ← clip(θ + η · (F / b − 1), −ln m, ln m),      τ_used = τ · exp(θ)

η = ``budget_step_size``, m = ``budget_max_tau_scale``. Over budget (F > b) τ grows, under budget it relaxes back
towards the configured τ and below; the step is multiplicative so τ stays positive, and the clip bounds a run that
cannot meet its budget (its log says so). θ starts at 0, so τ_used equals the configured τ until the first refresh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from folora_ds.method.config import FoLoRAConfig

_COLUMNS = 2048
"""Columns of C_pre (and rows of W) converted to float64 at a time: at Llama-70B's d_ff = 28672 a whole float64
C_pre would be a 6.6 GB temporary on the owner at every refresh."""


def adapter_penalty(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, c_pre: torch.Tensor) -> torch.Tensor:
    """tr(ΔW C_pre ΔWᵀ) of one LoRA module, in float64, without forming ΔW.

    Args:
        lora_a: (r, d_in). lora_b: (d_out, r). scaling: s. c_pre: (d_in, d_in) proxy covariance (no ridge).

    Returns:
        A float64 scalar: s² · tr((BᵀB)(A C_pre Aᵀ)), O(r·d_in² + d_out·r²) instead of O(d_out·d_in²).
    """
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"adapter_penalty: A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} are not (r, d_in) "
                         "and (d_out, r)")
    if c_pre.shape != (lora_a.shape[1], lora_a.shape[1]):
        raise ValueError(f"adapter_penalty: C_pre {tuple(c_pre.shape)} does not match d_in = {lora_a.shape[1]}")
    a, b = lora_a.double(), lora_b.double()
    a_c_at = torch.zeros(a.shape[0], a.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, c_pre.shape[1], _COLUMNS):  # C_pre in float64 a block of columns at a time (70B: d_ff²)
        block = c_pre[:, start:start + _COLUMNS].to(device=a.device, dtype=torch.float64)
        a_c_at += (a @ block) @ a[:, start:start + _COLUMNS].mT
    return scaling * scaling * ((b.mT @ b) * a_c_at).sum()


def base_energy(weight: torch.Tensor, c_pre: torch.Tensor) -> torch.Tensor:
    """tr(W C_pre Wᵀ) of a frozen base weight W (d_out, d_in), in float64: the scale a module's penalty is
    measured against."""
    if weight.ndim != 2 or c_pre.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"base_energy: W {tuple(weight.shape)} and C_pre {tuple(c_pre.shape)} do not match")
    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    for start in range(0, c_pre.shape[1], _COLUMNS):  # never a float64 copy of the whole W or C_pre
        block = c_pre[:, start:start + _COLUMNS].to(device=weight.device, dtype=torch.float64)
        for row in range(0, weight.shape[0], _COLUMNS):
            rows = weight[row:row + _COLUMNS].double()
            total += ((rows @ block) * rows[:, start:start + _COLUMNS]).sum()
    return total


def relative_forgetting(penalties: Mapping[str, float], base_energies: Mapping[str, float]) -> float:
    """F = mean over modules of penalty / base energy (see the module docstring).

    Args:
        penalties: module name → tr(ΔW C_pre ΔWᵀ). base_energies: module name → tr(W C_pre Wᵀ), the same modules.

    Raises:
        ValueError: no module, other modules on the two sides, or a base energy that is not a finite number > 0.
    """
    if not penalties:
        raise ValueError("relative_forgetting: no LoRA module")
    if set(penalties) != set(base_energies):
        odd = sorted(set(penalties) ^ set(base_energies))[:3]
        raise ValueError(f"relative_forgetting: penalties and base energies cover other modules (e.g. {odd})")
    total = 0.0
    for name, penalty in penalties.items():
        energy = base_energies[name]
        if not (energy > 0 and math.isfinite(energy)):
            raise ValueError(f"relative_forgetting: module {name!r} has base energy {energy!r}; its inputs never "
                             "reached it on the proxy set")
        total += penalty / energy
    return total / len(penalties)


@dataclass
class TauDualAscent:
    """The multiplier θ of τ (τ_used = τ·exp(θ)) and its dual-ascent update (see the module docstring).

    Attributes:
        budget: b > 0, the allowed relative forgetting F.
        step_size: η > 0.
        max_scale: m ≥ 1; exp(θ) stays in [1/m, m].
        log_scale: θ, the current log multiplier.
        last_measured: F at the last update (None before the first).
    """

    budget: float
    step_size: float
    max_scale: float
    log_scale: float = 0.0
    last_measured: float | None = None

    def __post_init__(self) -> None:
        if not (self.budget > 0 and math.isfinite(self.budget)):
            raise ValueError(f"TauDualAscent: budget={self.budget!r} must be a finite number > 0")
        if not (self.step_size > 0 and math.isfinite(self.step_size)):
            raise ValueError(f"TauDualAscent: step_size={self.step_size!r} must be a finite number > 0")
        if not (self.max_scale >= 1 and math.isfinite(self.max_scale)):
            raise ValueError(f"TauDualAscent: max_scale={self.max_scale!r} must be a finite number >= 1")

    @property
    def tau_scale(self) -> float:
        """exp(θ): the factor applied to the configured τ."""
        return math.exp(self.log_scale)

    def update(self, measured: float) -> float:
        """One dual-ascent step from the measured relative forgetting F; returns the new τ scale.

        Raises:
            ValueError: ``measured`` is negative or not finite (broken statistics must not steer τ).
        """
        if not (measured >= 0 and math.isfinite(measured)):
            raise ValueError(f"forgetting budget: measured relative penalty {measured!r} is not a finite number >= 0")
        bound = math.log(self.max_scale)
        self.log_scale = min(bound, max(-bound, self.log_scale + self.step_size * (measured / self.budget - 1.0)))
        self.last_measured = float(measured)
        return self.tau_scale

    def state_dict(self) -> dict:
        return {"log_scale": self.log_scale, "last_measured": self.last_measured}

    def load_state_dict(self, state: dict) -> None:
        self.log_scale = float(state["log_scale"])
        self.last_measured = state["last_measured"]


def budget_from_config(config: FoLoRAConfig) -> TauDualAscent | None:
    """The τ dual ascent of ``config.forgetting_budget`` (None when the budget is off)."""
    if config.forgetting_budget is None:
        return None
    return TauDualAscent(budget=config.forgetting_budget, step_size=config.budget_step_size,
                         max_scale=config.budget_max_tau_scale)

"""The FoLoRA math: gates from the generalized eigenvalues, and the solve failure policy (``SpectralSolver``).

The eigensolve itself is ``folora_ds.method.eigensolve``; the projector, ``folora_ds.method.projector``.

Pure torch: no ``torch.distributed`` here (collectives live in ``folora_ds.distributed``).

For one adapted input (shared by e.g. q/k/v) with input dimension d:

    C̃ = C_pre + δ·(tr C_pre / d)·I                          (relative ridge)
    C_task v = λ C̃ v      ⇔   L = chol(C̃),  L⁻¹ C_task L⁻ᵀ = Q Λ Qᵀ,  V = L⁻ᵀ Q
    Vᵀ C̃ V = I,   Vᵀ C_task V = Λ,   C̃ V = L Q

The gates g(λ) of these directions define P_g; ``folora_ds.method.projector`` stores and applies it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.eigensolve import (
    ConsecutiveSolveFailuresError,
    SpectralSolveError,
    solve_generalized_eigenproblem,
)
from folora_ds.method.projector import Projector, build_projector, select_directions

NULL_SPACE_RTOL = 1e-6
"""Generalized eigenvalues below this fraction of the largest are C_task's null space seen through round-off."""


def zero_null_space(eigenvalues: torch.Tensor) -> torch.Tensor:
    """λ with every λ < NULL_SPACE_RTOL · max λ set to exactly 0.

    Task inputs that span fewer than d directions (a narrow vocabulary at layer 0, few tokens) leave C_task a null
    space whose eigenvalues are round-off: ±1e-16 relative with float64 statistics, ~1e-7 with float32, and
    different for every summation order (so for every number of ranks). As exact zeros they get gate 0 exactly,
    form one tied cluster (``select_directions``), and no longer pull the relative τ's median down.
    """
    largest = float(eigenvalues.max()) if eigenvalues.numel() else 0.0
    return torch.where(eigenvalues >= NULL_SPACE_RTOL * largest, eigenvalues, torch.zeros_like(eigenvalues))


def effective_tau(eigenvalues: torch.Tensor, tau: float, tau_mode: str) -> float:
    """τ in eigenvalue units: ``tau`` itself ("absolute") or ``tau`` × the median positive λ ("relative_median").

    The median is taken over positive eigenvalues because with fewer task tokens than d, C_task is rank
    deficient and most λ are exactly zero; the median of all λ would then be zero.
    """
    if tau_mode == "absolute":
        return float(tau)
    if tau_mode != "relative_median":
        raise ValueError(f"tau_mode={tau_mode!r}; allowed: 'relative_median', 'absolute'")
    positive = eigenvalues[eigenvalues > 0]
    if positive.numel() == 0:
        raise ValueError("relative τ needs at least one positive eigenvalue; C_task is zero for this input")
    return float(tau) * float(positive.median())  # the lower middle value for an even count


def gate_values(eigenvalues: torch.Tensor, *, kind: str, tau: float, temperature: float = 1.0) -> torch.Tensor:
    """Per-direction gates g ∈ [0, 1] from eigenvalues λ (any shape) and an absolute τ > 0.

    rational: λ/(λ+τ), the minimiser of ‖Δ′−Δ‖²_{C_task} + τ‖Δ′‖²_{C̃};
    sigmoid:  sigmoid((ln λ − ln τ)/T), equal to the rational gate at T = 1;
    hard:     1 where λ ≥ τ, else 0 (the T → 0 limit).
    Slightly negative λ (round-off of a PSD pencil) count as 0.
    """
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"gate needs a finite τ > 0, got {tau!r}")
    lam = eigenvalues.clamp_min(0)
    if kind == "rational":
        return lam / (lam + tau)
    if kind == "sigmoid":
        if not temperature > 0:
            raise ValueError(f"sigmoid gate needs temperature > 0, got {temperature!r}")
        log_lam = torch.log(lam.clamp_min(torch.finfo(lam.dtype).tiny))
        return torch.sigmoid((log_lam - math.log(tau)) / temperature)
    if kind == "hard":
        return (lam >= tau).to(lam.dtype)
    raise ValueError(f"gate kind {kind!r}; allowed: 'rational', 'sigmoid', 'hard'")


@dataclass(frozen=True)
class SolveReport:
    """What one solve of one input produced (for logging and the per-layer summary).

    Attributes:
        key: the input's name.
        eigenvalues: (d,) ascending λ of the basis in use.
        gates: (d,) gates of all directions (effective rank = gates.sum()).
        tau: absolute τ used.
        ridge: relative ridge used.
        failed: this attempt failed and the previous basis was kept.
        consecutive_failures: failures in a row for this key after this attempt.
        stored: directions the projector stores (≤ k); the others are gated at ``base_gate``.
        base_gate: the gate of every direction not stored (1 for the usual truncation).
        approximated: directions whose gate differs from ``base_gate`` by more than the tie tolerance but are not
            stored (k too small; 0 = exact).
        split_ties: of those, directions of tied clusters left out whole instead of being split by k.
    """

    key: str
    eigenvalues: torch.Tensor
    gates: torch.Tensor
    tau: float
    ridge: float
    failed: bool
    consecutive_failures: int
    stored: int = 0
    base_gate: float = 1.0
    approximated: int = 0
    split_ties: int = 0


class SpectralSolver:
    """Solves bases per input key under the configured failure policy, keeping the last good basis.

    A first solve that fails raises (training must not start without a basis). A later failed re-solve keeps
    the previous basis and counts the failure; ``max_consecutive_failures`` failures in a row raise
    ``ConsecutiveSolveFailuresError`` naming the input.
    """

    def __init__(self, config: FoLoRAConfig) -> None:
        self.config = config
        self._projectors: dict[str, Projector] = {}
        self._reports: dict[str, SolveReport] = {}
        self._consecutive_failures: dict[str, int] = {}

    def solve(self, key: str, c_task: torch.Tensor, c_pre: torch.Tensor, *,
              tau_scale: float = 1.0) -> tuple[Projector, SolveReport]:
        """Solve one input; returns the projector in use and a report. See the class docstring for failures.

        ``tau_scale`` multiplies the configured τ (the forgetting budget's dual-ascent factor, 1 without one).
        """
        cfg = self.config
        try:
            result = solve_generalized_eigenproblem(
                c_task, c_pre, ridge=cfg.ridge, max_ridge_escalations=cfg.max_ridge_escalations,
                solve_dtype=getattr(torch, cfg.solve_dtype), retry_float64=cfg.retry_float64, layer=key)
            if not bool((result.eigenvalues > 0).any()):
                raise SpectralSolveError(key, "C_task is zero (no task tokens reached this input)")
            eigenvalues = zero_null_space(result.eigenvalues)
            tau = effective_tau(eigenvalues, cfg.tau, cfg.tau_mode) * tau_scale
            gates = gate_values(eigenvalues, kind=cfg.gate, tau=tau, temperature=cfg.temperature)
        except SpectralSolveError as error:
            if key not in self._projectors:
                raise
            failures = self._consecutive_failures[key] + 1
            self._consecutive_failures[key] = failures
            if failures >= cfg.max_consecutive_failures:
                raise ConsecutiveSolveFailuresError(
                    f"{key!r}: {failures} consecutive solve failures (max_consecutive_failures="
                    f"{cfg.max_consecutive_failures}); last: {error}") from error
            report = dataclasses.replace(self._reports[key], failed=True, consecutive_failures=failures)
            self._reports[key] = report
            return self._projectors[key], report
        choice = select_directions(gates, cfg.k, cfg.gate_tie_tolerance)
        projector = build_projector(result, gates, cfg.k, choice=choice)
        report = SolveReport(key, result.eigenvalues, gates, tau, result.ridge, failed=False,
                             consecutive_failures=0, stored=choice.indices.numel(), base_gate=choice.base,
                             approximated=choice.approximated, split_ties=choice.split_ties)
        self._projectors[key] = projector
        self._reports[key] = report
        self._consecutive_failures[key] = 0
        return projector, report

    def state_dict(self) -> dict:
        """The last good projector, report and failure count per key (tensors on CPU)."""
        return {key: {"projector": {"c_tilde_v": p.c_tilde_v.cpu(), "v": p.v.cpu(), "gates": p.gates.cpu(),
                                    "base": p.base},
                      "report": {name: value.cpu() if isinstance(value, torch.Tensor) else value
                                 for name, value in dataclasses.asdict(self._reports[key]).items()},
                      "consecutive_failures": self._consecutive_failures[key]}
                for key, p in self._projectors.items()}

    def load_state_dict(self, state: dict, keys: list[str] | None = None) -> None:
        """Restore (a subset of) the keys saved by ``state_dict``."""
        for key in (state if keys is None else keys):
            entry = state[key]
            self._projectors[key] = Projector(**entry["projector"])
            self._consecutive_failures[key] = entry["consecutive_failures"]
            self._reports[key] = SolveReport(**entry["report"])

    def projector(self, key: str) -> Projector:
        """The projector in use for ``key``."""
        return self._projectors[key]

    @property
    def reports(self) -> dict[str, SolveReport]:
        """Latest report per key."""
        return dict(self._reports)

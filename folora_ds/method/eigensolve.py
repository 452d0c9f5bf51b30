"""The generalized eigensolve of one input, C_task v = λ C̃ v, and its errors. Pure torch.

For one adapted input (shared by e.g. q/k/v) with input dimension d:

    C̃ = C_pre + δ·(tr C_pre / d)·I                          (relative ridge)
    C_task v = λ C̃ v      ⇔   L = chol(C̃),  L⁻¹ C_task L⁻ᵀ = Q Λ Qᵀ,  V = L⁻ᵀ Q
    Vᵀ C̃ V = I,   Vᵀ C_task V = Λ,   C̃ V = L Q

The result keeps the factors (L, Q), so a width-k projector (``folora_ds.method.projector``) computes only the k
columns it stores; the gates and the failure policy are ``folora_ds.method.spectral``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class SpectralSolveError(RuntimeError):
    """A generalized eigensolve failed for the input named ``layer``."""

    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(f"spectral solve failed for {layer!r}: {reason}")
        self.layer = layer
        self.reason = reason


class NonFiniteStatisticsError(SpectralSolveError):
    """C_task or C_pre of ``layer`` contains NaN or Inf (e.g. an overflowing activation or a bad rank)."""


class ConsecutiveSolveFailuresError(RuntimeError):
    """The solve of one input failed more times in a row than the configured policy tolerates."""


@dataclass(frozen=True)
class GeneralizedEigenResult:
    """Solution of C_task v = λ C̃ v for one input, kept as its factors so that a width-k projector computes only
    the k columns it stores (at d = 28672 each full (d, d) matrix is 6.6 GB in float64).

    Attributes:
        eigenvalues: (d,) ascending generalized eigenvalues λ.
        lower: (d, d) L = chol(C̃). q: (d, d) Q, the eigenvectors of L⁻¹ C_task L⁻ᵀ.
        ridge: the relative ridge δ finally used (after escalations).
        dtype: the dtype the successful solve ran in.
    """

    eigenvalues: torch.Tensor
    lower: torch.Tensor
    q: torch.Tensor
    ridge: float
    dtype: torch.dtype

    def columns(self, indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V[:, indices], C̃V[:, indices])`` with V = L⁻ᵀ Q (C̃-orthonormal columns) and C̃V = L Q, the map from
        a row to its spectral coordinates; all d columns for ``indices=None``."""
        q = self.q if indices is None else self.q[:, indices]
        return torch.linalg.solve_triangular(self.lower.mT, q, upper=True), self.lower @ q

    @property
    def eigenvectors(self) -> torch.Tensor:
        """(d, d) V, columns C̃-orthonormal (Vᵀ C̃ V = I); computed on each access."""
        return self.columns()[0]

    @property
    def c_tilde_v(self) -> torch.Tensor:
        """(d, d) C̃ V = L Q; computed on each access."""
        return self.columns()[1]


def check_statistics(c_task: torch.Tensor, c_pre: torch.Tensor, layer: str) -> None:
    """Raise ValueError for shapes that are not one (d, d) pair, NonFiniteStatisticsError for NaN/Inf."""
    for name, matrix in (("C_task", c_task), ("C_pre", c_pre)):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"{layer!r}: {name} must be a square (d, d) matrix, got shape {tuple(matrix.shape)}")
    if c_task.shape != c_pre.shape:
        raise ValueError(f"{layer!r}: C_task {tuple(c_task.shape)} and C_pre {tuple(c_pre.shape)} differ in shape")
    for name, matrix in (("C_task", c_task), ("C_pre", c_pre)):
        # a NaN/Inf anywhere makes the sum one: one pass in the matrix's own dtype, no (d, d) mask (a float64
        # accumulation was 15x slower: 5 s of a 69 s refresh at d = 28672); a finite matrix whose float32 sum
        # overflows takes the exact check
        if not bool(torch.isfinite(matrix.sum())) and not bool(torch.isfinite(matrix).all()):
            raise NonFiniteStatisticsError(layer, f"{name} contains NaN or Inf")


def _solve_once(c_task: torch.Tensor, c_pre: torch.Tensor, dtype: torch.dtype, ridge: float,
                max_ridge_escalations: int, layer: str) -> GeneralizedEigenResult:
    """One solve in ``dtype``. The inputs are cast one at a time and every intermediate is dropped as soon as it is
    used, so the peak is 5 (d, d) matrices of ``dtype`` besides the inputs (L, the whitened matrix, Q and eigh's
    2·d² workspace; ``benchmarks/eigensolve.py`` measures it)."""
    d = c_pre.shape[0]
    scale = float(torch.trace(c_pre)) / d
    if not scale > 0:
        raise SpectralSolveError(layer, "C_pre has zero trace (no proxy tokens reached this input)")
    for escalation in range(max_ridge_escalations + 1):
        ridge_used = ridge * 10.0**escalation
        shifted = c_pre.to(dtype, copy=True)
        shifted.diagonal().add_(ridge_used * scale)
        lower, info = torch.linalg.cholesky_ex(shifted)
        del shifted
        if int(info) == 0:
            break
    else:
        raise SpectralSolveError(layer, f"Cholesky of C̃ failed up to ridge {ridge_used:g}")
    half = torch.linalg.solve_triangular(lower, c_task.to(dtype), upper=False)  # L⁻¹ C_task
    whitened = torch.linalg.solve_triangular(lower, half.mT, upper=False)  # L⁻¹ C_task L⁻ᵀ
    del half
    whitened = whitened + whitened.mT
    whitened.mul_(0.5)
    try:
        eigenvalues, q = torch.linalg.eigh(whitened)
    except torch.linalg.LinAlgError as error:
        raise SpectralSolveError(layer, f"eigh did not converge in {dtype}: {error}") from error
    del whitened
    if not (torch.isfinite(eigenvalues).all() and torch.isfinite(q).all()):
        raise SpectralSolveError(layer, f"non-finite eigenpairs in {dtype}")
    return GeneralizedEigenResult(eigenvalues, lower, q, ridge_used, dtype)


def solve_generalized_eigenproblem(
    c_task: torch.Tensor,
    c_pre: torch.Tensor,
    *,
    ridge: float = 1e-3,
    max_ridge_escalations: int = 6,
    solve_dtype: torch.dtype = torch.float64,
    retry_float64: bool = True,
    layer: str = "<unnamed>",
) -> GeneralizedEigenResult:
    """Solve C_task v = λ (C_pre + δ·(tr C_pre/d)·I) v with ridge escalation and a float64 retry.

    Args:
        c_task: (d, d) symmetric PSD task input covariance.
        c_pre: (d, d) symmetric PSD pretraining-proxy input covariance.
        ridge: relative ridge δ; multiplied by 10 after each Cholesky failure.
        max_ridge_escalations: escalations tried before giving up.
        solve_dtype: dtype of the solve (float64 is exact enough everywhere; float32 is faster on GPUs).
        retry_float64: if a float32 solve fails, retry once in float64.
        layer: name used in errors.

    Returns:
        The eigenvalues in ascending order with the factors of the eigenvectors (``columns``), the ridge and the
        dtype actually used.

    Raises:
        NonFiniteStatisticsError: an input holds NaN/Inf.
        SpectralSolveError: C_pre is zero, or the solve failed in every allowed precision and ridge.
        ValueError: shapes are not (d, d) or differ.
    """
    check_statistics(c_task, c_pre, layer)
    try:
        return _solve_once(c_task, c_pre, solve_dtype, ridge, max_ridge_escalations, layer)
    except SpectralSolveError:
        if solve_dtype == torch.float64 or not retry_float64:
            raise
    return _solve_once(c_task, c_pre, torch.float64, ridge, max_ridge_escalations, layer)


def generalized_eigh(c_task: torch.Tensor, c_pre: torch.Tensor, ridge: float = 1e-3,
                     **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues (d,), V (d, d))`` ascending like ``torch.linalg.eigh``; see solve_generalized_eigenproblem."""
    result = solve_generalized_eigenproblem(c_task, c_pre, ridge=ridge, **kwargs)
    return result.eigenvalues, result.eigenvectors

"""Random covariances, solves and projectors shared by the spectral and projector tests."""

from __future__ import annotations

import math

import torch

from folora_ds.method.eigensolve import GeneralizedEigenResult, solve_generalized_eigenproblem

F64 = torch.float64


def spd(d: int, seed: int, *, tokens: int | None = None, dtype: torch.dtype = F64) -> torch.Tensor:
    """A covariance X Xᵀ / n of ``tokens`` random Gaussian inputs (rank-deficient when tokens < d)."""
    generator = torch.Generator().manual_seed(seed)
    n = 3 * d if tokens is None else tokens
    scales = torch.rand(d, generator=generator, dtype=F64) + 0.1
    x = torch.randn(n, d, generator=generator, dtype=F64) * scales
    return (x.mT @ x / n).to(dtype)


def ill_conditioned(d: int, seed: int, condition: float) -> torch.Tensor:
    """Q diag(λ) Qᵀ with λ spread logarithmically from 1 down to 1/condition."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=F64))
    spectrum = torch.logspace(0.0, -math.log10(condition), d, dtype=F64)
    matrix = q @ torch.diag(spectrum) @ q.mT
    return 0.5 * (matrix + matrix.mT)


def ridged(c_pre: torch.Tensor, ridge: float) -> torch.Tensor:
    d = c_pre.shape[0]
    return c_pre + ridge * (torch.trace(c_pre) / d) * torch.eye(d, dtype=c_pre.dtype)


def solve_random(d: int = 12, seed: int = 0, **kwargs) -> tuple[GeneralizedEigenResult, torch.Tensor]:
    c_pre = spd(d, seed)
    result = solve_generalized_eigenproblem(spd(d, seed + 100), c_pre, **kwargs)
    return result, ridged(c_pre, result.ridge)


def dense_projector(result: GeneralizedEigenResult, gates: torch.Tensor) -> torch.Tensor:
    """P_g = (C̃V) · diag(g) · Vᵀ over all d directions."""
    return result.c_tilde_v @ torch.diag(gates) @ result.eigenvectors.mT


def random_rows(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def c_norm(rows: torch.Tensor, c_tilde: torch.Tensor) -> torch.Tensor:
    return ((rows @ c_tilde) * rows).sum(-1).sqrt()

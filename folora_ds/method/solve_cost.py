"""What one input's refresh solve costs: time at a machine's full-solve rate, and transient memory. Pure arithmetic.

The full solve (Cholesky, whitening, ``eigh``) is cubic: t = r·(d/1000)³ with r measured per machine
(``folora-ds plan`` times a d = 768 solve, or takes ``--solve-rate``). The top-k solver (``topk_eigensolve``) costs a
Cholesky (d³/3) and operator applications (d² per column), modelled in units of the same r so one measured rate
scales both.
"""

from __future__ import annotations

import torch

from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.spectral import solves_top_k

SOLVE_WORKSPACE_MATRICES = 5
"""The full solve's transient (d, d) matrices of the solve dtype: L, the whitened matrix, Q and ``eigh``'s 2·d²
workspace (the inputs cast one at a time inside that peak; ``benchmarks/eigensolve.py`` measures 2.6-3.9 at
d = 4096-14336 in float32)."""
TOP_K_WORKSPACE_MATRICES = 3
"""A top-k solve's transient (d, d) matrices: C̃ in the solve dtype and, for the smallest end, C_task + εC̃ and K;
its factor L of C̃ is kept between refreshes (``plan``'s ``solve_factors``)."""
TOP_K_FACTOR_SHARE = 0.035
TOP_K_COLUMN_SHARE = 7.9e-4
TOP_K_KRYLOV_BLOCKS = 16
"""A top-k solve in units of the full solve's rate r (s per (d/1000)³):
t ≈ r·(TOP_K_FACTOR_SHARE·(d/1000)³ + TOP_K_COLUMN_SHARE·C·(d/1000)²) with C = 640 + TOP_K_KRYLOV_BLOCKS·(k + 16)
operator columns (SLQ's 16 x 40 and the block-Krylov iteration's blocks: 13 per pass of depth 12, a restart or
so more cold), a Cholesky's share fixed at its ~1/28 of the full solve and the column share fitted to
``benchmarks/eigensolve.py``'s float32 first solves at d = 4096-28672, k = 64, ``top_k_residual`` 1e-3, on 2 CPU
cores (2026-12-06: within 20% of each, 119 s predicted against 107 s measured at 28672; docs/benchmarks.md). A
refresh beside a null space keeps L and costs less. It holds beside a null space of C_task; a full-rank C_task
whose smallest λ cluster can cost more than the full solve (``plan`` prints that bound)."""


def top_k_columns(k: int) -> int:
    """The operator columns the cost model counts for a top-k solve of k stored directions."""
    return 640 + TOP_K_KRYLOV_BLOCKS * (k + 16)


def solve_seconds(dim: int, folora: FoLoRAConfig, rate: float) -> float:
    """Seconds of one input's solve at the full solve's ``rate`` (s per (d/1000)³): r·(d/1000)³, or the top-k
    model (``TOP_K_COLUMN_SHARE``) for an input ``solves_top_k`` solves that way."""
    size = dim / 1000
    if not solves_top_k(folora, dim):
        return rate * size ** 3
    return rate * (TOP_K_FACTOR_SHARE * size ** 3 + TOP_K_COLUMN_SHARE * top_k_columns(folora.k) * size ** 2)


def solve_workspace(dim: int, folora: FoLoRAConfig) -> int:
    """Transient bytes of one input's solve: ``SOLVE_WORKSPACE_MATRICES`` (d, d) matrices of the solve dtype, or
    ``TOP_K_WORKSPACE_MATRICES`` for a top-k input."""
    matrices = TOP_K_WORKSPACE_MATRICES if solves_top_k(folora, dim) else SOLVE_WORKSPACE_MATRICES
    return matrices * dim ** 2 * getattr(torch, folora.solve_dtype).itemsize

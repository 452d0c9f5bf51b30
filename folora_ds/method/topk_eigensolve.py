"""Top-k generalized eigenpairs of a wide input (k ≪ d) without the d × d eigendecomposition. Pure torch.

A width-k projector stores k directions and gives every other one a shared base gate
(``projector.select_directions``); the full solve (``eigensolve``) computes all d eigenpairs to pick them, ~450×
more than a k = 64 projector keeps at d = 28,672. What the choice really needs is

1. the *distribution* of the d eigenvalues — τ is relative to their median, the base gate is 1 or the gate of the
   null-space cluster (λ = 0, when C_task has fewer task tokens than d), and the layer summary reports Σg — which
   stochastic Lanczos quadrature (SLQ) of M below estimates from 40 block applications (``generalized_spectrum``);
2. the k eigenpairs at the end the projector stores: the most attenuated directions (smallest λ, base 1) or,
   beside a large null space, the most useful ones (largest λ, base 0). A randomized block Krylov iteration with
   Rayleigh–Ritz finds them (``top_eigenpairs``), warm-started from the previous solve's directions, and reports
   whether every residual converged; the caller falls back to the full solve when not.

Operators (C̃ = C_pre + ridge·I as in ``eigensolve``; applied to (d, b) blocks, never formed):

    largest λ:   M = L⁻¹ C_task L⁻ᵀ,           L = chol(C̃),            eigenvalues λ,          v = L⁻ᵀ y
    smallest λ:  N = K⁻¹ C̃ K⁻ᵀ,               K = chol(C_task + εC̃),   eigenvalues 1/(λ + ε),  v = K⁻ᵀ y / √ν

Each costs one Cholesky (d³/3), against ~10 d³ for the full solve's whitening and eigh; ε is a tiny multiple of
tr C_task / tr C̃ that makes C_task + εC̃ positive definite without moving any λ the gate can tell from 0. L also
serves SLQ, so a solve beside a null space needs one factor (and a refresh none, ``SpectralSolver`` keeping L).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Operator = Callable[[torch.Tensor], torch.Tensor]


def residual_tolerance(dtype: torch.dtype) -> float:
    """The relative residual (``TopEigenpairs.residual``) a solve in ``dtype`` must reach: 1e-8, or 256 machine
    epsilons where that is coarser. float32's triangular solves stall near 5e-6 at d = 1024 (measured), so float32
    converges at 3.1e-5, its λ to that fraction of λ_max: below what a gate can tell."""
    return max(1e-8, 256 * torch.finfo(dtype).eps)


@dataclass(frozen=True)
class SpectrumEstimate:
    """The distribution of an operator's d eigenvalues as a discrete measure: ``nodes`` with ``weights`` (sum 1).

    From SLQ, E[f(λ)] = Σ w·f(node) approximates tr f(A)/d: a smooth f (a gate, so Σg) to ~1% at d in the
    hundreds to thousands; a quantile only through a smoothed CDF (``median``)."""

    nodes: torch.Tensor
    weights: torch.Tensor
    probes: int = 1

    def share_deviation(self, share: float, dim: int) -> float:
        """The standard deviation of an estimated share p of the d eigenvalues (e.g. the null space's): each
        Rademacher probe's xᵀPx/d has variance ≈ 2p(1 − p)/d, averaged over ``probes``."""
        return math.sqrt(2 * share * (1 - share) / (dim * self.probes))

    def with_null_share(self, share: float) -> SpectrumEstimate:
        """This measure with its lowest ``share`` of mass moved to λ = 0 exactly.

        A C_task of n < d token rows has a null space of at least d − n directions. Lanczos separates it from the
        positive λ only when they are far from 0: beside positive λ of ~1e-3 λ_max (a window folded into the EMA),
        40 steps leave Gauss nodes that mix the two, so no mass falls below the null threshold and the median of
        the "positive" λ lands among them. Moving the counted null share to 0 restores it (the nodes it comes
        from are the lowest, where the null space's mass sits)."""
        if not 0.0 <= share < 1.0:
            raise ValueError(f"null share {share!r} must be in [0, 1): some mass must stay positive")
        order = torch.argsort(self.nodes)
        nodes, weights = self.nodes[order], self.weights[order]
        below = torch.cumsum(weights, 0) - weights
        moved = (share * weights.sum() - below).clamp_min(0).minimum(weights)
        return SpectrumEstimate(torch.cat([nodes.new_zeros(1), nodes]),
                                torch.cat([moved.sum().reshape(1), weights - moved]), self.probes)

    def mean(self, values: torch.Tensor) -> float:
        """Σ w·values, ``values`` = f(nodes)."""
        return float((self.weights * values).sum())

    def median(self, *, above: float = 0.0, bandwidth: float = 0.25) -> float:
        """The median of the measure restricted to nodes > ``above``: where its CDF, smoothed in log λ by a
        logistic kernel of ``bandwidth``, crosses 1/2. A Gauss quadrature's CDF is a staircase whose steps in the
        bulk of a spectrum spanning decades are wide; the smoothed CDF is a smooth function of the spectrum,
        which SLQ estimates well (``tests/unit/method/test_topk_eigensolve.py`` states the accuracy)."""
        keep = self.nodes > above
        if not bool(keep.any()):
            raise ValueError("no spectrum mass above the threshold")
        logs, weights = self.nodes[keep].log(), self.weights[keep] / self.weights[keep].sum()
        low, high = float(logs.min()), float(logs.max())
        for _ in range(64):
            middle = (low + high) / 2
            below = float((weights * torch.sigmoid((middle - logs) / bandwidth)).sum())
            low, high = (middle, high) if below < 0.5 else (low, middle)
        return float(torch.tensor((low + high) / 2).exp())


def lanczos_quadrature(apply: Operator, dim: int, *, probes: int = 16, steps: int = 40, dtype=torch.float64,
                       generator: torch.Generator | None = None, device=None) -> SpectrumEstimate:
    """SLQ: ``probes`` Rademacher vectors run ``steps`` Lanczos steps together on ``device`` (fully
    reorthogonalized); the eigenvalues of each tridiagonal are nodes, the squared first components of its
    eigenvectors the weights (on the CPU: a few hundred numbers)."""
    steps = min(steps, dim)
    signs = torch.randint(0, 2, (dim, probes), generator=generator, dtype=torch.int64)  # drawn on the CPU
    vector = ((signs.to(dtype) * 2 - 1) / dim ** 0.5).to(device)
    basis = torch.empty(steps, dim, probes, dtype=dtype, device=device)
    alphas = torch.zeros(steps, probes, dtype=dtype, device=device)
    betas = torch.zeros(steps, probes, dtype=dtype, device=device)
    previous, beta = torch.zeros_like(vector), torch.zeros(probes, dtype=dtype)
    used = steps
    for step in range(steps):
        basis[step] = vector
        w = apply(vector) - beta * previous
        alpha = (w * vector).sum(0)
        w = w - alpha * vector
        coefficients = torch.einsum("sdp,dp->sp", basis[:step + 1], w)  # full reorthogonalization
        w = w - torch.einsum("sdp,sp->dp", basis[:step + 1], coefficients)
        alphas[step] = alpha
        beta = w.norm(dim=0)
        if step + 1 < steps:
            betas[step] = beta
            if bool((beta <= 1e-12 * alphas[: step + 1].abs().amax(0).clamp_min(1e-300)).any()):
                used = step + 1  # an invariant subspace: the quadrature is exact for that probe
                break
        previous, vector = vector, w / beta.clamp_min(1e-300)
    nodes, weights = [], []
    alphas, betas = alphas.cpu(), betas.cpu()
    for probe in range(probes):
        tridiagonal = torch.diag(alphas[:used, probe])
        off = betas[:used - 1, probe]
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        nodes.append(values)
        weights.append(vectors[0] ** 2 / probes)
    return SpectrumEstimate(torch.cat(nodes), torch.cat(weights), probes)


def _orthonormal(block: torch.Tensor, against: torch.Tensor | None) -> torch.Tensor:
    """``block``'s columns orthonormalized against ``against``'s (orthonormal) and among themselves: classical
    Gram–Schmidt twice, then QR."""
    if against is not None and against.shape[1]:
        for _ in range(2):
            block = block - against @ (against.mT @ block)
    q, _ = torch.linalg.qr(block)
    return q


def _grown(matrix: torch.Tensor | None, column: torch.Tensor) -> torch.Tensor:
    """The symmetric (m + b, m + b) matrix of ``matrix`` (m, m) and a new column block ``column`` (m + b, b) whose
    last b rows are the new diagonal block (symmetrized): a Gram matrix grown one block of the basis at a time."""
    old = 0 if matrix is None else matrix.shape[0]
    corner = column[old:]
    if matrix is None:
        return (corner + corner.mT) / 2
    top = torch.cat([matrix, column[:old]], 1)
    return torch.cat([top, torch.cat([column[:old].mT, (corner + corner.mT) / 2], 1)], 0)


def _ritz(gram: torch.Tensor, small: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rayleigh–Ritz in the coordinates of a basis W with Gram matrix ``gram`` = WᵀW and ``small`` = WᵀAW: the Ritz
    values (descending) and the coefficients C (Ritz vectors = W·C). The Gram matrix absorbs the round-off of the
    block Gram–Schmidt; directions the basis no longer adds (it spans the space, or A has a null space) are
    dropped."""
    gram_values, gram_vectors = torch.linalg.eigh(gram)
    kept = gram_values > 1e-10 * gram_values.max()
    transform = gram_vectors[:, kept] / gram_values[kept].sqrt()
    projected = transform.mT @ small @ transform
    ritz_values, ritz_vectors = torch.linalg.eigh((projected + projected.mT) / 2)
    order = torch.argsort(ritz_values, descending=True)
    return ritz_values[order], transform @ ritz_vectors[:, order]


@dataclass(frozen=True)
class TopEigenpairs:
    """The k largest eigenpairs of a symmetric operator (descending), the largest relative residual
    ‖A y − θ y‖ / θ_max, whether every residual is below the tolerance, and the operator applications used."""

    values: torch.Tensor
    vectors: torch.Tensor
    residual: float
    converged: bool
    applications: int


def top_eigenpairs(apply: Operator, dim: int, k: int, *, start: torch.Tensor | None = None, oversample: int = 16,
                   depth: int = 12, restarts: int = 8, tolerance: float | None = None, dtype=torch.float64,
                   generator: torch.Generator | None = None, device=None) -> TopEigenpairs:
    """Randomized block Krylov with Rayleigh–Ritz: the block (d, k + oversample) — ``start``'s columns first (a
    warm start), random ones after — grows ``depth`` Krylov blocks, the top Ritz pairs of the whole basis restart
    it (their images where the basis could not grow past one block: k + oversample > d/2), until every one of the k
    pairs has a relative residual ≤ ``tolerance`` (default ``residual_tolerance`` of ``dtype``) or ``restarts`` run
    out.

    Depth 12 rather than 6: on a dense top of the spectrum (k = 64 of d = 8192) the deeper basis converged in one
    pass where depth 6 restarted twice, with 0.6x the applications (1,296 against 2,106 at float32's tolerance;
    docs/benchmarks.md). The basis and its images live in two preallocated (d, (depth + 1)·width) buffers, and
    WᵀW and WᵀAW grow a block at a time (``_grown``): the Rayleigh–Ritz step after each block costs d·m·(width + k)
    for a basis of m columns, not the d·m² of recomputing them (27 of 90 s at d = 28672 before)."""
    tolerance = residual_tolerance(dtype) if tolerance is None else tolerance
    width = min(k + oversample, dim)
    levels = max(1, min(depth + 1, dim // width))  # a basis of at most d columns
    block = torch.randn(dim, width, generator=generator, dtype=dtype).to(device)  # drawn on the CPU: any device
    if start is not None:
        columns = min(start.shape[1], width)
        block[:, :columns] = start[:, :columns].to(dtype)
    basis = torch.empty(dim, levels * width, dtype=dtype, device=device)
    images = torch.empty_like(basis)
    applications, values, vectors, residual = 0, None, None, float("inf")
    for _ in range(restarts):
        gram = small = None
        used = 0
        q = _orthonormal(block, None)
        for level in range(levels):  # a Rayleigh–Ritz check after each block: a warm start stops early
            basis[:, used:used + width], images[:, used:used + width] = q, apply(q)
            applications += width
            used += width
            whole, image = basis[:, :used], images[:, :used]
            gram = _grown(gram, whole.mT @ q)
            small = _grown(small, whole.mT @ image[:, -width:])
            ritz_values, coefficients = _ritz(gram, small)
            values, vectors = ritz_values[:k], whole @ coefficients[:, :k]
            residuals = (image @ coefficients[:, :k] - vectors * values).norm(dim=0)
            residual = float(residuals.max() / ritz_values[0].abs().clamp_min(1e-300))
            if residual <= tolerance or coefficients.shape[1] >= dim:
                return TopEigenpairs(values, vectors, residual, True, applications)
            if level + 1 < levels:
                q = _orthonormal(image[:, -width:], whole)
        # restart from the Ritz vectors; where the basis could not grow past one block (k + oversample > d/2),
        # from their images (one subspace-iteration step, no extra application): the same span would not move
        block = (image if used == width else whole) @ coefficients[:, :width]
        if block.shape[1] < width:  # the Gram matrix dropped directions: fill the block up with random ones
            fill = torch.randn(dim, width - block.shape[1], generator=generator, dtype=dtype).to(device)
            block = torch.cat([block, fill], 1)
    return TopEigenpairs(values, vectors, residual, False, applications)


@dataclass(frozen=True)
class GeneralizedTopK:
    """k generalized eigenpairs at one end of the spectrum of C_task v = λ C̃ v.

    Attributes:
        eigenvalues: (k,) λ of the stored directions, ascending.
        v: (d, k) their eigenvectors, C̃-orthonormal (Vᵀ C̃ V = I). c_tilde_v: (d, k) C̃ V.
        end: "smallest" or "largest". residual / converged / applications: as ``TopEigenpairs``.
    """

    eigenvalues: torch.Tensor
    v: torch.Tensor
    c_tilde_v: torch.Tensor
    end: str
    residual: float
    converged: bool
    applications: int


def shifted_cholesky(c_task: torch.Tensor, c_tilde: torch.Tensor, *, shift: float = 1e-8,
                     escalations: int = 6) -> tuple[torch.Tensor, float]:
    """(K, ε) with K = chol(C_task + ε·C̃), ε = ``shift`` · tr C_task / tr C̃, raised ×100 until K exists.

    Raises:
        torch.linalg.LinAlgError: no ε up to ``shift`` · 100^escalations gives a positive-definite sum."""
    scale = float(torch.trace(c_task)) / float(torch.trace(c_tilde))
    for escalation in range(escalations + 1):
        epsilon = shift * 100.0 ** escalation * scale
        lower, info = torch.linalg.cholesky_ex(c_task + epsilon * c_tilde)
        if int(info) == 0:
            return lower, epsilon
    raise torch.linalg.LinAlgError(f"C_task + εC̃ is not positive definite up to ε = {epsilon:g}")


def generalized_top_k(c_task: torch.Tensor, c_tilde: torch.Tensor | None, k: int, end: str, *,
                      start: torch.Tensor | None = None, tolerance: float | None = None,
                      generator: torch.Generator | None = None, factor: tuple[torch.Tensor, float] | None = None
                      ) -> GeneralizedTopK:
    """The k eigenpairs of C_task v = λ C̃ v with the smallest (``end="smallest"``) or largest λ, through the
    operator of that end (module docstring), warm-started from ``start`` (d, ≤ k+oversample) — e.g. the previous
    solve's V. ``factor``: a (K, ε) or (L, 0) already computed for this end; with L, the largest end needs no C̃
    (``c_tilde`` may be None: C̃V = L·LᵀV = L·Y, so a refresh never copies the (d, d) C̃ again). ``tolerance``: as
    ``top_eigenpairs``.

    Raises:
        ValueError: ``end`` is neither "smallest" nor "largest", or C̃ is needed and None.
        torch.linalg.LinAlgError: the end's Cholesky factor does not exist.
    """
    if c_tilde is None and (end != "largest" or factor is None):
        raise ValueError(f"end={end!r} without a given factor L needs C̃")
    dim, dtype = c_task.shape[0], (c_tilde if c_tilde is not None else factor[0]).dtype
    if end == "smallest":
        lower, epsilon = factor if factor is not None else shifted_cholesky(c_task, c_tilde)
        product = c_tilde
    elif end == "largest":
        lower, epsilon = factor if factor is not None else (torch.linalg.cholesky(c_tilde), 0.0)
        product = c_task
    else:
        raise ValueError(f"end={end!r}; allowed: 'smallest', 'largest'")

    apply = _whitened(product, lower)

    def to_lambda(values: torch.Tensor) -> torch.Tensor:  # N's eigenvalues are 1 / (λ + ε)
        return values if end == "largest" else 1.0 / values.clamp_min(1e-300) - epsilon

    warm = None if start is None else lower.mT @ start.to(dtype)  # y = Lᵀ v (or Kᵀ v)
    device = lower.device
    pairs = top_eigenpairs(apply, dim, k, start=warm, tolerance=tolerance, dtype=dtype, generator=generator,
                           device=device)
    v = torch.linalg.solve_triangular(lower.mT, pairs.vectors, upper=True)
    if end == "smallest":
        v = v / pairs.values.clamp_min(1e-300).sqrt()  # vᵀ C̃ v = yᵀ N y = ν: rescale to 1
    c_tilde_v = lower @ pairs.vectors if end == "largest" else c_tilde @ v  # C̃·L⁻ᵀY = L·Y
    eigenvalues = to_lambda(pairs.values)
    order = torch.argsort(eigenvalues)
    return GeneralizedTopK(eigenvalues[order], v[:, order], c_tilde_v[:, order], end, pairs.residual,
                           pairs.converged, pairs.applications)


def _whitened(product: torch.Tensor, lower: torch.Tensor) -> Operator:
    """x ↦ L⁻¹ A L⁻ᵀ x: two triangular solves and one product, A (d, d) never whitened whole."""

    def apply(block: torch.Tensor) -> torch.Tensor:
        inner = torch.linalg.solve_triangular(lower.mT, block, upper=True)
        return torch.linalg.solve_triangular(lower, product @ inner, upper=False)

    return apply


def generalized_spectrum(c_task: torch.Tensor, lower: torch.Tensor, *,
                         generator: torch.Generator | None = None) -> SpectrumEstimate:
    """The distribution of all d λ of C_task v = λ C̃ v: SLQ of M = L⁻¹ C_task L⁻ᵀ (L = chol(C̃), whose
    eigenvalues are the λ themselves), on the CPU. One factor serves it and the largest end, so an input whose
    projector stores its most useful directions needs one Cholesky in all."""
    dim = lower.shape[0]
    return lanczos_quadrature(_whitened(c_task, lower), dim, dtype=lower.dtype, generator=generator,
                              device=lower.device)

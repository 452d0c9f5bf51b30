"""The projector P_g of one input: its low-rank storage, which directions it keeps, and applying it. Pure torch.

A row u (1×d) of the Adam update of LoRA-A has spectral coordinates c = u·C̃V (so u = c·Vᵀ, since C̃VVᵀ = I). The
gated row is u·P_g = c·diag(g)·Vᵀ. Only k directions are stored; every other one gets one base gate b:

    u·P_g = b·u + ((u·C̃V_k)·diag(g_k − b))·V_kᵀ          (b = 1: u − ((u·C̃V_k)·diag(1 − g_k))·V_kᵀ)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from folora_ds.common.checks import require_int
from folora_ds.method.eigensolve import GeneralizedEigenResult


@dataclass(frozen=True)
class Projector:
    """Low-rank storage of P_g: k stored directions with their own gates, every other direction at ``base``.

        u·P_g = base·u + ((u·C̃V_k)·diag(g_k − base))·V_kᵀ          (exact when base = 1 and the d − k directions
                                                                  left out have g = 1, or every one has g = base)

    This uses C̃VVᵀ = I (from VᵀC̃V = I): the directions not stored all get the gate ``base``. ``base = 1`` is the
    usual truncation to the k most-attenuated directions; a smaller base represents a large cluster of equal gates
    (e.g. the null space of C_task, all at g ≈ 0) by storing its complement instead (``select_directions``).
    Stored columns beyond the chosen ones are zero with gate = base (no effect), so k is fixed per input.

    Attributes:
        c_tilde_v: (d, k) columns C̃ v_i.
        v: (d, k) generalized eigenvectors v_i.
        gates: (k,) their gates g_i.
        base: the gate of every direction that is not stored, in [0, 1].
    """

    c_tilde_v: torch.Tensor
    v: torch.Tensor
    gates: torch.Tensor
    base: float = 1.0

    def __post_init__(self) -> None:
        if self.c_tilde_v.ndim != 2 or self.c_tilde_v.shape != self.v.shape:
            raise ValueError(f"projector c_tilde_v {tuple(self.c_tilde_v.shape)} and v {tuple(self.v.shape)} "
                             "must both be (d, k)")
        if self.gates.shape != (self.v.shape[1],):
            raise ValueError(f"projector gates {tuple(self.gates.shape)} must be ({self.v.shape[1]},)")
        if not 0.0 <= float(self.base) <= 1.0:
            raise ValueError(f"projector base gate {self.base!r} must be in [0, 1]")

    @property
    def dim(self) -> int:
        """Input dimension d."""
        return self.v.shape[0]

    @property
    def rank(self) -> int:
        """Stored directions k."""
        return self.v.shape[1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Projector:
        return Projector(self.c_tilde_v.to(device=device, dtype=dtype), self.v.to(device=device, dtype=dtype),
                         self.gates.to(device=device, dtype=dtype), self.base)


@dataclass(frozen=True)
class DirectionChoice:
    """Which directions of one input a width-k projector stores (``select_directions``).

    Attributes:
        indices: (m,) stored directions, m ≤ k, in ascending gate order.
        base: the gate every other direction gets.
        approximated: directions gated at ``base`` although their gate differs from it by more than the tolerance
            (0 = the projector is exact up to the tolerance).
        split_ties: of those, directions in tied clusters that were left out whole rather than split by k.
    """

    indices: torch.Tensor
    base: float
    approximated: int
    split_ties: int


def select_directions(gates: torch.Tensor, k: int | None, tie_tolerance: float = 0.0, *,
                      null_count: int = 0) -> DirectionChoice:
    """Choose what a width-``k`` projector stores, the same way whatever the summation order of the statistics.

    ``k=None`` or k ≥ d: every direction, in ascending gate order (the exact P_g).

    Gates within ``tie_tolerance`` of their neighbour (in sorted order) form a tied cluster. Inside a cluster the
    generalized eigenvectors are defined only up to rotation, so storing part of a cluster would depend on
    round-off (and so on the number of ranks). Clusters are therefore stored whole or not at all. The candidate
    bases are 1 (store the most attenuated directions); the gate of C_task's null space when it has
    ``null_count`` ≥ 2 directions (λ = 0 exactly after ``spectral.zero_null_space``: the smallest gates; store
    the useful directions beside it); and the gate of the largest tied cluster when it has more than k members
    (too many to store, e.g. a hard gate's plateau). Each fills k with whole clusters by decreasing |g − base|;
    the one that leaves the smaller Σ|g − base| over the directions not stored wins (base 1 on a tie). Any other
    cluster is no candidate: two gates that happen to lie within ``tie_tolerance`` among thousands of distinct ones
    (a full-rank C_task) would otherwise offer their gate as the base and decide the projector by accident.
    """
    d = gates.numel()
    order = torch.argsort(gates, stable=True)
    if k is None or k >= d:
        return DirectionChoice(order, 1.0, 0, 0)
    values = gates[order].double().tolist()
    clusters, start = [], 0
    for position in range(1, d + 1):
        if position == d or values[position] - values[position - 1] > tie_tolerance:
            clusters.append(list(range(start, position)))
            start = position
    candidates = [1.0]
    if null_count >= 2:  # gates grow with λ: the null space's are the smallest
        candidates.append(min(max(values[0], 0.0), 1.0))
    largest = max(clusters, key=len)
    if len(largest) > k:
        candidates.append(min(max(sum(values[i] for i in largest) / len(largest), 0.0), 1.0))
    best = None
    for base in candidates:
        distance = [abs(value - base) for value in values]
        needed = sorted((cluster for cluster in clusters if max(distance[i] for i in cluster) > tie_tolerance),
                        key=lambda cluster: (-max(distance[i] for i in cluster), cluster[0]))
        stored, left_out, split = [], [], 0
        for cluster in needed:
            fits = len(stored) + len(cluster) <= k
            (stored if fits else left_out).extend(cluster)
            split += 0 if fits or len(cluster) == 1 else len(cluster)
        error = sum(distance[i] for i in left_out)
        if best is None or error < best[0] - 1e-9 * d:
            best = (error, base, sorted(stored), len(left_out), split)
    _, base, stored, approximated, split = best
    return DirectionChoice(order[stored], base, approximated, split)


def build_projector(result: GeneralizedEigenResult, gates: torch.Tensor, k: int | None = None, *,
                    tie_tolerance: float = 0.0, choice: DirectionChoice | None = None) -> Projector:
    """The projector of a solve, of width min(k, d) (d for ``k=None``), storing what ``select_directions`` chooses
    (or ``choice``, when the caller already made it); unused columns are zero, with gate = base."""
    d = result.q.shape[0]
    if gates.shape != (d,):
        raise ValueError(f"gates {tuple(gates.shape)} must be ({d},) to match the solve")
    require_int("k", k, optional=True, where="projector rank: ")
    choice = select_directions(gates, k, tie_tolerance) if choice is None else choice
    width = d if k is None else min(k, d)
    c_tilde_v = result.q.new_zeros(d, width)
    v = result.q.new_zeros(d, width)
    stored_gates = gates.new_full((width,), choice.base)
    count = choice.indices.numel()
    v[:, :count], c_tilde_v[:, :count] = result.columns(choice.indices)  # only the stored columns are computed
    stored_gates[:count] = gates[choice.indices]
    return Projector(c_tilde_v, v, stored_gates, choice.base)


def apply_projector(update: torch.Tensor, projector: Projector) -> torch.Tensor:
    """Gate the rows of ``update`` (..., d): u ↦ u − ((u·C̃V_k)·diag(1 − g_k))·V_kᵀ.

    The result never has a larger C̃-norm than ``u`` (row by row) but may be longer in the Euclidean norm.
    """
    if update.shape[-1] != projector.dim:
        raise ValueError(f"update rows have {update.shape[-1]} columns but the projector is for d={projector.dim}")
    return gate_with_coordinates(update, update @ projector.c_tilde_v, projector)


def prefers_dense(projector: Projector) -> bool:
    """Whether gating with the one (d, d) matrix of ``dense_projector`` reads less than the two (d, k) factors:
    2k ≥ d (the exact projector, k = d, reads half as much; a 70B input at k = 64 keeps its factors)."""
    return 2 * projector.rank >= projector.dim


def dense_projector(projector: Projector) -> torch.Tensor:
    """P_g as one (d, d) matrix, u·P_g = u @ P: P = b·I + C̃V_k·diag(g_k − b)·V_kᵀ (equal to ``apply_projector`` up to
    round-off). The optimizer builds it once per input and refresh when ``prefers_dense``."""
    dense = (projector.c_tilde_v * (projector.gates - projector.base)) @ projector.v.mT
    dense.diagonal().add_(projector.base)
    return dense


def projector_shard(projector: Projector, start: int, stop: int) -> Projector:
    """The rows ``start:stop`` of a projector's stored directions: what a rank holding only columns
    ``start:stop`` of LoRA-A (a row-parallel layer's A under tensor parallelism, split along d_in) keeps.

    A shard alone does not gate: the spectral coordinates u·C̃V_k of a row are a sum over every shard
    (``apply_projector_shard``). Returns a Projector of d = stop − start with the same k, gates and base.
    """
    if not 0 <= start < stop <= projector.dim:
        raise ValueError(f"projector shard [{start}, {stop}) is not inside d={projector.dim}")
    return Projector(projector.c_tilde_v[start:stop], projector.v[start:stop], projector.gates, projector.base)


def apply_projector_shard(update_shard: torch.Tensor, shard: Projector,
                          sum_over_shards: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Gate the column block u_i (..., d_i) of rows whose other blocks live on other ranks::

        A = [A_1 … A_T] (split along d_in):   (u·P_g)_i = b·u_i + ((Σ_j u_j·(C̃V_k)_j)·diag(g − b))·(V_k)_iᵀ

    Args:
        update_shard: (..., d_i) this rank's columns of the rows (e.g. (r, d_in / TP) of LoRA-A's update).
        shard: ``projector_shard`` of the same columns.
        sum_over_shards: sums a (..., k) tensor over the ranks holding the other blocks (an all-reduce over the
            tensor-parallel group: r·k numbers per LoRA-A and step); every such rank must call it.

    Returns:
        (..., d_i) the same columns of the gated rows: concatenated over the ranks, ``apply_projector`` of the
        whole rows.
    """
    if update_shard.shape[-1] != shard.dim:
        raise ValueError(f"update shard has {update_shard.shape[-1]} columns, its projector shard {shard.dim}")
    return gate_with_coordinates(update_shard, sum_over_shards(update_shard @ shard.c_tilde_v), shard)


def gate_with_coordinates(update: torch.Tensor, coordinates: torch.Tensor, projector: Projector) -> torch.Tensor:
    """b·u + (c·diag(g − b))·Vᵀ from rows (or the column blocks of rows) ``update`` (..., d) and their whole spectral
    coordinates c (..., k): the last half of every gate, once the coordinates are summed wherever the row is split
    (``apply_projector_shard`` over tensor-parallel ranks, ``flat_partitions`` over ZeRO's cut rows)."""
    if projector.base == 1.0:
        return update - (coordinates * (1 - projector.gates)) @ projector.v.mT
    return projector.base * update + (coordinates * (projector.gates - projector.base)) @ projector.v.mT


def cap_row_norms(gated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Rescale rows of ``gated`` (..., d) that are longer (Euclidean) than the same rows of ``reference``."""
    gated_norm = gated.norm(dim=-1, keepdim=True)
    reference_norm = reference.norm(dim=-1, keepdim=True)
    scale = torch.where(gated_norm > reference_norm, reference_norm / gated_norm.clamp_min(1e-30),
                        torch.ones_like(gated_norm))
    return gated * scale


def eigenvector_rows(rows: torch.Tensor, projector: Projector) -> torch.Tensor:
    """Eigenvector initialisation: row i of A₀ becomes the generalized eigenvector with the i-th largest gate (the
    i-th most task utility per unit of forgetting), scaled to row i's original Euclidean norm.

    Each row a = v_i then has the Rayleigh quotient (a C_task aᵀ)/(a C_pre aᵀ) = λ_i: it reads the inputs where the
    task has the most energy relative to the proxy text, as LoRA-Null reads the proxy's null space. Needs the exact
    projector (every direction stored, ``k=None``) and r ≤ d.

    Args:
        rows: (r, d) initial rows of A (their norms are kept).
        projector: the input's exact projector (k = d, base 1).
    Returns:
        (r, d) rows in the dtype of ``rows``.
    """
    r, d = rows.shape
    if d != projector.dim:
        raise ValueError(f"rows have d={d}, the projector d={projector.dim}")
    if projector.rank != projector.dim or projector.base != 1.0:
        raise ValueError(f"the eigenvector init needs every direction stored (k=None); this projector stores "
                         f"{projector.rank} of {projector.dim}")
    if r > d:
        raise ValueError(f"the eigenvector init needs lora_rank ≤ d; got r={r} > d={d}")
    if bool((projector.gates[1:] < projector.gates[:-1]).any()):
        raise ValueError("the eigenvector init needs the exact projector's columns in ascending gate order")
    # The exact projector stores the solver's ascending-λ columns, stably sorted by gate (monotone in λ), so its
    # columns are in ascending λ even where gates tie (the hard gate's 1s, float32 saturation): the last r
    # columns are the r largest λ. Ordering by gate value instead would pick the smallest λ among tied gates.
    vectors = projector.v[:, d - r:].flip(1).T.to(rows.dtype)  # (r, d), largest λ first
    return vectors * (rows.norm(dim=-1, keepdim=True) / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-30))


def project_rows(rows: torch.Tensor, projector: Projector) -> torch.Tensor:
    """Projected initialisation: gate the rows (r, d) of A₀ and give each its original Euclidean norm back."""
    projected = apply_projector(rows, projector)
    norms = projected.norm(dim=-1, keepdim=True)
    return projected * (rows.norm(dim=-1, keepdim=True) / norms.clamp_min(1e-30))

"""folora_ds.method.projector: low-rank storage of P_g, the direction choice (ties never split), applying it."""

from __future__ import annotations

import math

import pytest
import torch

from folora_ds.method.eigensolve import GeneralizedEigenResult, solve_generalized_eigenproblem
from folora_ds.method.projector import (
    Projector,
    apply_projector,
    apply_projector_shard,
    build_projector,
    cap_row_norms,
    eigenvector_rows,
    prefers_dense,
    project_rows,
    projector_shard,
    select_directions,
)
from folora_ds.method.projector import dense_projector as product_dense_projector
from folora_ds.method.spectral import effective_tau, gate_values
from tests.testing.linalg import F64, c_norm, dense_projector, random_rows, solve_random, spd


# ---------------------------------------------------------------------------------------------- projector
def test_all_gates_one_projector_is_the_identity():
    result, _ = solve_random(d=16, seed=1)
    projector = build_projector(result, torch.ones(16, dtype=F64))
    rows = random_rows((5, 16), seed=0)
    torch.testing.assert_close(apply_projector(rows, projector), rows, rtol=0, atol=1e-15)
    torch.testing.assert_close(dense_projector(result, torch.ones(16, dtype=F64)), torch.eye(16, dtype=F64),
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["rational", "sigmoid", "hard"])
def test_full_rank_projector_equals_dense_p_g(kind):
    d = 20
    result, _ = solve_random(d=d, seed=2)
    tau = effective_tau(result.eigenvalues, 1.0, "relative_median")
    gates = gate_values(result.eigenvalues, kind=kind, tau=tau, temperature=0.7)
    projector = build_projector(result, gates, k=None)
    assert projector.rank == d and projector.dim == d
    rows = random_rows((4, d), seed=3)
    expected = rows @ dense_projector(result, gates)
    torch.testing.assert_close(apply_projector(rows, projector), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(apply_projector(rows, build_projector(result, gates, k=d)), expected,
                               rtol=1e-10, atol=1e-10)


def test_low_rank_projector_keeps_the_k_smallest_gates():
    d, k = 15, 6
    result, _ = solve_random(d=d, seed=4)
    gates = gate_values(result.eigenvalues, kind="rational", tau=1.0)
    shuffled = torch.randperm(d, generator=torch.Generator().manual_seed(0))  # order must not matter
    shuffled_result = GeneralizedEigenResult(result.eigenvalues[shuffled], result.lower, result.q[:, shuffled],
                                             result.ridge, result.dtype)
    projector = build_projector(shuffled_result, gates[shuffled], k=k)
    order = torch.argsort(gates)[:k]
    assert projector.rank == k and projector.dim == d
    torch.testing.assert_close(projector.gates, gates[order], rtol=0, atol=0)
    # only the k stored columns are computed (a triangular solve of k columns, not d): equal up to rounding
    torch.testing.assert_close(projector.v, result.eigenvectors[:, order], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(projector.c_tilde_v, result.c_tilde_v[:, order], rtol=1e-12, atol=1e-12)


def test_k_larger_than_d_keeps_all_directions():
    result, _ = solve_random(d=5, seed=4)
    assert build_projector(result, torch.full((5,), 0.5, dtype=F64), k=50).rank == 5


@pytest.mark.parametrize("extra", [0, 3])
def test_low_rank_projector_with_hard_gates_equals_dense_p_g(extra):
    """With the hard gate every unstored direction has g = 1 exactly, so the low-rank P_g is exact."""
    d = 24
    result, _ = solve_random(d=d, seed=5)
    tau = float(result.eigenvalues[9])  # λ_0..λ_8 below τ → 9 closed directions
    gates = gate_values(result.eigenvalues, kind="hard", tau=tau)
    closed = int((gates < 1).sum())
    assert 0 < closed < d
    k = closed + extra
    projector = build_projector(result, gates, k=k)
    assert projector.rank == k
    rows = random_rows((7, d), seed=6)
    expected = rows @ dense_projector(result, gates)
    torch.testing.assert_close(apply_projector(rows, projector), expected, rtol=1e-10, atol=1e-10)


def test_gated_update_penalty_is_sum_of_squared_gated_coordinates():
    """u' C̃ u'ᵀ = Σ_i g_i² c_i² with c = u·C̃V, per row, for a batch of rows."""
    d = 18
    result, c_tilde = solve_random(d=d, seed=7)
    gates = gate_values(result.eigenvalues, kind="rational", tau=effective_tau(result.eigenvalues, 1.0,
                                                                                 "relative_median"))
    projector = build_projector(result, gates)
    rows = random_rows((3, 5, d), seed=8)  # any leading batch shape
    gated = apply_projector(rows, projector)
    assert gated.shape == rows.shape
    penalty = ((gated @ c_tilde) * gated).sum(-1)
    coordinates = rows @ result.c_tilde_v
    expected = (gates**2 * coordinates**2).sum(-1)
    torch.testing.assert_close(penalty, expected, rtol=1e-9, atol=0)
    # and the ungated penalty is Σ c_i² (V is C̃-orthonormal)
    torch.testing.assert_close(((rows @ c_tilde) * rows).sum(-1), (coordinates**2).sum(-1), rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind", ["rational", "sigmoid", "hard"])
@pytest.mark.parametrize("k", [None, 4])
def test_gating_never_increases_the_c_tilde_norm(kind, k):
    d = 16
    result, c_tilde = solve_random(d=d, seed=9, ridge=1e-6)
    gates = gate_values(result.eigenvalues, kind=kind, tau=float(result.eigenvalues.median()), temperature=0.5)
    projector = build_projector(result, gates, k=k)
    rows = random_rows((64, d), seed=10)
    before, after = c_norm(rows, c_tilde), c_norm(apply_projector(rows, projector), c_tilde)
    assert bool((after <= before * (1 + 1e-10)).all())


def test_gating_can_lengthen_a_row_in_the_euclidean_norm():
    """The documented caveat: P_g is oblique, so a row may get up to ~sqrt(cond C̃) longer; the cap undoes it."""
    c_pre = torch.diag(torch.tensor([1.0, 1e-4], dtype=F64))  # cond 1e4
    high_utility = c_pre @ torch.tensor([0.01, 1.0], dtype=F64)
    c_task = torch.outer(high_utility, high_utility)  # one useful direction v ∝ (0.01, 1), nearly along e_2
    result = solve_generalized_eigenproblem(c_task, c_pre, ridge=1e-6)
    gates = gate_values(result.eigenvalues, kind="hard", tau=1e-4)
    assert gates.tolist() == [0.0, 1.0]
    projector = build_projector(result, gates)
    row = torch.tensor([[1.0, 0.01]], dtype=F64)
    gated = apply_projector(row, projector)
    assert float(gated.norm() / row.norm()) > 10.0
    capped = cap_row_norms(gated, row)
    torch.testing.assert_close(capped.norm(), row.norm())


def test_cap_row_norms_caps_long_rows_and_leaves_short_ones():
    reference = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=F64)
    gated = torch.tensor([[6.0, 8.0], [0.5, 0.0], [0.0, 0.0], [-3.0, 4.0]], dtype=F64)
    capped = cap_row_norms(gated, reference)
    torch.testing.assert_close(capped[0], torch.tensor([3.0, 4.0], dtype=F64))  # shrunk to ‖ref‖ = 5
    torch.testing.assert_close(capped[1], gated[1], rtol=0, atol=0)  # shorter: untouched
    torch.testing.assert_close(capped[2], gated[2], rtol=0, atol=0)  # zero row stays zero
    torch.testing.assert_close(capped[3], gated[3] * (math.sqrt(2) / 5))  # direction kept, length ‖ref‖
    norms = capped.norm(dim=-1)
    assert bool((norms <= reference.norm(dim=-1) * (1 + 1e-12)).all())


def test_cap_row_norms_on_batched_random_rows():
    gated, reference = random_rows((3, 4, 8), seed=12) * 2, random_rows((3, 4, 8), seed=13)
    capped = cap_row_norms(gated, reference)
    longer = gated.norm(dim=-1) > reference.norm(dim=-1)
    torch.testing.assert_close(capped.norm(dim=-1)[longer], reference.norm(dim=-1)[longer])
    torch.testing.assert_close(capped[~longer], gated[~longer], rtol=0, atol=0)


def test_project_rows_keeps_row_norms_and_gated_direction():
    d = 14
    result, _ = solve_random(d=d, seed=14)
    gates = gate_values(result.eigenvalues, kind="rational", tau=float(result.eigenvalues.median()))
    projector = build_projector(result, gates, k=8)
    rows = random_rows((6, d), seed=15)
    projected = project_rows(rows, projector)
    torch.testing.assert_close(projected.norm(dim=-1), rows.norm(dim=-1), rtol=1e-12, atol=0)
    gated = apply_projector(rows, projector)
    cosine = (projected * gated).sum(-1) / (projected.norm(dim=-1) * gated.norm(dim=-1))
    torch.testing.assert_close(cosine, torch.ones(6, dtype=F64), rtol=0, atol=1e-12)


def test_apply_projector_rejects_wrong_row_length():
    result, _ = solve_random(d=6, seed=0)
    projector = build_projector(result, torch.ones(6, dtype=F64))
    with pytest.raises(ValueError, match="d=6"):
        apply_projector(torch.ones(3, 7, dtype=F64), projector)
    with pytest.raises(ValueError):
        project_rows(torch.ones(3, 5, dtype=F64), projector)


def test_build_projector_rejects_wrong_number_of_gates():
    result, _ = solve_random(d=6, seed=0)
    for gates in (torch.ones(5, dtype=F64), torch.ones(6, 1, dtype=F64), torch.ones(7, dtype=F64)):
        with pytest.raises(ValueError, match="gates"):
            build_projector(result, gates)


@pytest.mark.parametrize(
    "c_tilde_v_shape, v_shape, gates_shape",
    [((6, 3), (6, 2), (2,)), ((6, 3), (6, 3), (2,)), ((6, 3), (6, 3), (3, 1)), ((6,), (6,), (6,)),
     ((5, 3), (6, 3), (3,))],
)
def test_projector_construction_checks_shapes(c_tilde_v_shape, v_shape, gates_shape):
    with pytest.raises(ValueError, match="projector"):
        Projector(torch.zeros(c_tilde_v_shape), torch.zeros(v_shape), torch.zeros(gates_shape))


def test_projector_properties_and_to():
    projector = Projector(torch.zeros(7, 3, dtype=F64), torch.zeros(7, 3, dtype=F64), torch.ones(3, dtype=F64))
    assert projector.dim == 7 and projector.rank == 3
    moved = projector.to(dtype=torch.float32)
    assert moved.v.dtype == moved.c_tilde_v.dtype == moved.gates.dtype == torch.float32
    assert moved.dim == 7 and moved.rank == 3


# ---------------------------------------------------------------------------------------------- ties at k
def _null_space_solve(d: int = 12, task_rank: int = 3, seed: int = 7):
    """C_task of rank ``task_rank`` < d: d − task_rank generalized eigenvalues ≈ 0, so gates tie at ≈ 0."""
    c_pre = spd(d, seed)
    result = solve_generalized_eigenproblem(spd(d, seed + 1, tokens=task_rank), c_pre)
    return result, gate_values(result.eigenvalues, kind="rational", tau=0.5)


def _rotate_cluster(result: GeneralizedEigenResult, cluster: torch.Tensor, seed: int) -> GeneralizedEigenResult:
    """Another, equally valid basis: the eigenvectors of a degenerate cluster rotated among themselves (what a
    different summation order of the statistics, e.g. another number of ranks, can produce)."""
    rotation, _ = torch.linalg.qr(torch.randn(cluster.numel(), cluster.numel(),
                                              generator=torch.Generator().manual_seed(seed), dtype=F64))
    q = result.q.clone()  # V = L⁻ᵀQ and C̃V = LQ: rotating Q's columns rotates both
    q[:, cluster] = q[:, cluster] @ rotation
    return GeneralizedEigenResult(result.eigenvalues, result.lower, q, result.ridge, result.dtype)


def test_a_large_tied_cluster_is_stored_as_its_complement_exactly():
    """9 of 12 gates ≈ 0 (C_task null space), k = 4: base gate ≈ 0 and the 3 useful directions stored is P_g."""
    result, gates = _null_space_solve()
    choice = select_directions(gates, 4, tie_tolerance=1e-6)
    assert choice.indices.numel() == 3 and choice.base < 1e-6 and choice.approximated == 0
    projector = build_projector(result, gates, k=4, tie_tolerance=1e-6)
    assert projector.rank == 4 and projector.base == choice.base
    rows = random_rows((5, 12), seed=8)
    torch.testing.assert_close(apply_projector(rows, projector), rows @ dense_projector(result, gates),
                               rtol=1e-9, atol=1e-9)


def test_k_splitting_a_tie_gives_the_same_projector_in_every_basis_of_the_cluster():
    result, gates = _null_space_solve()
    cluster = torch.nonzero(gates < 1e-6).flatten()
    assert cluster.numel() == 9
    rotated = _rotate_cluster(result, cluster, seed=3)
    rows = random_rows((5, 12), seed=9)
    for k in (2, 4, 6, 10):
        first = apply_projector(rows, build_projector(result, gates, k=k, tie_tolerance=1e-6))
        second = apply_projector(rows, build_projector(rotated, gates, k=k, tie_tolerance=1e-6))
        torch.testing.assert_close(first, second, rtol=1e-9, atol=1e-9, msg=f"k={k}")
    # without the tie rule (the k smallest gates, base 1) the two bases disagree: this test could fail
    naive = [apply_projector(rows, build_projector(r, gates + 1e-3 * torch.arange(12, dtype=F64), k=4))
             for r in (result, rotated)]
    assert not torch.allclose(naive[0], naive[1], atol=1e-3)


def test_a_tied_cluster_that_does_not_fit_is_left_out_whole_and_reported():
    """Gates: 3 distinct small ones, a tied cluster of 5 at 0.4, 6 at 1; k = 6 cannot hold 3 + 5."""
    gates = torch.tensor([0.1, 0.2, 0.3] + [0.4] * 5 + [1.0] * 6, dtype=F64)
    choice = select_directions(gates, 6, tie_tolerance=1e-6)
    assert choice.base == 1.0 and sorted(choice.indices.tolist()) == [0, 1, 2]
    assert (choice.approximated, choice.split_ties) == (5, 5)
    # when the tied cluster is too large for k, storing its complement is the better (here exact) choice
    gates = torch.tensor([0.1] + [0.4] * 6 + [1.0] * 3, dtype=F64)
    choice = select_directions(gates, 4, tie_tolerance=1e-6)
    assert choice.base == pytest.approx(0.4) and choice.approximated == 0 and choice.indices.numel() == 4


def test_a_tied_cluster_that_k_can_hold_is_no_base():
    """Base 1 stores a cluster of ≤ k members whole, so its gate is not offered as the base: two gates that
    happen to tie among many distinct ones (a full-rank C_task) must not decide the projector. Here the pair at
    0.05 would win under Σ|g − base| (most gates are small) if it were a candidate."""
    distinct = torch.linspace(0.001, 0.3, 40, dtype=F64)
    gates = torch.cat([distinct, torch.tensor([0.05 + 1e-8, 0.05 - 1e-8], dtype=F64)])
    choice = select_directions(gates, 6, tie_tolerance=1e-6)
    assert choice.base == 1.0
    assert sorted(choice.indices.tolist()) == sorted(torch.argsort(gates)[:6].tolist())
    # the same gates without the accidental pair choose the same way (the rule does not depend on it)
    alone = select_directions(distinct, 6, tie_tolerance=1e-6)
    assert alone.base == 1.0 and sorted(alone.indices.tolist()) == list(range(6))
    # C_task's null space (λ = 0 exactly, counted by the solver) is a candidate at any size: 3 null directions
    nulls = torch.cat([torch.zeros(3, dtype=F64), distinct])
    choice = select_directions(nulls, 6, tie_tolerance=1e-6, null_count=3)
    assert choice.base == 0.0 and sorted(choice.indices.tolist()) == list(range(37, 43))
    assert select_directions(nulls, 6, tie_tolerance=1e-6).base == 1.0  # not counted: 3 ≤ k is no candidate


def test_without_ties_the_k_smallest_gates_are_kept_with_base_one():
    gates = torch.rand(20, generator=torch.Generator().manual_seed(1), dtype=F64)
    choice = select_directions(gates, 7, tie_tolerance=0.0)
    assert choice.base == 1.0 and choice.split_ties == 0 and choice.approximated == 13 - int((gates == 1).sum())
    assert sorted(choice.indices.tolist()) == sorted(torch.argsort(gates)[:7].tolist())


def test_a_projector_base_gate_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="base gate"):
        Projector(torch.zeros(3, 1, dtype=F64), torch.zeros(3, 1, dtype=F64), torch.zeros(1, dtype=F64), 1.5)


def test_eigenvector_rows_are_the_top_lambda_directions_at_the_rows_norms():
    d = 12
    result, c_tilde = solve_random(d=d, seed=21)
    c_task = spd(d, 121)  # solve_random's C_task
    gates = gate_values(result.eigenvalues, kind="rational", tau=float(result.eigenvalues.median()))
    projector = build_projector(result, gates)
    rows = random_rows((3, d), seed=22)
    initial = eigenvector_rows(rows, projector)
    torch.testing.assert_close(initial.norm(dim=-1), rows.norm(dim=-1), rtol=1e-12, atol=0)
    quotients = (torch.einsum("rd,de,re->r", initial, c_task, initial)
                 / torch.einsum("rd,de,re->r", initial, c_tilde, initial))
    top = torch.sort(result.eigenvalues, descending=True).values[:3]
    torch.testing.assert_close(quotients, top, rtol=1e-9, atol=0)  # the 3 largest λ, in decreasing order


def test_eigenvector_rows_with_tied_gates_still_take_the_largest_lambda():
    """The hard gate gives every λ ≥ τ the gate 1: the rows must still be the largest λ, not the first tied ones."""
    d = 10
    result, c_tilde = solve_random(d=d, seed=31)
    c_task = spd(d, 131)
    gates = gate_values(result.eigenvalues, kind="hard", tau=float(result.eigenvalues.median()))
    assert int((gates == 1).sum()) >= 4
    initial = eigenvector_rows(random_rows((2, d), seed=32), build_projector(result, gates))
    quotients = (torch.einsum("rd,de,re->r", initial, c_task, initial)
                 / torch.einsum("rd,de,re->r", initial, c_tilde, initial))
    torch.testing.assert_close(quotients, torch.sort(result.eigenvalues, descending=True).values[:2], rtol=1e-9,
                               atol=0)


def test_eigenvector_rows_refuse_a_truncated_projector_and_too_many_rows():
    result, _ = solve_random(d=6, seed=3)
    gates = gate_values(result.eigenvalues, kind="rational", tau=float(result.eigenvalues.median()))
    with pytest.raises(ValueError, match="k=None"):
        eigenvector_rows(random_rows((2, 6), seed=1), build_projector(result, gates, k=3))
    with pytest.raises(ValueError, match="r=7 > d=6"):
        eigenvector_rows(random_rows((7, 6), seed=1), build_projector(result, gates))


# ------------------------------------------------------------------------ LoRA-A split along d_in (tensor parallel)
def _shard_bounds(d: int, shards: int) -> list[tuple[int, int]]:
    """Uneven column blocks, as a TP split of d_in that does not divide evenly would give."""
    edges = [round(d * i / shards) for i in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("shards", [2, 3])
@pytest.mark.parametrize("base", [1.0, 0.25])
def test_gating_column_shards_with_summed_coordinates_equals_gating_whole_rows(shards, base):
    result, _ = solve_random(13, seed=70)
    gates = torch.linspace(0.0, 1.0, 13, dtype=F64)
    projector = build_projector(result, gates, k=5)
    projector = Projector(projector.c_tilde_v, projector.v, projector.gates, base)
    rows = random_rows((5, 13), seed=71)  # LoRA-A's update, r = 5
    bounds = _shard_bounds(13, shards)
    partial = [rows[:, a:b] @ projector_shard(projector, a, b).c_tilde_v for a, b in bounds]
    total = torch.stack(partial).sum(0)  # what the all-reduce over the TP group returns on every rank
    pieces = [apply_projector_shard(rows[:, a:b], projector_shard(projector, a, b), lambda local: total)
              for a, b in bounds]
    torch.testing.assert_close(torch.cat(pieces, dim=1), apply_projector(rows, projector), rtol=0, atol=1e-12)
    alone = [apply_projector_shard(rows[:, a:b], projector_shard(projector, a, b), lambda local: local)
             for a, b in bounds]  # without the all-reduce each rank gates with its own partial coordinates
    assert not torch.allclose(torch.cat(alone, dim=1), apply_projector(rows, projector), atol=1e-6)


def test_a_projector_shard_keeps_k_gates_and_base_and_refuses_a_block_outside_d():
    result, _ = solve_random(10, seed=72)
    projector = build_projector(result, torch.linspace(0.1, 0.9, 10, dtype=F64), k=4)
    shard = projector_shard(projector, 3, 7)
    assert (shard.dim, shard.rank, shard.base) == (4, 4, projector.base)
    torch.testing.assert_close(shard.v, projector.v[3:7], rtol=0, atol=0)
    torch.testing.assert_close(shard.gates, projector.gates, rtol=0, atol=0)
    for start, stop in ((0, 11), (5, 5), (-1, 3)):
        with pytest.raises(ValueError, match=r"projector shard \[.*\) is not inside d=10"):
            projector_shard(projector, start, stop)
    with pytest.raises(ValueError, match="update shard has 5 columns, its projector shard 4"):
        apply_projector_shard(random_rows((2, 5), seed=73), shard, lambda local: local)


@pytest.mark.parametrize("base", [1.0, 0.25])
def test_the_dense_projector_gates_like_its_factors(base):
    generator = torch.Generator().manual_seed(7)
    d, k = 9, 5
    v = torch.randn(d, k, generator=generator, dtype=torch.float64)
    c_tilde_v = torch.randn(d, k, generator=generator, dtype=torch.float64)
    projector = Projector(c_tilde_v, v, torch.rand(k, generator=generator, dtype=torch.float64), base)
    rows = torch.randn(3, d, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(rows @ product_dense_projector(projector), apply_projector(rows, projector), rtol=1e-12,
                               atol=1e-12)
    assert prefers_dense(projector) and not prefers_dense(Projector(c_tilde_v[:, :4], v[:, :4],
                                                                    projector.gates[:4], base))

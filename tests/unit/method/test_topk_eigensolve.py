"""``method.topk_eigensolve``: the k eigenpairs at either end of C_task v = λ C̃ v equal the full solve's, from the
operator applications alone; a warm start needs fewer; SLQ estimates Σg and the median λ (issue 26, item 1)."""

from __future__ import annotations

import math

import pytest
import torch

from folora_ds.method.eigensolve import solve_generalized_eigenproblem
from folora_ds.method.topk_eigensolve import (
    generalized_spectrum,
    generalized_top_k,
    residual_tolerance,
    top_eigenpairs,
)
from tests.testing.linalg import F64, ill_conditioned, ridged, spd

RIDGE = 1e-3


def _problem(d: int, seed: int, *, tokens: int | None = None, c_pre=None):
    c_pre = spd(d, seed) if c_pre is None else c_pre
    c_task = spd(d, seed + 100, tokens=tokens)
    return c_task, c_pre, ridged(c_pre, RIDGE), solve_generalized_eigenproblem(c_task, c_pre, ridge=RIDGE)


def _assert_same_directions(top, full, indices, c_tilde):
    """Equal λ, and the same directions: every principal cosine between the two C̃-orthonormal bases is 1."""
    v_full, c_tilde_v_full = full.columns(indices)
    torch.testing.assert_close(top.eigenvalues, full.eigenvalues[indices], rtol=1e-8,
                               atol=1e-10 * float(full.eigenvalues.max()))
    cosines = torch.linalg.svdvals(c_tilde_v_full.mT @ top.v)
    assert float(cosines.min()) > 1 - 1e-8
    torch.testing.assert_close(top.v.mT @ top.c_tilde_v, torch.eye(top.v.shape[1], dtype=F64), atol=1e-9, rtol=0)
    torch.testing.assert_close(top.c_tilde_v, c_tilde @ top.v)


@pytest.mark.parametrize("end", ["smallest", "largest"])
def test_either_end_equals_the_full_solve(end, one_torch_thread):
    d, k = 400, 12
    c_task, _, c_tilde, full = _problem(d, 0)
    top = generalized_top_k(c_task, c_tilde, k, end, generator=torch.Generator().manual_seed(0))
    assert top.converged and top.residual <= 1e-8
    indices = torch.arange(k) if end == "smallest" else torch.arange(d - k, d)
    _assert_same_directions(top, full, indices, c_tilde)


def test_an_ill_conditioned_c_pre_still_gives_the_full_solves_most_attenuated_directions(one_torch_thread):
    d, k = 128, 8
    c_task, _, c_tilde, full = _problem(d, 1, c_pre=ill_conditioned(128, seed=1, condition=1e8))
    top = generalized_top_k(c_task, c_tilde, k, "smallest", generator=torch.Generator().manual_seed(1))
    assert top.converged
    _assert_same_directions(top, full, torch.arange(k), c_tilde)


def test_beside_a_null_space_the_largest_end_finds_every_useful_direction(one_torch_thread):
    """Fewer task tokens than d: C_task's null space is a cluster at λ = 0; the useful directions are the top."""
    d, tokens, k = 400, 20, 20  # SLQ: the null share to ±0.004 (1 σ, 16 probes) at this d
    c_task, _, c_tilde, full = _problem(d, 2, tokens=tokens)
    top = generalized_top_k(c_task, c_tilde, k, "largest", generator=torch.Generator().manual_seed(2))
    assert top.converged
    _assert_same_directions(top, full, torch.arange(d - k, d), c_tilde)
    spectrum = generalized_spectrum(c_task, torch.linalg.cholesky(c_tilde), generator=torch.Generator().manual_seed(2))
    null = float(spectrum.weights[spectrum.nodes < 1e-6 * float(top.eigenvalues.max())].sum())
    assert null == pytest.approx((d - tokens) / d, abs=0.02)  # the cluster's size, from the estimate


def test_a_warm_start_from_the_previous_directions_needs_fewer_applications(one_torch_thread):
    d, k = 400, 12
    c_task, c_pre, c_tilde, full = _problem(d, 3)
    cold = generalized_top_k(c_task, c_tilde, k, "smallest", generator=torch.Generator().manual_seed(3))
    drifted = c_task + 1e-4 * spd(d, 7)  # the next refresh's statistics, a little moved
    warm = generalized_top_k(drifted, c_tilde, k, "smallest", start=cold.v,
                             generator=torch.Generator().manual_seed(3))
    again = generalized_top_k(drifted, c_tilde, k, "smallest",
                              generator=torch.Generator().manual_seed(3))
    assert warm.converged and again.converged
    assert warm.applications < again.applications
    torch.testing.assert_close(warm.eigenvalues, again.eigenvalues, rtol=1e-8, atol=0)


def test_a_budget_too_small_reports_no_convergence_rather_than_a_wrong_answer():
    generator = torch.Generator().manual_seed(4)
    spectrum = torch.linspace(1.0, 1.001, 200, dtype=F64)  # no gap: nothing converges in one restart
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=generator, dtype=F64))
    matrix = q @ torch.diag(spectrum) @ q.mT
    pairs = top_eigenpairs(lambda block: matrix @ block, 200, 4, depth=1, restarts=1, tolerance=1e-12,
                           generator=generator)
    assert not pairs.converged and pairs.residual > 1e-12


def test_slq_estimates_the_effective_rank_and_the_median(one_torch_thread):
    """Σg (a smooth function of the spectrum) to 2%, the median λ (a smoothed-CDF crossing) to 10%, on a spectrum
    spanning decades; d = 512, the default 16 probes x 40 Lanczos steps (as accurate here as 8 x 80 over 5 seeds,
    with half the sequential applications)."""
    d = 512
    c_task, _, c_tilde, full = _problem(d, 5, c_pre=ill_conditioned(512, seed=5, condition=1e4))
    estimate = generalized_spectrum(c_task, torch.linalg.cholesky(c_tilde), generator=torch.Generator().manual_seed(5))
    eigenvalues = full.eigenvalues
    median = float(eigenvalues.median())
    assert math.log10(float(eigenvalues.max() / eigenvalues.min())) > 3
    assert estimate.median() == pytest.approx(median, rel=0.10)
    effective_rank = float((eigenvalues / (eigenvalues + median)).sum())
    assert d * estimate.mean(estimate.nodes.clamp_min(0) / (estimate.nodes.clamp_min(0) + median)) == pytest.approx(
        effective_rank, rel=0.02)


def _solvers(**overrides):
    """(top-k, full) solvers; the top-k one iterates to float64's limit (``top_k_residual=None``), so these cases
    test what the algorithm computes, not the default tolerance (its own test below)."""
    from folora_ds.method.config import FoLoRAConfig
    from folora_ds.method.spectral import SpectralSolver

    settings = {"k": 12, "ridge": RIDGE, "eigensolver": "top_k", "top_k_residual": None, **overrides}
    return SpectralSolver(FoLoRAConfig(**settings)), SpectralSolver(FoLoRAConfig(**{**settings, "eigensolver": "full"}))


def _gated_rows(projector, seed: int, dim: int) -> torch.Tensor:
    from folora_ds.method.projector import apply_projector

    rows = torch.randn(8, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return apply_projector(rows, projector)


@pytest.mark.parametrize(("tokens", "base"), [(None, 1.0), (60, 0.0)], ids=["full_rank", "null_space"])
def test_the_solver_stores_what_the_full_solve_stores(tokens, base, one_torch_thread):
    """Full-rank C_task: the k most attenuated directions, base 1. Fewer tokens than d: the null space is one
    cluster at g = 0 and the k most useful directions are stored beside it. Same directions, gates and gated
    update as the full solve, up to τ, which the top-k solver estimates (the median λ by SLQ)."""
    d = 400
    c_task, c_pre = spd(d, 10 + (tokens or 0), tokens=tokens), spd(d, 11)
    top_k, full = _solvers()
    top_projector, top_report = top_k.solve("layer", c_task, c_pre)
    full_projector, full_report = full.solve("layer", c_task, c_pre)
    assert top_k.top_k_fallbacks == {} and top_report.estimated and not full_report.estimated
    assert top_projector.base == full_projector.base == base
    assert top_report.stored == full_report.stored == 12
    assert top_report.tau == pytest.approx(full_report.tau, rel=0.15)  # measured: 2% full rank; exact by a null space
    cosines = torch.linalg.svdvals(full_projector.c_tilde_v.mT @ top_projector.v)
    assert float(cosines.min()) > 1 - 1e-8
    torch.testing.assert_close(torch.sort(top_projector.gates).values, torch.sort(full_projector.gates).values,
                               atol=0.02, rtol=0)
    gated_top, gated_full = _gated_rows(top_projector, 0, d), _gated_rows(full_projector, 0, d)
    assert float((gated_top - gated_full).norm() / gated_full.norm()) < 0.01
    assert float(top_report.gates.sum()) == pytest.approx(float(full_report.gates.sum()), rel=0.05)  # Σg


def test_a_tie_at_the_cut_falls_back_to_the_exact_solve(one_torch_thread):
    """Gates tied across the k-th direction: only the full solve stores the cluster whole or not at all."""
    d = 300
    generator = torch.Generator().manual_seed(12)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=F64))
    spectrum = torch.cat([torch.full((20,), 0.01, dtype=F64), torch.logspace(-1, 1, d - 20, dtype=F64)])
    c_task = q @ torch.diag(spectrum) @ q.mT
    c_pre = torch.eye(d, dtype=F64)
    top_k, full = _solvers()
    top_projector, _ = top_k.solve("tied", (c_task + c_task.mT) / 2, c_pre)
    full_projector, _ = full.solve("tied", (c_task + c_task.mT) / 2, c_pre)
    assert top_k.top_k_fallbacks == {"tied": 1}
    torch.testing.assert_close(top_projector.gates, full_projector.gates)


def test_two_gates_tied_by_accident_decide_neither_solver(one_torch_thread):
    """A full-rank C_task whose gates are mostly tiny, with two λ that happen to lie within the tie tolerance: both
    solvers keep base 1 and the k most attenuated directions (``select_directions`` offers a cluster's gate as the
    base only when k cannot hold it). Before, the full solve offered the pair's gate, which won Σ|g − base| here
    and made it store the k *largest* λ, while the top-k solver stored the smallest (issue 26's benchmark at
    d = 4096: min cosine 0)."""
    d = 300
    generator = torch.Generator().manual_seed(13)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=F64))
    low = torch.logspace(-4, -3, 100, dtype=F64)
    low[60], low[61] = 5e-4, 5e-4 * (1 + 1e-9)  # the accidental pair, far from the cut at k = 12
    spectrum = torch.cat([low, torch.logspace(0, 0.5, 200, dtype=F64)])
    c_task = q @ torch.diag(spectrum) @ q.mT
    top_k, full = _solvers()
    top_projector, top_report = top_k.solve("layer", (c_task + c_task.mT) / 2, torch.eye(d, dtype=F64))
    full_projector, full_report = full.solve("layer", (c_task + c_task.mT) / 2, torch.eye(d, dtype=F64))
    assert top_k.top_k_fallbacks == {} and top_report.estimated
    assert full_projector.base == top_projector.base == 1.0
    cosines = torch.linalg.svdvals(full_projector.c_tilde_v.mT @ top_projector.v)
    assert float(cosines.min()) > 1 - 1e-8
    gated_top, gated_full = _gated_rows(top_projector, 1, d), _gated_rows(full_projector, 1, d)
    assert float((gated_top - gated_full).norm() / gated_full.norm()) < 0.01


def test_a_refresh_reuses_the_factor_of_an_unchanged_c_pre(monkeypatch, one_torch_thread):
    """C_pre is fixed after calibration: a refresh skips chol(C̃) (the d³/3 that dominates a wide top-k solve),
    and the same projector comes out; a C_pre changed in place is factored again."""
    d, tokens = 300, 40  # beside a null space: the largest end, which needs no other factor
    c_task, c_pre = spd(d, 20, tokens=tokens), spd(d, 21)
    factorizations = []
    real = torch.linalg.cholesky_ex

    def counting(matrix, *args, **kwargs):
        factorizations.append(matrix.shape[0])
        return real(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", counting)
    top_k, _ = _solvers()
    first, _ = top_k.solve("layer", c_task, c_pre)
    assert factorizations == [d]
    again, _ = top_k.solve("layer", c_task, c_pre)
    assert factorizations == [d] and top_k.top_k_fallbacks == {}
    torch.testing.assert_close(again.gates, first.gates)  # and the same directions (up to sign): the same update
    torch.testing.assert_close(_gated_rows(again, 0, d), _gated_rows(first, 0, d), atol=1e-8, rtol=0)
    c_pre.mul_(2.0)  # in place: the kept factor no longer fits
    moved, _ = top_k.solve("layer", c_task, c_pre)
    assert factorizations == [d, d]
    fresh, _ = _solvers()[0].solve("layer", c_task, c_pre)
    torch.testing.assert_close(_gated_rows(moved, 0, d), _gated_rows(fresh, 0, d), atol=1e-8, rtol=0)


def _refreshed_task(d: int, tokens: int):
    """The C_task EMA (decay 0.9) after a second window of ``tokens`` fresh rows: rank 2·tokens, and positive λ
    down to ~1e-3 of the largest beside its null space, which 40 Lanczos steps do not tell apart."""
    return 0.9 * spd(d, 30, tokens=tokens) + 0.1 * spd(d, 32, tokens=tokens)


@pytest.mark.parametrize(("d", "tokens", "tau_tolerance"), [(400, 100, 1e-9), (800, 150, 0.1)],
                         ids=["every_positive_solved", "median_from_slq"])
def test_a_refresh_beside_a_counted_null_space_needs_no_full_solve(d, tokens, tau_tolerance, one_torch_thread):
    """Without the rows folded into C_task, SLQ sees no null space here and the top-k solver falls back to the full
    solve (as every refresh of issue 26's benchmark did); with them it counts d − rows null directions and stores
    what the full solve stores. 200 positive λ are all solved (τ exact); 300 (above ``EXACT_POSITIVES``) take τ
    from the estimate's median with the counted null share moved to 0 (measured: 6% off)."""
    c_task, c_pre = _refreshed_task(d, tokens), spd(d, 31)
    full_projector, full_report = _solvers()[1].solve("layer", c_task, c_pre)
    blind, _ = _solvers()
    blind.solve("layer", c_task, c_pre)
    assert blind.top_k_fallbacks == {"layer": 1}, "the case the count exists for"
    top_k, _ = _solvers()
    top_projector, top_report = top_k.solve("layer", c_task, c_pre, task_rows=2 * tokens)
    assert top_k.top_k_fallbacks == {} and top_report.estimated
    assert top_projector.base == full_projector.base == 0.0
    assert top_report.stored == full_report.stored == 12
    assert top_report.tau == pytest.approx(full_report.tau, rel=tau_tolerance)
    cosines = torch.linalg.svdvals(full_projector.c_tilde_v.mT @ top_projector.v)
    assert float(cosines.min()) > 1 - 1e-8
    gated_top, gated_full = _gated_rows(top_projector, 0, d), _gated_rows(full_projector, 0, d)
    assert float((gated_top - gated_full).norm() / gated_full.norm()) < max(tau_tolerance, 1e-9) / 4


def test_a_null_share_moves_the_lowest_mass_to_zero():
    from folora_ds.method.topk_eigensolve import SpectrumEstimate

    estimate = SpectrumEstimate(torch.tensor([3.0, 1e-3, 2.0, 2e-3], dtype=F64),
                                torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=F64), probes=2)
    moved = estimate.with_null_share(0.4)
    assert float(moved.weights[moved.nodes == 0].sum()) == pytest.approx(0.4)
    torch.testing.assert_close(moved.weights.sum(), torch.tensor(1.0, dtype=F64))
    assert moved.mean(moved.nodes) == pytest.approx(0.1 * 2e-3 + 0.25 * (2.0 + 3.0)), "taken from the lowest nodes"
    assert moved.probes == 2
    assert torch.equal(estimate.with_null_share(0.0).weights[1:], estimate.weights[torch.argsort(estimate.nodes)])
    for share in (1.0, 1.5):  # all of it at 0 would leave τ's median nothing to stand on
        with pytest.raises(ValueError, match=f"null share {share} must be in"):
            estimate.with_null_share(share)


def test_a_row_count_below_the_rank_falls_back_instead_of_moving_positive_mass(one_torch_thread):
    """A count of fewer rows than C_task's rank would move positive λ to the null space and gate them at 0: the
    solver finds more positive λ than rows and leaves the choice to the full solve, as it does for no rows at all."""
    d, tokens = 400, 100
    c_task, c_pre = _refreshed_task(d, tokens), spd(d, 31)  # rank 200
    for wrong in (150, 0):
        top_k, _ = _solvers()
        projector, _ = top_k.solve("layer", c_task, c_pre, task_rows=wrong)
        assert top_k.top_k_fallbacks == {"layer": 1}, wrong
        full_projector, _ = _solvers()[1].solve("layer", c_task, c_pre)
        torch.testing.assert_close(projector.gates, full_projector.gates)


def test_a_solve_refuses_a_row_count_that_is_not_one():
    top_k, _ = _solvers()
    with pytest.raises(ValueError, match=r"'layer': task_rows=-3 must be None or an integer >= 0"):
        top_k.solve("layer", spd(20, 1), spd(20, 2), task_rows=-3)


def test_more_pairs_than_half_the_width_still_converge(one_torch_thread):
    """k + oversample > d/2 (every positive λ of a C_task beside a null space, as the solver asks for when there
    are few): the Krylov basis cannot grow past its first block, so each restart takes one subspace-iteration step
    (before, it restarted from the same span and never converged)."""
    d, k = 120, 70
    c_task = spd(d, 40, tokens=60)  # 60 positive λ, then the null space
    pairs = top_eigenpairs(lambda block: c_task @ block, d, k, dtype=F64, generator=torch.Generator().manual_seed(4))
    assert pairs.converged
    torch.testing.assert_close(pairs.values, torch.linalg.eigvalsh(c_task).flip(0)[:k], rtol=1e-8, atol=1e-12)


def test_float32_solves_converge_at_their_own_precision():
    """float32 triangular solves stall near 5e-6 relative residual: a 1e-8 tolerance would fall back to the full
    solve every time (it did, before ``residual_tolerance``)."""
    assert residual_tolerance(torch.float64) == 1e-8
    assert 1e-5 < residual_tolerance(torch.float32) < 1e-4
    d, k = 256, 8
    c_task, _, c_tilde, full = _problem(d, 6)
    for end in ("smallest", "largest"):
        top = generalized_top_k(c_task.float(), c_tilde.float(), k, end, generator=torch.Generator().manual_seed(6))
        assert top.converged, end
        indices = torch.arange(k) if end == "smallest" else torch.arange(d - k, d)
        torch.testing.assert_close(top.eigenvalues.double(), full.eigenvalues[indices], rtol=1e-3,
                                   atol=1e-4 * float(full.eigenvalues.max()))


def test_auto_solves_narrow_inputs_in_full():
    from folora_ds.method.config import FoLoRAConfig
    from folora_ds.method.spectral import solves_top_k

    auto = FoLoRAConfig(k=12, eigensolver="auto")
    assert not solves_top_k(auto, 4096) and solves_top_k(auto, 8192) and not solves_top_k(auto, 100)


def test_a_looser_residual_stops_earlier_and_is_a_backward_error(one_torch_thread):
    """``top_k_residual``'s meaning: the Ritz pairs at a 1e-3 residual are exact eigenpairs of M + E with
    E = −(R Yᵀ + Y Rᵀ) (R = MY − YΘ ⊥ Y after Rayleigh–Ritz), ‖E‖₂ = ‖R‖₂ ≤ √k · 1e-3 · θ_max; a dense top of the
    spectrum (where the iteration is slow) needs fewer applications for it than for float64's 1e-8."""
    d, k = 400, 12
    generator = torch.Generator().manual_seed(14)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=F64))
    matrix = q @ torch.diag(torch.cat([torch.logspace(-3, -1, d - 40, dtype=F64),
                                       torch.linspace(0.5, 1.0, 40, dtype=F64)])) @ q.mT
    matrix = (matrix + matrix.mT) / 2

    def solve(tolerance):
        return top_eigenpairs(lambda block: matrix @ block, d, k, tolerance=tolerance, dtype=F64,
                              generator=torch.Generator().manual_seed(14))

    loose, tight = solve(1e-3), solve(1e-8)
    assert loose.converged and tight.converged and loose.residual <= 1e-3
    assert loose.applications < tight.applications
    residuals = matrix @ loose.vectors - loose.vectors * loose.values
    perturbation = -(residuals @ loose.vectors.mT + loose.vectors @ residuals.mT)
    torch.testing.assert_close((matrix + perturbation) @ loose.vectors, loose.vectors * loose.values,
                               atol=1e-12, rtol=0)
    assert float(torch.linalg.matrix_norm(perturbation, ord=2)) <= math.sqrt(k) * 1e-3 * float(loose.values[0])


def test_the_default_residual_stores_the_exact_modes_directions(one_torch_thread):
    """The default ``top_k_residual`` (1e-3) against the exact mode (None) beside a counted null space: the same
    stored directions, gates and gated update to well within the tolerance τ's estimate already has (10%)."""
    from folora_ds.method.config import FoLoRAConfig
    from folora_ds.method.spectral import SpectralSolver, top_k_tolerance

    d, tokens = 800, 150
    c_task, c_pre = _refreshed_task(d, tokens), spd(d, 31)
    exact, _ = _solvers()
    default, _ = _solvers(top_k_residual=FoLoRAConfig().top_k_residual)
    assert top_k_tolerance(default.config) == 1e-3 and top_k_tolerance(exact.config) == 1e-8
    exact_projector, exact_report = exact.solve("layer", c_task, c_pre, task_rows=2 * tokens)
    default_projector, default_report = default.solve("layer", c_task, c_pre, task_rows=2 * tokens)
    assert default.top_k_fallbacks == {} and default_report.estimated
    cosines = torch.linalg.svdvals(exact_projector.c_tilde_v.mT @ default_projector.v)
    assert float(cosines.min()) > 1 - 1e-5  # measured: 1 − 1.1e-6, a principal angle of 1.5e-3
    torch.testing.assert_close(default_projector.gates, exact_projector.gates, atol=1e-5, rtol=0)  # 5e-8
    gated_default, gated_exact = _gated_rows(default_projector, 0, d), _gated_rows(exact_projector, 0, d)
    assert float((gated_default - gated_exact).norm() / gated_exact.norm()) < 5e-3  # 1.4e-3: the angle
    assert SpectralSolver(FoLoRAConfig(k=12, solve_dtype="float32", top_k_residual=1e-6)).config.top_k_residual == 1e-6
    assert top_k_tolerance(FoLoRAConfig(k=12, solve_dtype="float32", top_k_residual=1e-6)) == residual_tolerance(
        torch.float32), "never finer than the solve dtype reaches"


def test_the_largest_end_needs_no_c_tilde_given_its_factor(one_torch_thread):
    """A refresh of the largest end keeps L and never copies C̃: C̃V comes out as L·Y, equal to C̃ @ V."""
    d, k = 300, 10
    c_task, _, c_tilde, _ = _problem(d, 15, tokens=40)
    lower = torch.linalg.cholesky(c_tilde)
    with_c_tilde = generalized_top_k(c_task, c_tilde, k, "largest", factor=(lower, 0.0),
                                     generator=torch.Generator().manual_seed(15))
    without = generalized_top_k(c_task, None, k, "largest", factor=(lower, 0.0),
                                generator=torch.Generator().manual_seed(15))
    torch.testing.assert_close(without.c_tilde_v, c_tilde @ without.v, atol=1e-10, rtol=0)
    torch.testing.assert_close(without.c_tilde_v, with_c_tilde.c_tilde_v)
    for end, factor in (("smallest", (lower, 0.0)), ("largest", None)):
        with pytest.raises(ValueError, match="needs C̃"):
            generalized_top_k(c_task, None, k, end, factor=factor)

"""folora_ds.method.spectral: generalized eigensolve, gates, low-rank projector, and the solver's failure policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.eigensolve import (
    ConsecutiveSolveFailuresError,
    NonFiniteStatisticsError,
    SpectralSolveError,
    generalized_eigh,
    solve_generalized_eigenproblem,
)
from folora_ds.method.projector import (
    apply_projector,
)
from folora_ds.method.spectral import SpectralSolver, effective_tau, gate_values, zero_null_space
from tests.testing.linalg import F64, dense_projector, ill_conditioned, random_rows, ridged, spd

LAYER = "model.layers.3.self_attn.q_proj"


# ---------------------------------------------------------------------------------------------- the solve
@pytest.mark.parametrize("d", [3, 16, 64, 128])
@pytest.mark.parametrize("ridge", [1e-3, 1e-6])
def test_solve_matches_scipy_generalized_eigh(d, ridge):
    c_task, c_pre = spd(d, seed=d), spd(d, seed=d + 1)
    result = solve_generalized_eigenproblem(c_task, c_pre, ridge=ridge)
    c_tilde = ridged(c_pre, ridge)
    reference = scipy.linalg.eigh(c_task.numpy(), c_tilde.numpy(), eigvals_only=True)

    assert result.ridge == ridge and result.dtype == F64
    lam, v = result.eigenvalues, result.eigenvectors
    assert lam.shape == (d,) and v.shape == (d, d) and result.c_tilde_v.shape == (d, d)
    scale = float(lam.abs().max())
    np.testing.assert_allclose(lam.numpy(), reference, rtol=1e-9, atol=1e-11 * scale)
    assert bool((lam[1:] >= lam[:-1]).all()), "eigenvalues must be ascending"
    torch.testing.assert_close(v.mT @ c_tilde @ v, torch.eye(d, dtype=F64), rtol=0, atol=1e-9)
    torch.testing.assert_close(v.mT @ c_task @ v, torch.diag(lam), rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(result.c_tilde_v, c_tilde @ v, rtol=0, atol=1e-10 * float(c_tilde.abs().max()))


@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("condition", [1e8, 1e10])
def test_solve_matches_scipy_on_ill_conditioned_c_pre(d, condition):
    """C_pre with eigenvalues spread over 8–10 decades; a ridge small enough to keep C̃ that ill-conditioned."""
    c_pre = ill_conditioned(d, seed=d, condition=condition)
    c_task = spd(d, seed=d + 7)
    ridge = 1e-14
    result = solve_generalized_eigenproblem(c_task, c_pre, ridge=ridge)
    c_tilde = ridged(c_pre, ridge)
    assert result.ridge == ridge
    assert np.linalg.cond(c_tilde.numpy()) > 0.1 * condition
    reference = scipy.linalg.eigh(c_task.numpy(), c_tilde.numpy(), eigvals_only=True)

    lam, v = result.eigenvalues, result.eigenvectors
    assert bool(torch.isfinite(lam).all() and torch.isfinite(v).all())
    assert bool((lam[1:] >= lam[:-1]).all())
    scale = float(lam.abs().max())
    np.testing.assert_allclose(lam.numpy(), reference, rtol=1e-6, atol=1e-9 * scale)
    torch.testing.assert_close(v.mT @ c_tilde @ v, torch.eye(d, dtype=F64), rtol=0, atol=1e-6)
    torch.testing.assert_close(v.mT @ c_task @ v, torch.diag(lam), rtol=0, atol=1e-7 * scale)
    torch.testing.assert_close(result.c_tilde_v, c_tilde @ v, rtol=0, atol=1e-7)


def test_rank_deficient_c_pre_is_regularised_by_the_ridge():
    d = 32
    c_pre = spd(d, seed=1, tokens=5)  # rank 5
    assert int(torch.linalg.matrix_rank(c_pre)) == 5
    result = solve_generalized_eigenproblem(spd(d, seed=2), c_pre, ridge=1e-3)
    assert result.ridge == 1e-3  # the initial ridge already suffices: no escalation
    for tensor in (result.eigenvalues, result.eigenvectors, result.c_tilde_v):
        assert bool(torch.isfinite(tensor).all())
    c_tilde = ridged(c_pre, 1e-3)
    reference = scipy.linalg.eigh(spd(d, seed=2).numpy(), c_tilde.numpy(), eigvals_only=True)
    np.testing.assert_allclose(result.eigenvalues.numpy(), reference, rtol=1e-8)


def test_c_pre_with_all_zero_rows_is_regularised_by_the_ridge():
    """Inputs that never fire on proxy data give zero rows/columns of C_pre: the ridge makes C̃ definite."""
    d = 10
    c_pre = spd(d, seed=3)
    c_pre[:3, :] = 0
    c_pre[:, :3] = 0
    result = solve_generalized_eigenproblem(spd(d, seed=4), c_pre)
    assert result.ridge == 1e-3
    assert bool(torch.isfinite(result.eigenvalues).all() and torch.isfinite(result.eigenvectors).all())
    c_tilde = ridged(c_pre, 1e-3)
    v = result.eigenvectors
    torch.testing.assert_close(v.mT @ c_tilde @ v, torch.eye(d, dtype=F64), rtol=0, atol=1e-9)


def test_non_psd_c_pre_escalates_the_ridge():
    # trace/d = 0.7475; δ·0.7475 must exceed 0.01 to make C̃ definite: 1e-3 and 1e-2 fail, 1e-1 succeeds.
    c_pre = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.01], dtype=F64))
    c_task = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64))
    result = solve_generalized_eigenproblem(c_task, c_pre, ridge=1e-3)
    assert result.ridge > 1e-3
    assert result.ridge == pytest.approx(1e-1)
    c_tilde = ridged(c_pre, result.ridge)
    v = result.eigenvectors
    torch.testing.assert_close(v.mT @ c_tilde @ v, torch.eye(4, dtype=F64), rtol=0, atol=1e-12)


def test_non_psd_c_pre_without_escalations_raises_naming_the_layer():
    c_pre = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.01], dtype=F64))
    with pytest.raises(SpectralSolveError) as caught:
        solve_generalized_eigenproblem(torch.eye(4, dtype=F64), c_pre, max_ridge_escalations=0, layer=LAYER)
    assert caught.value.layer == LAYER
    assert LAYER in str(caught.value)
    assert not isinstance(caught.value, NonFiniteStatisticsError)


@pytest.mark.parametrize("which", ["c_task", "c_pre"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_statistics_raise_naming_the_layer(which, bad):
    c_task, c_pre = spd(6, seed=0), spd(6, seed=1)
    (c_task if which == "c_task" else c_pre)[2, 4] = bad
    with pytest.raises(NonFiniteStatisticsError) as caught:
        solve_generalized_eigenproblem(c_task, c_pre, layer=LAYER)
    assert caught.value.layer == LAYER
    assert LAYER in str(caught.value)
    assert ("C_task" if which == "c_task" else "C_pre") in str(caught.value)
    assert isinstance(caught.value, SpectralSolveError)


def test_finite_statistics_whose_float32_sum_overflows_are_not_called_non_finite():
    """The NaN/Inf check sums each matrix in its own dtype; a finite float32 C_task whose sum overflows must pass it
    (the exact check decides) and fail, if at all, for what it is."""
    from folora_ds.method.eigensolve import check_statistics

    huge = torch.full((4, 4), 3e38, dtype=torch.float32)
    assert not bool(torch.isfinite(huge.sum()))
    check_statistics(huge, torch.eye(4), LAYER)
    huge[1, 2] = math.nan
    with pytest.raises(NonFiniteStatisticsError, match="C_task contains NaN or Inf"):
        check_statistics(huge, torch.eye(4), LAYER)


def test_zero_c_pre_raises_spectral_solve_error():
    with pytest.raises(SpectralSolveError) as caught:
        solve_generalized_eigenproblem(spd(5, seed=0), torch.zeros(5, 5, dtype=F64), layer=LAYER)
    assert caught.value.layer == LAYER
    assert not isinstance(caught.value, NonFiniteStatisticsError)


@pytest.mark.parametrize(
    "task_shape, pre_shape",
    [((4, 4), (5, 5)), ((4, 5), (4, 5)), ((4,), (4,)), ((2, 4, 4), (2, 4, 4)), ((4, 4), (4, 5))],
)
def test_shape_errors_raise_value_error(task_shape, pre_shape):
    with pytest.raises(ValueError, match=LAYER):
        solve_generalized_eigenproblem(torch.ones(task_shape, dtype=F64), torch.ones(pre_shape, dtype=F64),
                                       layer=LAYER)


def test_float32_solve_is_finite_and_close_to_float64():
    c_task, c_pre = spd(24, seed=5, dtype=torch.float32), spd(24, seed=6, dtype=torch.float32)
    result = solve_generalized_eigenproblem(c_task, c_pre, solve_dtype=torch.float32, retry_float64=True)
    exact = solve_generalized_eigenproblem(c_task.double(), c_pre.double())
    assert result.dtype == torch.float32
    assert result.eigenvalues.dtype == torch.float32 and result.eigenvectors.dtype == torch.float32
    for tensor in (result.eigenvalues, result.eigenvectors, result.c_tilde_v):
        assert bool(torch.isfinite(tensor).all())
    torch.testing.assert_close(result.eigenvalues.double(), exact.eigenvalues, rtol=1e-3,
                               atol=1e-4 * float(exact.eigenvalues.max()))


def _nearly_singular_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """C_pre definite in float64 (smallest eigenvalue 1e-10) but exactly singular once rounded to float32."""
    c_pre = torch.tensor([[1.0, 1.0 - 1e-10], [1.0 - 1e-10, 1.0]], dtype=F64)
    return torch.diag(torch.tensor([1.0, 2.0], dtype=F64)), c_pre


def test_failed_float32_cholesky_is_retried_in_float64():
    c_task, c_pre = _nearly_singular_pair()
    result = solve_generalized_eigenproblem(c_task, c_pre, ridge=1e-13, max_ridge_escalations=0,
                                            solve_dtype=torch.float32, retry_float64=True, layer=LAYER)
    assert result.dtype == F64
    assert bool(torch.isfinite(result.eigenvalues).all())
    with pytest.raises(SpectralSolveError, match="q_proj"):
        solve_generalized_eigenproblem(c_task, c_pre, ridge=1e-13, max_ridge_escalations=0,
                                       solve_dtype=torch.float32, retry_float64=False, layer=LAYER)


def _float32_overflow_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Finite float32 statistics whose generalized eigenvalues (~1e40) overflow float32 but not float64."""
    c_pre = spd(6, seed=11, dtype=torch.float32) * 1e-30
    c_task = (spd(6, seed=12, dtype=torch.float32) + torch.eye(6)) * 1e10
    return c_task, c_pre


def test_float32_eigh_failure_is_retried_in_float64():
    """A float32 solve that fails in any way (here: eigh of an overflowed whitened matrix) must be retried in
    float64 when retry_float64=True, and must surface as SpectralSolveError naming the layer otherwise."""
    c_task, c_pre = _float32_overflow_pair()
    assert bool(torch.isfinite(c_task).all() and torch.isfinite(c_pre).all())
    exact = solve_generalized_eigenproblem(c_task.double(), c_pre.double())
    assert bool(torch.isfinite(exact.eigenvalues).all())

    result = solve_generalized_eigenproblem(c_task, c_pre, solve_dtype=torch.float32, retry_float64=True,
                                            layer=LAYER)
    assert result.dtype == F64
    torch.testing.assert_close(result.eigenvalues, exact.eigenvalues)


def test_float32_eigh_failure_without_retry_is_a_spectral_solve_error():
    c_task, c_pre = _float32_overflow_pair()
    with pytest.raises(SpectralSolveError) as caught:
        solve_generalized_eigenproblem(c_task, c_pre, solve_dtype=torch.float32, retry_float64=False,
                                       layer=LAYER)
    assert caught.value.layer == LAYER


def test_generalized_eigh_returns_eigenvalues_and_eigenvectors():
    c_task, c_pre = spd(9, seed=0), spd(9, seed=1)
    lam, v = generalized_eigh(c_task, c_pre, ridge=1e-4)
    result = solve_generalized_eigenproblem(c_task, c_pre, ridge=1e-4)
    torch.testing.assert_close(lam, result.eigenvalues, rtol=0, atol=0)
    torch.testing.assert_close(v, result.eigenvectors, rtol=0, atol=0)
    with pytest.raises(NonFiniteStatisticsError, match=LAYER):
        generalized_eigh(c_task * math.nan, c_pre, layer=LAYER)


# ---------------------------------------------------------------------------------------------- gates
LAMBDAS = torch.tensor([0.0, 1e-6, 0.01, 0.3, 1.0, 2.5, 40.0, 1e5], dtype=F64)


@pytest.mark.parametrize("tau", [1e-3, 0.5, 1.0, 7.0])
def test_rational_gate_is_lambda_over_lambda_plus_tau(tau):
    gates = gate_values(LAMBDAS, kind="rational", tau=tau)
    torch.testing.assert_close(gates, LAMBDAS / (LAMBDAS + tau), rtol=1e-15, atol=0)
    assert bool(((gates >= 0) & (gates <= 1)).all())


@pytest.mark.parametrize("tau", [1e-3, 0.5, 1.0, 7.0])
def test_sigmoid_gate_at_temperature_one_equals_rational(tau):
    sigmoid = gate_values(LAMBDAS, kind="sigmoid", tau=tau, temperature=1.0)
    rational = gate_values(LAMBDAS, kind="rational", tau=tau)
    torch.testing.assert_close(sigmoid, rational, rtol=1e-12, atol=1e-300)


def test_sigmoid_gate_approaches_hard_gate_as_temperature_shrinks():
    tau = 0.5
    lam = torch.tensor([0.0, 0.01, 0.2, 0.45, 0.55, 1.0, 3.0, 1e3], dtype=F64)  # none equal to τ
    hard = gate_values(lam, kind="hard", tau=tau)
    previous_gap = math.inf
    for temperature in (1.0, 0.3, 0.1, 0.03, 0.01):
        gap = float((gate_values(lam, kind="sigmoid", tau=tau, temperature=temperature) - hard).abs().max())
        assert gap < previous_gap
        previous_gap = gap
    assert previous_gap < 1e-4


def test_hard_gate_is_a_threshold_at_tau():
    lam = torch.tensor([0.0, 0.49, 0.5, 0.51, 2.0], dtype=F64)
    gates = gate_values(lam, kind="hard", tau=0.5)
    assert gates.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert gates.dtype == F64


@pytest.mark.parametrize("kind", ["rational", "sigmoid", "hard"])
def test_negative_eigenvalues_get_a_zero_gate(kind):
    lam = torch.tensor([-1e-12, -3.0, 0.0], dtype=F64)
    gates = gate_values(lam, kind=kind, tau=0.1)
    assert bool(torch.isfinite(gates).all())
    torch.testing.assert_close(gates, torch.zeros(3, dtype=F64), rtol=0, atol=1e-200)


def test_gate_values_keep_shape_and_dtype():
    lam = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0))
    for kind in ("rational", "sigmoid", "hard"):
        gates = gate_values(lam, kind=kind, tau=0.5)
        assert gates.shape == lam.shape and gates.dtype == torch.float32


@pytest.mark.parametrize("tau", [0.0, -1.0, math.nan, math.inf])
def test_invalid_tau_raises(tau):
    with pytest.raises(ValueError):
        gate_values(LAMBDAS, kind="rational", tau=tau)


@pytest.mark.parametrize("temperature", [0.0, -0.5, math.nan])
def test_invalid_sigmoid_temperature_raises(temperature):
    with pytest.raises(ValueError, match="temperature"):
        gate_values(LAMBDAS, kind="sigmoid", tau=1.0, temperature=temperature)


@pytest.mark.parametrize("kind", ["soft", "Rational", "", "linear"])
def test_unknown_gate_kind_raises(kind):
    with pytest.raises(ValueError, match="kind"):
        gate_values(LAMBDAS, kind=kind, tau=1.0)


def test_effective_tau_absolute_is_tau_itself():
    assert effective_tau(LAMBDAS, 0.25, "absolute") == 0.25
    assert effective_tau(torch.zeros(4, dtype=F64), 0.25, "absolute") == 0.25


def test_effective_tau_relative_median_uses_positive_eigenvalues_only():
    # Five positive λ (median 3.0) among zeros and round-off negatives that must not drag the median down.
    lam = torch.tensor([-1e-15, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 10.0, 50.0], dtype=F64)
    assert effective_tau(lam, 0.5, "relative_median") == pytest.approx(1.5)
    assert effective_tau(lam, 2.0, "relative_median") == pytest.approx(6.0)


@pytest.mark.parametrize("lam", [torch.zeros(5, dtype=F64), torch.tensor([-1.0, 0.0, -1e-12], dtype=F64)])
def test_effective_tau_relative_median_needs_a_positive_eigenvalue(lam):
    with pytest.raises(ValueError, match="positive"):
        effective_tau(lam, 1.0, "relative_median")


def test_effective_tau_unknown_mode_raises():
    with pytest.raises(ValueError, match="tau_mode"):
        effective_tau(LAMBDAS, 1.0, "relative_mean")


# ---------------------------------------------------------------------------------------------- SpectralSolver
def _good_pair(d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return spd(d, seed=seed + 50), spd(d, seed=seed + 60)


def _nan_pair(d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    c_task, c_pre = _good_pair(d)
    c_task[0, 0] = math.nan
    return c_task, c_pre


def test_solver_first_solve_failure_raises():
    solver = SpectralSolver(FoLoRAConfig())
    with pytest.raises(NonFiniteStatisticsError) as caught:
        solver.solve(LAYER, *_nan_pair())
    assert caught.value.layer == LAYER
    assert solver.reports == {}


def test_solver_first_solve_with_zero_c_task_raises():
    solver = SpectralSolver(FoLoRAConfig())
    _, c_pre = _good_pair()
    with pytest.raises(SpectralSolveError) as caught:
        solver.solve(LAYER, torch.zeros(8, 8, dtype=F64), c_pre)
    assert caught.value.layer == LAYER
    with pytest.raises(SpectralSolveError):
        SpectralSolver(FoLoRAConfig(tau_mode="absolute")).solve(LAYER, torch.zeros(8, 8, dtype=F64), c_pre)


def test_solver_good_solve_reports_gates_tau_and_ridge():
    config = FoLoRAConfig(gate="rational", tau=0.5, tau_mode="relative_median", ridge=1e-4)
    solver = SpectralSolver(config)
    c_task, c_pre = _good_pair()
    projector, report = solver.solve(LAYER, c_task, c_pre)
    result = solve_generalized_eigenproblem(c_task, c_pre, ridge=1e-4)
    tau = effective_tau(result.eigenvalues, 0.5, "relative_median")
    gates = gate_values(result.eigenvalues, kind="rational", tau=tau)
    assert report.key == LAYER and not report.failed and report.consecutive_failures == 0
    assert report.tau == pytest.approx(tau) and report.ridge == 1e-4
    torch.testing.assert_close(report.eigenvalues, result.eigenvalues)
    torch.testing.assert_close(report.gates, gates)
    assert projector.rank == 8  # k=None keeps every direction
    rows = random_rows((3, 8), seed=0)
    torch.testing.assert_close(apply_projector(rows, projector), rows @ dense_projector(result, gates))
    assert solver.reports == {LAYER: report}


def test_solver_failed_resolve_keeps_previous_projector_and_counts():
    solver = SpectralSolver(FoLoRAConfig(max_consecutive_failures=3))
    first, first_report = solver.solve(LAYER, *_good_pair())
    kept, report = solver.solve(LAYER, *_nan_pair())
    assert kept is first
    assert kept.v is first.v and kept.c_tilde_v is first.c_tilde_v and kept.gates is first.gates
    assert report.failed and report.consecutive_failures == 1
    torch.testing.assert_close(report.eigenvalues, first_report.eigenvalues, rtol=0, atol=0)
    torch.testing.assert_close(report.gates, first_report.gates, rtol=0, atol=0)
    assert report.tau == first_report.tau and report.ridge == first_report.ridge
    assert solver.reports[LAYER] is report


def test_solver_zero_c_task_resolve_counts_as_failure():
    solver = SpectralSolver(FoLoRAConfig(max_consecutive_failures=3))
    first, _ = solver.solve(LAYER, *_good_pair())
    _, c_pre = _good_pair()
    kept, report = solver.solve(LAYER, torch.zeros(8, 8, dtype=F64), c_pre)
    assert kept is first and report.failed and report.consecutive_failures == 1


def test_solver_good_solve_resets_the_failure_count():
    solver = SpectralSolver(FoLoRAConfig(max_consecutive_failures=3))
    solver.solve(LAYER, *_good_pair())
    for _ in range(2):
        solver.solve(LAYER, *_nan_pair())
    assert solver.reports[LAYER].consecutive_failures == 2
    fresh, report = solver.solve(LAYER, *_good_pair(seed=1))
    assert not report.failed and report.consecutive_failures == 0
    for expected in (1, 2):  # the budget is whole again
        kept, report = solver.solve(LAYER, *_nan_pair())
        assert kept is fresh and report.consecutive_failures == expected


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_solver_raises_after_max_consecutive_failures_naming_the_key(limit):
    solver = SpectralSolver(FoLoRAConfig(max_consecutive_failures=limit))
    solver.solve(LAYER, *_good_pair())
    for failures in range(1, limit):
        _, report = solver.solve(LAYER, *_nan_pair())
        assert report.failed and report.consecutive_failures == failures
    with pytest.raises(ConsecutiveSolveFailuresError, match=r"q_proj") as caught:
        solver.solve(LAYER, *_nan_pair())
    assert LAYER in str(caught.value)
    assert isinstance(caught.value.__cause__, SpectralSolveError)


def test_solver_failures_are_counted_per_key():
    solver = SpectralSolver(FoLoRAConfig(max_consecutive_failures=2))
    solver.solve("a", *_good_pair())
    solver.solve("b", *_good_pair(seed=3))
    _, report_a = solver.solve("a", *_nan_pair())
    _, report_b = solver.solve("b", *_good_pair(seed=4))
    assert report_a.consecutive_failures == 1 and not report_b.failed
    with pytest.raises(SpectralSolveError):  # "c" never had a basis: its first failure raises
        solver.solve("c", *_nan_pair())
    assert set(solver.reports) == {"a", "b"}


@pytest.mark.parametrize("k", [1, 3, 8])
def test_solver_k_limits_projector_rank(k):
    solver = SpectralSolver(FoLoRAConfig(k=k))
    projector, report = solver.solve(LAYER, *_good_pair())
    assert projector.rank == min(k, 8) and projector.dim == 8
    torch.testing.assert_close(projector.gates, torch.sort(report.gates).values[:k], rtol=0, atol=0)
    assert report.gates.shape == (8,)


def test_solver_float32_config_solves():
    solver = SpectralSolver(FoLoRAConfig(solve_dtype="float32"))
    c_task, c_pre = _good_pair()
    projector, report = solver.solve(LAYER, c_task.float(), c_pre.float())
    assert projector.v.dtype == torch.float32 and not report.failed
    assert bool(torch.isfinite(projector.v).all())


def test_solver_float32_eigh_failure_on_resolve_keeps_previous_basis():
    """A re-solve that fails inside eigh (float32 overflow, no retry) must follow the failure policy."""
    solver = SpectralSolver(FoLoRAConfig(solve_dtype="float32", retry_float64=False))
    first, _ = solver.solve(LAYER, *(m.float() for m in _good_pair(d=6)))
    kept, report = solver.solve(LAYER, *_float32_overflow_pair())
    assert kept is first and report.failed and report.consecutive_failures == 1


# ---------------------------------------------------------------------------------------------- ties at k
def test_solver_reports_what_the_projector_keeps():
    c_pre = spd(12, 7)
    solver = SpectralSolver(FoLoRAConfig(k=4, tau=0.5, tau_mode="absolute"))
    _, report = solver.solve(LAYER, spd(12, 8, tokens=3), c_pre)
    assert (report.stored, report.approximated, report.split_ties) == (3, 0, 0) and report.base_gate < 1e-6
    restored = SpectralSolver(FoLoRAConfig(k=4, tau=0.5, tau_mode="absolute"))
    restored.load_state_dict(solver.state_dict())
    assert (restored.reports[LAYER].stored, restored.reports[LAYER].base_gate) == (3, report.base_gate)
    assert restored.projector(LAYER).base == report.base_gate


def test_round_off_eigenvalues_of_the_task_null_space_become_exact_zeros():
    lam = torch.tensor([-3e-16, 2e-16, 5e-8, 1e-3, 0.5, 2.0], dtype=F64)
    torch.testing.assert_close(zero_null_space(lam), torch.tensor([0, 0, 0, 1e-3, 0.5, 2.0], dtype=F64))
    # the median of the "positive" ones is then taken over real directions only
    assert effective_tau(zero_null_space(lam), 1.0, "relative_median") == pytest.approx(0.5)

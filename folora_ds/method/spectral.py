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
import zlib
from dataclasses import dataclass

import torch

from folora_ds.method.config import TOP_K_MIN_DIM, FoLoRAConfig
from folora_ds.method.eigensolve import (
    ConsecutiveSolveFailuresError,
    SpectralSolveError,
    check_statistics,
    solve_generalized_eigenproblem,
)
from folora_ds.method.projector import Projector, build_projector, select_directions
from folora_ds.method.topk_eigensolve import (
    GeneralizedTopK,
    SpectrumEstimate,
    generalized_spectrum,
    generalized_top_k,
    residual_tolerance,
    shifted_cholesky,
)

EXACT_POSITIVES = 256
"""Beside a null space, the top-k solver computes every positive λ when there are at most max(4k, this) of them:
τ's median is then exact; SLQ's estimate of the median of a small positive part is off by up to ~15%."""
NULL_SPACE_RTOL = 1e-6
"""Generalized eigenvalues below this fraction of the largest are C_task's null space seen through round-off."""


def solves_top_k(config: FoLoRAConfig, dim: int) -> bool:
    """Whether an input of width ``dim`` is solved for its k stored directions only (``config.eigensolver``)."""
    return config.k is not None and config.k < dim and (config.eigensolver == "top_k" or (
        config.eigensolver == "auto" and dim >= TOP_K_MIN_DIM and 16 * config.k <= dim))


def top_k_tolerance(config: FoLoRAConfig) -> float:
    """The relative residual the top-k solver's eigenpairs must reach: ``config.top_k_residual``, or what the
    solve dtype allows where that is finer (``residual_tolerance``; None asks for exactly that)."""
    floor = residual_tolerance(getattr(torch, config.solve_dtype))
    return floor if config.top_k_residual is None else max(config.top_k_residual, floor)


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


def configured_gates(eigenvalues: torch.Tensor, config: FoLoRAConfig,
                     tau_scale: float = 1.0) -> tuple[torch.Tensor, float, torch.Tensor]:
    """``(λ with the null space at 0, absolute τ, gates)`` of a full solve's eigenvalues under ``config``'s gate,
    τ and τ mode, τ multiplied by ``tau_scale`` (the budget's)."""
    eigenvalues = zero_null_space(eigenvalues)
    tau = effective_tau(eigenvalues, config.tau, config.tau_mode) * tau_scale
    return eigenvalues, tau, gate_values(eigenvalues, kind=config.gate, tau=tau, temperature=config.temperature)


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
        estimated: the top-k solver made it: ``eigenvalues`` and ``gates`` hold the k stored directions exactly
            and the other d − k as quantiles of the spectrum's SLQ estimate (their sum Σg is an estimate too).
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
    estimated: bool = False


class SpectralSolver:
    """Solves bases per input key under the configured failure policy, keeping the last good basis.

    A first solve that fails raises (training must not start without a basis). A later failed re-solve keeps
    the previous basis and counts the failure; ``max_consecutive_failures`` failures in a row raise
    ``ConsecutiveSolveFailuresError`` naming the input.

    The top-k solver keeps each input's Cholesky factor L of C̃ (one (d, d) in the solve dtype on its owner):
    C_pre is fixed after calibration, so a refresh skips the d³/3 and pays only operator applications.
    """

    def __init__(self, config: FoLoRAConfig) -> None:
        self.config = config
        self._projectors: dict[str, Projector] = {}
        self._reports: dict[str, SolveReport] = {}
        self._consecutive_failures: dict[str, int] = {}
        self._warm_starts: dict[tuple[str, str], torch.Tensor] = {}
        self._pre_factors: dict[str, tuple[torch.Tensor, int, torch.Tensor]] = {}  # key → (C_pre, version, L)
        self.top_k_fallbacks: dict[str, int] = {}

    def solve(self, key: str, c_task: torch.Tensor, c_pre: torch.Tensor, *, tau_scale: float = 1.0,
              task_rows: int | None = None) -> tuple[Projector, SolveReport]:
        """Solve one input; returns the projector in use and a report. See the class docstring for failures.

        ``tau_scale`` multiplies the configured τ (the forgetting budget's dual-ascent factor, 1 without one).
        ``task_rows``: the token rows folded into ``c_task`` (``CovarianceEMA.rows``; None: unknown), a bound on
        its rank that the top-k solver uses to count C_task's null space (at least d − rows directions).
        """
        cfg = self.config
        if task_rows is not None and (isinstance(task_rows, bool) or not isinstance(task_rows, int) or task_rows < 0):
            raise ValueError(f"{key!r}: task_rows={task_rows!r} must be None or an integer >= 0")
        if solves_top_k(cfg, c_pre.shape[0]):
            check_statistics(c_task, c_pre, key)
            solved = self._solve_top_k(key, c_task, c_pre, tau_scale, task_rows)
            if solved is not None:
                return self._keep(key, *solved)
            self.top_k_fallbacks[key] = self.top_k_fallbacks.get(key, 0) + 1  # the exact solve decides
        try:
            result = solve_generalized_eigenproblem(
                c_task, c_pre, ridge=cfg.ridge, max_ridge_escalations=cfg.max_ridge_escalations,
                solve_dtype=getattr(torch, cfg.solve_dtype), retry_float64=cfg.retry_float64, layer=key)
            if not bool((result.eigenvalues > 0).any()):
                raise SpectralSolveError(key, "C_task is zero (no task tokens reached this input)")
            eigenvalues, tau, gates = configured_gates(result.eigenvalues, cfg, tau_scale)
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
        choice = select_directions(gates, cfg.k, cfg.gate_tie_tolerance, null_count=int((eigenvalues == 0).sum()))
        projector = build_projector(result, gates, cfg.k, choice=choice)
        report = SolveReport(key, result.eigenvalues, gates, tau, result.ridge, failed=False,
                             consecutive_failures=0, stored=choice.indices.numel(), base_gate=choice.base,
                             approximated=choice.approximated, split_ties=choice.split_ties)
        return self._keep(key, projector, report)

    def _keep(self, key: str, projector: Projector, report: SolveReport) -> tuple[Projector, SolveReport]:
        self._projectors[key] = projector
        self._reports[key] = report
        self._consecutive_failures[key] = 0
        return projector, report

    def _solve_top_k(self, key: str, c_task: torch.Tensor, c_pre: torch.Tensor, tau_scale: float,
                     task_rows: int | None) -> tuple[Projector, SolveReport] | None:
        """The projector of the k directions ``select_directions`` would store, without the full solve (module
        ``topk_eigensolve``); None — the full solve then decides — when an iteration does not converge, a factor
        does not exist, or k would cut a tied cluster (which only the full solve stores whole or not at all).

        The spectrum estimate (SLQ through L = chol(C̃), ``generalized_spectrum``) gives λ_max (so the null space,
        λ < NULL_SPACE_RTOL·λ_max), τ (its median) and the choice of base as ``select_directions`` makes it: base 1
        (store the k smallest λ) unless the null-space cluster's gate leaves less Σ|g − base| (store the k
        largest); a null count too close to k to tell on which side it lies falls back. Only the chosen end is
        then solved: the largest through the same L, the smallest through K = chol(C_task + εC̃).

        With ``task_rows`` < d, the null space is counted rather than estimated: at least d − task_rows
        directions, moved to λ = 0 in the estimate (``SpectrumEstimate.with_null_share``), which SLQ alone cannot
        tell from small positive λ (a refresh after a window of new tokens would fall back every time). A counted
        null space larger than k settles the side of k it lies on; more positive λ found than rows falls back."""
        cfg, dim, k = self.config, c_pre.shape[0], self.config.k
        dtype = getattr(torch, cfg.solve_dtype)
        scale = float(torch.trace(c_pre)) / dim
        if not scale > 0:
            return None

        made: list[torch.Tensor] = []

        def tilde() -> torch.Tensor:  # C̃ in the solve dtype: a (d, d) copy, made once and only where a step needs
            if not made:  # it (a refresh of the largest end keeps L and needs none)
                made.append(c_pre.to(dtype, copy=True))
                made[0].diagonal().add_(cfg.ridge * scale)
            return made[0]

        c_task = c_task.to(dtype)
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))  # the same draw on any rank
        tolerance = top_k_tolerance(cfg)
        lower = self._pre_factor(key, c_pre, tilde)
        if lower is None:
            return None
        spectrum = generalized_spectrum(c_task, lower, generator=generator)
        largest = float(spectrum.nodes.max())
        if not largest > 0:
            return None
        threshold = NULL_SPACE_RTOL * largest
        counted_null = 0 if task_rows is None else max(dim - task_rows, 0)  # C_task's rank is ≤ its rows
        if counted_null >= dim:
            return None  # no rows, yet a positive C_task: a count that does not fit, the full solve decides
        if counted_null:
            spectrum = spectrum.with_null_share(counted_null / dim)

        def cleaned(values: torch.Tensor) -> torch.Tensor:  # round-off of C_task's null space is exactly 0
            return torch.where(values >= threshold, values, torch.zeros_like(values))

        tau = (cfg.tau if cfg.tau_mode == "absolute" else cfg.tau * spectrum.median(above=threshold)) * tau_scale

        def gate(values: torch.Tensor) -> torch.Tensor:  # reads τ when called: the exact one, once known
            return gate_values(cleaned(values), kind=cfg.gate, tau=tau, temperature=cfg.temperature)

        node_gates = gate(spectrum.nodes)
        null_count = round(dim * float(spectrum.weights[spectrum.nodes < threshold].sum()))
        null_gate = float(gate(torch.zeros(1, dtype=dtype)))

        def end_share(values: torch.Tensor, descending: bool) -> float:  # Σ w·values over the k/d at one end
            order = torch.argsort(spectrum.nodes, descending=descending)
            at_end = torch.cumsum(spectrum.weights[order], 0) <= k / dim
            return float((spectrum.weights * values)[order][at_end].sum())

        store_largest = False
        if null_count >= 2:  # the null space's gate is the other candidate base
            uncertain = abs(null_count - k) <= 4 * dim * spectrum.share_deviation(null_count / dim, dim)
            if uncertain and counted_null <= k:  # a counted null space larger than k settles it
                return None  # whether k holds the null cluster (and so what base 1 leaves out) is not certain
            distance = (node_gates - null_gate).abs()
            left_with_null_base = dim * (spectrum.mean(distance) - end_share(distance, descending=True))
            if null_count > k:  # base 1 cannot store the cluster: it leaves it out whole, ≥ null_count·(1 − g₀)
                if not left_with_null_base < null_count * (1 - null_gate) - 1e-9 * dim:
                    return None  # base 1 around the left-out cluster: a choice from the middle, the full solve's
                store_largest = True
            else:
                left_with_base_one = dim * (spectrum.mean(1 - node_gates)
                                            - end_share(1 - node_gates, descending=False))
                store_largest = left_with_null_base < left_with_base_one - 1e-9 * dim
        if not store_largest:
            c_tilde = tilde()
            try:
                small = generalized_top_k(c_task, c_tilde, k + 1, "smallest", factor=shifted_cholesky(c_task, c_tilde),
                                          start=self._warm_starts.get((key, "smallest")), tolerance=tolerance,
                                          generator=generator)
            except torch.linalg.LinAlgError:
                return None
            small_gates = gate(small.eigenvalues)
            if not small.converged or abs(float(small_gates[k - 1] - small_gates[k])) <= cfg.gate_tie_tolerance:
                return None
            return self._top_k_result(key, small, slice(0, k), small_gates[:k], 1.0, spectrum, gate, tau, cfg.ridge)
        positives = dim - null_count  # few task tokens: solve for all of them, so τ is exact (SLQ's is not);
        # SLQ's count is off by a few σ at most: ask for 4σ more, so a short count still finds every positive λ
        margin = math.ceil(4 * dim * spectrum.share_deviation(null_count / dim, dim)) + 1
        wanted = min(positives + margin if positives <= max(4 * k, EXACT_POSITIVES) else k + 1, dim)
        large = generalized_top_k(c_task, None, wanted, "largest", factor=(lower, 0.0), tolerance=tolerance,
                                  start=self._warm_starts.get((key, "largest")), generator=generator)
        if not large.converged:
            return None
        useful = int((cleaned(large.eigenvalues) > 0).sum())
        if task_rows is not None and useful > task_rows:
            return None  # more positive λ than rows: the count is wrong, and so is the null share it moved
        if useful < wanted:  # the whole positive part: τ from it, as the full solve computes it
            tau = effective_tau(cleaned(large.eigenvalues), cfg.tau, cfg.tau_mode) * tau_scale
        large_gates = gate(large.eigenvalues)  # ascending
        if useful > k and abs(float(large_gates[-k] - large_gates[-k - 1])) <= cfg.gate_tie_tolerance:
            return None
        count = min(useful, k)
        chosen = slice(large.eigenvalues.numel() - count, large.eigenvalues.numel())
        return self._top_k_result(key, large, chosen, large_gates[chosen], null_gate, spectrum, gate, tau, cfg.ridge)

    def _pre_factor(self, key: str, c_pre: torch.Tensor, tilde) -> torch.Tensor | None:
        """L = chol(C̃) of ``key``: the kept one while ``c_pre`` is the same unmodified tensor (a refresh), else
        computed from ``tilde()`` and kept; None when C̃ is not positive definite."""
        kept = self._pre_factors.get(key)
        dtype = getattr(torch, self.config.solve_dtype)
        if kept is not None and kept[0] is c_pre and kept[1] == c_pre._version and kept[2].dtype == dtype:
            return kept[2]
        lower, info = torch.linalg.cholesky_ex(tilde())
        if int(info) != 0:
            self._pre_factors.pop(key, None)
            return None
        self._pre_factors[key] = (c_pre, c_pre._version, lower)
        return lower

    def _top_k_result(self, key: str, solved: GeneralizedTopK, chosen: slice, gates: torch.Tensor, base: float,
                      spectrum: SpectrumEstimate, gate, tau: float, ridge: float) -> tuple[Projector, SolveReport]:
        """The width-k projector of the ``chosen`` directions and a report whose d eigenvalues are the stored ones
        exactly and the rest quantiles of ``spectrum``."""
        cfg, dim = self.config, solved.v.shape[0]
        count = gates.numel()
        c_tilde_v = solved.c_tilde_v.new_zeros(dim, cfg.k)
        v = solved.v.new_zeros(dim, cfg.k)
        stored_gates = gates.new_full((cfg.k,), base)
        v[:, :count], c_tilde_v[:, :count] = solved.v[:, chosen], solved.c_tilde_v[:, chosen]
        stored_gates[:count] = gates
        self._warm_starts[(key, solved.end)] = solved.v[:, chosen].clone()
        order = torch.argsort(spectrum.nodes)
        cumulative = torch.cumsum(spectrum.weights[order], 0)
        quantiles = (torch.arange(dim, dtype=cumulative.dtype) + 0.5) / dim
        picked = torch.searchsorted(cumulative, quantiles * cumulative[-1]).clamp_max(order.numel() - 1)
        eigenvalues = spectrum.nodes[order][picked].clamp_min(0)
        exact = solved.eigenvalues[chosen].to(eigenvalues.device)  # the estimate lives on the CPU
        if solved.end == "smallest":
            eigenvalues[:count] = exact
        else:
            eigenvalues[dim - count:] = exact
        eigenvalues, _ = torch.sort(eigenvalues)
        all_gates = gate(eigenvalues)
        far = int(((all_gates - base).abs() > cfg.gate_tie_tolerance).sum())
        report = SolveReport(key, eigenvalues, all_gates, tau, ridge, failed=False, consecutive_failures=0,
                             stored=count, base_gate=base, approximated=max(far - count, 0), estimated=True)
        return Projector(c_tilde_v, v, stored_gates, base), report

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

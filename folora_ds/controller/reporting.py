"""What a refresh reports: one ``LayerSummary`` per input key and the flat ``folora/...`` metrics dict that monitors
(TensorBoard, CSV, W&B, the HF Trainer's log) receive.

Pure functions of values the controller has already gathered (every rank's list, in rank order, from
``comm.all_gather_objects``), plus ``write_events``, which hands the dict to a DeepSpeed engine's monitor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from folora_ds.distributed import comm
from folora_ds.method.spectral import SolveReport

ATTENUATED_BELOW = 0.5
"""A direction whose gate g is below this counts as attenuated."""


@dataclass(frozen=True)
class LayerSummary:
    """What the gate does to one input key (``key``: its first member's module name; ``members``: the LoRA modules
    fed by it): input width ``dim``, ``effective_rank`` Σg, ``attenuated`` directions (g < 0.5), the absolute ``tau``
    used, the consecutive failed re-solves at the end (``solve_failures``), and what the width-k projector keeps:
    ``stored`` directions, the ``base_gate`` of all others, ``approximated`` directions (k too small) and, of
    those, ``split_ties`` (tied clusters left out whole; see ``projector.select_directions``); ``estimated``: the
    top-k solver made its last solve (Σg and τ then come from its spectrum estimate), False where it fell back to
    or was not chosen over the full solve (``eigensolver``)."""

    key: str
    members: tuple[str, ...]
    dim: int
    effective_rank: float
    attenuated: int
    tau: float
    solve_failures: int
    stored: int
    base_gate: float
    approximated: int
    split_ties: int
    estimated: bool = False


def summarize(reports: Mapping[str, SolveReport], members: Mapping[str, Sequence[str]]) -> list[LayerSummary]:
    """One summary per solve report (this rank's owned keys), from the report's (d,) gates g.

    Args:
        reports: the solver's last report per input key.
        members: the LoRA module names fed by each input key.
    """
    return [LayerSummary(key=key, members=tuple(members[key]), dim=report.gates.numel(),
                         effective_rank=float(report.gates.sum()),
                         attenuated=int((report.gates < ATTENUATED_BELOW).sum()), tau=report.tau,
                         solve_failures=report.consecutive_failures, stored=report.stored,
                         base_gate=report.base_gate, approximated=report.approximated, split_ties=report.split_ties,
                         estimated=report.estimated)
            for key, report in reports.items()]


def merge_summaries(per_rank: Iterable[Iterable[LayerSummary]], keys: Iterable[str]) -> list[LayerSummary]:
    """Every rank's summaries (each rank summarizes the keys it owns) as one list in the order of ``keys`` (the
    collector's input order, the same on every rank); a key no rank has solved is left out."""
    by_key = {summary.key: summary for summaries in per_rank for summary in summaries}
    return [by_key[key] for key in keys if key in by_key]


def controller_metrics(controller) -> dict[str, float]:
    """Collective: ``refresh_metrics`` of a ``FoLoRAController`` as it stands: F; Σg/d and the attenuated share, over
    inputs and per input; τ and its budget scale; the slowest solve; the window's task tokens; the fewest gated
    steps of any rank; refreshes and optimizer steps."""
    summaries = controller.layer_summaries()
    solve_seconds, tokens, gated = zip(*comm.all_gather_objects(
        (controller.last_solve_seconds, controller.last_window_tokens,
         min(controller.gated_step_counts(), default=0)), controller.group))
    return refresh_metrics(
        summaries, relative_forgetting=controller.measured_forgetting(), solve_seconds=solve_seconds,
        window_tokens=tokens, gated_steps=gated, refreshes=controller.refreshes,
        optimizer_steps=controller.optimizer_steps,
        tau_scale=None if controller.budget is None else controller.budget.tau_scale)


def refresh_metrics(summaries: Sequence[LayerSummary], *, relative_forgetting: float,
                    solve_seconds: Sequence[float], window_tokens: Sequence[int], gated_steps: Sequence[int],
                    refreshes: int, optimizer_steps: int, tau_scale: float | None) -> dict[str, float]:
    """The ``folora/...`` values of one refresh: the relative forgetting F; the mean effective rank Σg/d and
    attenuated share over inputs and, per input (named by its first module, ``layers.11.mlp.down_proj``), Σg,
    attenuated directions and the absolute τ; τ's budget scale; the slowest rank's last solve time; the task
    tokens per input counted in the window just folded (the most on any rank); the fewest gated steps of any rank;
    refreshes and optimizer steps.

    Args:
        summaries: every input key's summary (``merge_summaries``); at least one.
        relative_forgetting: F (``budget.relative_forgetting``).
        solve_seconds, window_tokens, gated_steps: one value per rank: its last solve time, the most task tokens
            of any input in the window it last folded, its fewest gated steps; the slowest, the most and the fewest
            are reported.
        tau_scale: the budget's scale of τ, or None without a budget (then not reported).

    Returns:
        Floats: F; the means over inputs of the effective rank fraction Σg/d and of the attenuated share; the
        slowest solve, the most tokens, the fewest gated steps; refreshes, optimizer steps, τ's scale; then per
        input (named by what follows the last ``model.`` in its key: ``layers.11.mlp.down_proj``) Σg, attenuated
        directions and the absolute τ.
    """
    values = {"folora/relative_forgetting": float(relative_forgetting),
              "folora/effective_rank_fraction": sum(s.effective_rank / s.dim for s in summaries) / len(summaries),
              "folora/attenuated_fraction": sum(s.attenuated / s.dim for s in summaries) / len(summaries),
              "folora/solve_seconds": float(max(solve_seconds)), "folora/statistics_tokens": float(max(window_tokens)),
              "folora/gated_steps": float(min(gated_steps)), "folora/refreshes": float(refreshes),
              "folora/optimizer_steps": float(optimizer_steps)}
    if tau_scale is not None:
        values["folora/tau_scale"] = float(tau_scale)
    for summary in summaries:
        name = summary.key.split("model.")[-1]
        values[f"folora/effective_rank/{name}"] = float(summary.effective_rank)
        values[f"folora/attenuated/{name}"] = float(summary.attenuated)
        values[f"folora/tau/{name}"] = float(summary.tau)
    return values


def write_events(engine, values: Mapping[str, float]) -> None:
    """Write ``values`` to a DeepSpeed ``engine``'s monitor when it has an enabled one (rank 0 writes), at the
    engine's global sample count: DeepSpeed's own x-axis, and W&B drops events whose step goes backwards."""
    monitor = None if engine is None else getattr(engine, "monitor", None)
    if monitor is not None and monitor.enabled:
        step = int(engine.global_samples)
        monitor.write_events([(name, value, step) for name, value in values.items()])

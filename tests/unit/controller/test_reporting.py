"""What a refresh reports, from values already gathered: per-input summaries of the gates, their order across
ranks, the aggregation of per-rank values into the ``folora/...`` metrics, and the write to an engine's monitor."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from folora_ds.controller import LayerSummary
from folora_ds.controller.reporting import merge_summaries, refresh_metrics, summarize, write_events
from folora_ds.method.spectral import SolveReport

ATTN = "base_model.model.model.layers.0.self_attn.q_proj"
DOWN = "base_model.model.model.layers.0.mlp.down_proj"


def _report(key: str, gates: list[float], tau: float = 0.25) -> SolveReport:
    return SolveReport(key=key, eigenvalues=torch.linspace(0, 1, len(gates)), gates=torch.tensor(gates), tau=tau,
                       ridge=1e-6, failed=False, consecutive_failures=2, stored=1, base_gate=1.0, approximated=3,
                       split_ties=1)


def _summary(key: str, dim: int, effective_rank: float, attenuated: int, tau: float = 0.5) -> LayerSummary:
    return LayerSummary(key=key, members=(key,), dim=dim, effective_rank=effective_rank, attenuated=attenuated,
                        tau=tau, solve_failures=0, stored=dim, base_gate=1.0, approximated=0, split_ties=0)


def test_a_summary_counts_gates_below_one_half_as_attenuated_and_sums_the_gates_as_effective_rank():
    members = {ATTN: [ATTN, ATTN.replace("q_proj", "k_proj")]}
    (summary,) = summarize({ATTN: _report(ATTN, [0.1, 0.5, 0.9, 0.2])}, members)
    assert summary.dim == 4
    assert summary.effective_rank == pytest.approx(1.7)
    assert summary.attenuated == 2, "g = 0.5 is not attenuated; 0.1 and 0.2 are"
    assert summary.members == tuple(members[ATTN])
    assert (summary.tau, summary.solve_failures, summary.stored, summary.approximated, summary.split_ties) == (
        0.25, 2, 1, 3, 1)
    assert not summary.estimated
    (estimated,) = summarize({ATTN: dataclasses.replace(_report(ATTN, [0.1, 0.9]), estimated=True)}, members)
    assert estimated.estimated, "a top-k solve shows in the summary"


def test_summaries_of_every_rank_come_back_in_input_order_without_unsolved_inputs():
    first, second, third = (_summary(f"layers.{i}", 4, 2.0, 1) for i in range(3))
    merged = merge_summaries([[second], [third, first]], ["layers.0", "layers.1", "layers.2", "layers.3"])
    assert merged == [first, second, third]


def test_metrics_report_the_slowest_solve_the_most_tokens_the_fewest_gated_steps_and_means_over_inputs():
    summaries = [_summary(ATTN, 4, 3.0, 1, tau=0.5), _summary(DOWN, 8, 2.0, 4, tau=0.125)]
    values = refresh_metrics(summaries, relative_forgetting=0.01, solve_seconds=[0.5, 2.5, 1.0],
                             window_tokens=[10, 30, 20], gated_steps=[7, 6, 7], refreshes=3, optimizer_steps=7,
                             tau_scale=None)
    assert values["folora/solve_seconds"] == 2.5
    assert values["folora/statistics_tokens"] == 30.0
    assert values["folora/gated_steps"] == 6.0
    assert values["folora/effective_rank_fraction"] == pytest.approx((3 / 4 + 2 / 8) / 2)
    assert values["folora/attenuated_fraction"] == pytest.approx((1 / 4 + 4 / 8) / 2)
    assert (values["folora/refreshes"], values["folora/optimizer_steps"]) == (3.0, 7.0)
    assert values["folora/relative_forgetting"] == 0.01
    # per input, named by what follows the last "model.":
    assert values["folora/effective_rank/layers.0.mlp.down_proj"] == 2.0
    assert values["folora/attenuated/layers.0.self_attn.q_proj"] == 1.0
    assert values["folora/tau/layers.0.mlp.down_proj"] == 0.125
    assert "folora/tau_scale" not in values, "no budget: no τ scale"
    assert all(type(value) is float for value in values.values()), "monitors expect plain floats"


def test_metrics_report_the_tau_scale_with_a_budget():
    values = refresh_metrics([_summary("layers.0.mlp.up_proj", 4, 3.0, 1)], relative_forgetting=0.0,
                             solve_seconds=[0.0], window_tokens=[0], gated_steps=[0], refreshes=0, optimizer_steps=0,
                             tau_scale=1.5)
    assert values["folora/tau_scale"] == 1.5
    assert values["folora/tau/layers.0.mlp.up_proj"] == 0.5, "a key without 'model.' keeps its whole name"


class _Monitor:
    def __init__(self, enabled: bool) -> None:
        self.enabled, self.events = enabled, []

    def write_events(self, events) -> None:
        self.events.extend(events)


class _Engine:
    """What ``write_events`` needs of a DeepSpeed engine."""

    global_samples = 96

    def __init__(self, monitor) -> None:
        self.monitor = monitor


def test_events_go_to_an_enabled_monitor_at_the_engines_sample_count_and_nowhere_else():
    enabled, disabled = _Monitor(True), _Monitor(False)
    write_events(_Engine(enabled), {"folora/gated_steps": 3.0, "folora/refreshes": 1.0})
    write_events(_Engine(disabled), {"folora/gated_steps": 3.0})
    write_events(None, {"folora/gated_steps": 3.0})  # a plain loop: no engine, nothing written, no error
    write_events(_Engine(None), {"folora/gated_steps": 3.0})  # an engine without a monitor
    assert enabled.events == [("folora/gated_steps", 3.0, 96), ("folora/refreshes", 1.0, 96)]
    assert disabled.events == []

"""The grid report's statistics, tables and plots, from hand-made rows (no model)."""

import json
import math

import pytest

from folora_ds.common.plots import plot_gates
from folora_ds.toolkit.report import (
    aggregate,
    directions_markdown,
    equal_move_rate,
    figure_groups,
    frontier_comparison,
    frontier_kl_at,
    lost_questions_markdown,
    markdown_tables,
    mean_std,
    pareto_frontier,
    plot_frontier,
    spearman,
)


def _row(label, method, lr, seed, steps, accuracy, kl, retention=0.8, knobs="{}"):
    return {"label": label, "method": method, "lr": lr, "seed": seed, "steps": steps, "knobs": knobs,
            "target_accuracy": accuracy, "retention": retention, "questions_correct": 0.5, "kl_per_token": kl,
            "base_perplexity": 20.0, "adapted_perplexity": 21.0, "penalty_total": kl * 10,
            "penalty_relative_total": kl / 10, "penalty_relative_mean": kl / 5, "train_seconds": 100.0,
            "eval_seconds": 50.0, "slug": f"{label}-{lr}-{seed}"}


def test_mean_std_is_the_sample_standard_deviation():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_pareto_frontier_keeps_only_undominated_points_in_order():
    points = [(0.05, 0.3), (0.01, 0.1), (0.02, 0.05), (0.03, 0.3), (0.10, 0.6), (0.08, 0.5), (0.09, 0.45)]
    assert pareto_frontier(points) == [(0.01, 0.1), (0.03, 0.3), (0.08, 0.5), (0.10, 0.6)]


def test_frontier_kl_interpolates_and_refuses_beyond_the_best():
    frontier = [(0.01, 0.1), (0.03, 0.3), (0.08, 0.5)]
    assert frontier_kl_at(frontier, 0.2) == pytest.approx(0.02)
    assert frontier_kl_at(frontier, 0.05) == 0.01  # below the frontier's least accurate point: its KL
    assert frontier_kl_at(frontier, 0.5) == pytest.approx(0.08)
    assert frontier_kl_at(frontier, 0.51) is None
    assert frontier_kl_at([], 0.1) is None


def test_spearman_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    x = [1.0, 2.0, 2.0, 5.0, 3.0, 0.5]
    y = [0.1, 0.4, 0.3, 0.9, 0.2, 0.2]
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
    assert math.isnan(spearman([1, 2], [2, 1])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_aggregate_and_frontier_comparison_over_seeds():
    rows = [_row("plain LoRA", "lora", 1e-4, s, 60, 0.2 + 0.02 * s, 0.02) for s in range(3)]
    rows += [_row("plain LoRA", "lora", 4e-4, s, 60, 0.6, 0.08) for s in range(3)]
    rows += [_row("FoLoRA", "folora", 4e-4, s, 60, 0.4, 0.01) for s in range(3)]
    groups = aggregate(rows)
    assert [(g["label"], g["lr"], g["seeds"]) for g in groups] == [
        ("plain LoRA", 1e-4, 3), ("plain LoRA", 4e-4, 3), ("FoLoRA", 4e-4, 3)]
    assert groups[0]["target_accuracy_mean"] == pytest.approx(0.22)
    assert groups[0]["target_accuracy_std"] == pytest.approx(0.02)
    folora = next(c for c in frontier_comparison(groups) if c["label"] == "FoLoRA")
    # plain needs KL 0.02 + (0.08 - 0.02) * (0.4 - 0.22) / (0.6 - 0.22) at accuracy 0.4
    expected = 0.02 + 0.06 * 0.18 / 0.38
    assert folora["frontier_kl"] == pytest.approx(expected)
    assert folora["kl_ratio"] == pytest.approx(0.01 / expected)
    assert folora["accuracy_vs_best_plain"] == pytest.approx(0.4 / 0.6)
    assert folora["beyond_plain"] is False
    assert "needs ≥ 3 (run, step) rows; 2 so far" in markdown_tables(rows[:2]) and "nan" not in markdown_tables(
        rows[:2])
    table = markdown_tables(rows)
    assert "| FoLoRA | 0.0004 | 60 | 67% | 0.0100 |" in table
    assert "`penalty_total`: ρ = " in table
    # more accurate than plain LoRA ever got: the ratio is an upper bound against plain's most accurate point
    rows += [_row("FoLoRA", "folora", 8e-4, s, 60, 0.7, 0.04) for s in range(3)]
    beyond = next(c for c in frontier_comparison(aggregate(rows)) if c["lr"] == 8e-4)
    assert beyond["frontier_kl"] is None and beyond["beyond_plain"] is True
    assert beyond["kl_ratio"] == pytest.approx(0.04 / 0.08)
    assert "| FoLoRA | 0.0008 | 60 | 117% | 0.0400 | beyond plain's best accuracy (its KL 0.0800) | < 0.50 |" in (
        markdown_tables(rows))


def test_the_retention_frontier_is_plain_loras_most_kept_at_equal_accuracy():
    rows = [_row("plain LoRA", "lora", 1e-4, 0, 60, 0.2, 0.02, retention=0.8)]
    rows += [_row("plain LoRA", "lora", 2e-4, 0, 60, 0.3, 0.05, retention=0.3)]  # dominated: less kept, less accurate
    rows += [_row("plain LoRA", "lora", 4e-4, 0, 60, 0.6, 0.08, retention=0.4)]
    rows += [_row("FoLoRA", "folora", 4e-4, 0, 60, 0.4, 0.01, retention=0.7)]
    rows += [_row("MiLoRA", "milora", 2e-4, 0, 60, 0.7, 0.07, retention=0.5)]
    comparison = {c["label"]: c for c in frontier_comparison(aggregate(rows))}
    # lost share: 0.2 at accuracy 0.2, 0.6 at 0.6 (the 2e-4 point is off the frontier); at 0.4 plain loses 0.4
    assert comparison["FoLoRA"]["frontier_retention"] == pytest.approx(0.6)
    assert comparison["FoLoRA"]["retention_gain"] == pytest.approx(0.1)
    # more accurate than plain ever got: against plain's most accurate point, a lower bound on the gain
    assert comparison["MiLoRA"]["frontier_retention"] is None and comparison["MiLoRA"]["beyond_plain"]
    assert comparison["MiLoRA"]["retention_gain"] == pytest.approx(0.1)
    table = markdown_tables(rows)
    assert "| 70.0% | 60.0% | +10.0 points |" in table
    assert "| 50.0% | 40.0% (plain's best) | > +10.0 points |" in table
    # two plain points share the top accuracy: the bound is against the one that keeps more (and forgets less)
    rows += [_row("plain LoRA", "lora", 8e-4, 0, 60, 0.6, 0.09, retention=0.45)]
    comparison = {c["label"]: c for c in frontier_comparison(aggregate(rows))}
    assert comparison["MiLoRA"]["retention_gain"] == pytest.approx(0.05)
    assert comparison["MiLoRA"]["kl_ratio"] == pytest.approx(0.07 / 0.08)


def test_plots_are_written(tmp_path):
    rows = [_row("plain LoRA", "lora", lr, s, 60, 0.1 * i + 0.01 * s, 0.01 * (i + 1)) for i, lr in
            enumerate((1e-4, 2e-4, 4e-4)) for s in range(2)] + [_row("FoLoRA", "folora", 4e-4, 0, 60, 0.2, 0.01)]
    plot_frontier(aggregate(rows), tmp_path / "frontier.png")
    layers = [{"members": [f"base_model.model.model.layers.{i}.mlp.down_proj"], "dim": 10, "effective_rank": 4.0,
               "attenuated": 3} for i in range(3)]
    plot_gates(layers, tmp_path / "gates.png", title="t")
    for name in ("frontier.png", "gates.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert json.loads(json.dumps(aggregate(rows)))  # the CSV/JSON rows are plain values


def test_figure_groups_draw_a_knob_study_apart_with_its_references():
    rows = [_row("plain LoRA", "lora", 1e-4, 0, 60, 0.2, 0.01), _row("FoLoRA", "folora", 4e-4, 0, 60, 0.3, 0.01),
            _row("CorDA", "corda", 2e-4, 0, 60, 0.25, 0.02),
            _row("FoLoRA τ=4", "folora", 8e-4, 0, 60, 0.3, 0.02, knobs='{"tau": 4.0}')]
    groups = aggregate(rows)
    drawn = figure_groups(groups, {"FoLoRA τ=4": "knobs"})
    assert sorted(g["label"] for g in drawn["frontier"]) == ["CorDA", "FoLoRA", "plain LoRA"]
    knobs = [g["label"] for g in drawn["knobs"]]
    assert sorted(knobs[:2]) == ["FoLoRA", "plain LoRA"] and knobs[2:] == ["FoLoRA τ=4"]  # references first
    assert [g["label"] for g in figure_groups(groups, {})["frontier"]] == [g["label"] for g in groups]


def test_lost_questions_markdown_counts_groups_losses_and_flags_a_mismatch():
    from folora_ds.toolkit.measures import Question

    questions = [Question("How many days\nare in a week?", ("7",), "fact"), Question("Capital of Peru?", ("Lima",),
                                                                                    "fact"),
                 Question("Capital of Chile?", ("Santiago",), "fact")]
    base_correct = [True, True, False]
    same = {**_row("A", "lora", 1e-4, 0, 60, 0.3, 0.01), "questions_correct": 1 / 3}
    other = {**_row("B", "folora", 4e-4, 0, 60, 0.3, 0.01), "questions_correct": 2 / 3}  # cache says 2 of 3
    text = lost_questions_markdown(questions, base_correct, [
        (same, ["seven", "Lima", "x"], [False, True, False]),
        (other, ["7", "Cusco | Lima?\nno", "x"], [True, False, False])])
    assert "| A | 0.0001 | 0 | 60 | 0/1 | 1/1 |  |" in text
    assert "| B | 0.0004 | 0 | 60 | 1/1 | 0/1 | differs from the cached evaluation (0.333 vs 0.667 correct) |" in text
    assert "| How many days are in a week? | yes | 1/2 | seven |" in text
    assert "| Capital of Peru? |  | 1/2 | Cusco / Lima? no |" in text  # one cell: bars and newlines escaped
    assert "Chile" not in text  # the base got it wrong: not a loss


def test_a_legacy_probe_gets_its_own_column_and_is_averaged_over_seeds():
    rows = [{**_row("plain LoRA", "lora", 4e-4, s, 60, 0.6, 0.08), "legacy_retention": 0.5 + 0.1 * s}
            for s in range(3)]
    rows += [_row("FoLoRA", "folora", 4e-4, 0, 60, 0.4, 0.01)]  # a row from before the probe: no value
    groups = aggregate(rows)
    assert groups[0]["legacy_retention_mean"] == pytest.approx(0.6)
    assert "legacy_retention_mean" not in groups[1]
    table = markdown_tables(rows)
    assert "| legacy probe retention |" in table
    assert "| plain LoRA | 0.0004 | 60 | 3 | 60.0% ± 0.0% | 80.0% ± 0.0% | 60.0% ± 10.0% |" in table
    assert "| FoLoRA | 0.0004 | 60 | 1 | 40.0% ± 0.0% | 80.0% ± 0.0% | — |" in table
    assert "legacy probe" not in markdown_tables(rows[3:])  # grids without it keep their table


def test_equal_move_rate_interpolates_in_log_space_and_refuses_outside_plains_range():
    plain = {1e-4: 1.0, 4e-4: 4.0}
    assert equal_move_rate(plain, 2.0) == pytest.approx(2e-4)  # log-linear between the two rates
    assert equal_move_rate(plain, 4.0) == pytest.approx(4e-4)
    assert equal_move_rate(plain, 8.0) is None and equal_move_rate(plain, 0.5) is None
    assert equal_move_rate({1e-4: 4.0, 4e-4: 1.0}, 2.0) is None  # sizes that shrink with the rate say nothing


def test_directions_markdown_compares_each_group_with_plain_lora_at_its_rate_and_steps():
    def row(label, method, lr, seed, passed):
        return {"label": label, "method": method, "knobs": "{}", "lr": lr, "seed": seed, "steps": 100,
                "passed_size": passed, "attenuated_size": 1.0, "forgetting_share_passed": 0.5,
                "passed_task_size": 10 * passed}
    rows = [row("plain LoRA", "lora", 4e-4, 0, 2.0), row("plain LoRA", "lora", 8e-4, 0, 4.0),
            row("FoLoRA", "folora", 4e-4, 0, 3.0), row("FoLoRA", "folora", 4e-4, 1, 5.0)]
    text = directions_markdown(rows)
    folora = next(line for line in text.splitlines() if line.startswith("| FoLoRA"))
    # mean passed size 4.0 over two seeds: twice plain's at 4e-4, as far as plain moves at 8e-4
    assert folora.startswith("| FoLoRA | 0.0004 | 100 | 2 | 4.000 ± 1.414 |") and "| 2.00 | 2.00 | 0.0008 |" in folora
    assert text.index("| plain LoRA | 0.0004") < text.index("| FoLoRA")

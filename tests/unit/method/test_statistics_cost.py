"""``method.statistics_cost``: the statistics' share of the step's flops and the schedule that keeps it under a
bound (issue 26, item 3)."""

from __future__ import annotations

import math

import pytest

from folora_ds.method.statistics_cost import (
    MIN_STATISTICS_TOKENS,
    NARROW_MODEL_FLOP_COST,
    StatisticsSchedule,
    StepShape,
    owner_imbalance,
    refresh_is_read,
    schedule_within_share,
    statistics_flop_cost,
    statistics_share,
    window_is_read,
)

# One Llama-2-7B block: inputs q/k/v (4096), o (4096), gate/up (4096), down (11008); 4·4096² + 3·4096·11008 weights
LLAMA7B_BLOCK = dict(input_widths=(4096, 4096, 4096, 11008), linear_parameters=4 * 4096**2 + 3 * 4096 * 11008)


def _block(tokens: int, counted: int | None = None) -> StepShape:
    return StepShape(tokens=tokens, counted_tokens=tokens if counted is None else counted, **LLAMA7B_BLOCK)


def test_the_share_is_the_sampled_rows_times_the_squared_widths_over_twice_the_model_flops():
    shape = _block(2048)
    squares = 3 * 4096**2 + 11008**2
    expected = 64 * squares / (2 * LLAMA7B_BLOCK["linear_parameters"] * 2048)
    assert statistics_share(StatisticsSchedule(64, 1), shape) == pytest.approx(expected)
    assert expected == pytest.approx(0.0133, abs=5e-4)  # docs/benchmarks.md: 1.3% at 2,048 tokens
    assert statistics_share(StatisticsSchedule(64, 1), _block(256)) == pytest.approx(0.106, abs=2e-3)  # 10.6%
    assert statistics_share(StatisticsSchedule(64, 4), shape) == pytest.approx(expected / 4)
    # every counted token when tokens is None, and never more rows than a micro-batch counts
    assert statistics_share(StatisticsSchedule(None, 1), _block(2048, 100)) == pytest.approx(expected * 100 / 64)
    assert statistics_share(StatisticsSchedule(64, 1), _block(2048, 10)) == pytest.approx(expected * 10 / 64)


def test_the_share_weighs_a_statistics_flop_by_its_cost_and_the_busiest_owner():
    """At 70B in bf16 the fitted 1.85% of the flops ran 1.10x: a float32 statistics flop costs ~2.5 bf16 model
    flops on the CPU, and the owner of the d_ff input folds most of the rows (docs/benchmarks.md)."""
    plain = _block(2048)
    weighted = StepShape(tokens=2048, counted_tokens=2048, flop_cost=2.5, owner_imbalance=1.4, **LLAMA7B_BLOCK)
    schedule = StatisticsSchedule(64, 1)
    assert statistics_share(schedule, weighted) == pytest.approx(2.5 * 1.4 * statistics_share(schedule, plain))
    fitted = schedule_within_share(0.02, schedule, weighted)  # 1.3% unweighted fits; 4.7% weighted does not
    assert schedule_within_share(0.02, schedule, plain) is schedule
    assert fitted.tokens < 64 and statistics_share(fitted, weighted) <= 0.02


def test_the_default_flop_cost_follows_the_model_dtype_against_the_statistics_dtype():
    assert statistics_flop_cost(None, model_itemsize=2, statistics_itemsize=4) == NARROW_MODEL_FLOP_COST
    assert statistics_flop_cost(None, model_itemsize=4, statistics_itemsize=4) == 1.0
    assert statistics_flop_cost(None, model_itemsize=4, statistics_itemsize=8) == NARROW_MODEL_FLOP_COST
    assert statistics_flop_cost(7.0, model_itemsize=2, statistics_itemsize=4) == 7.0  # measured on a GPU, say


def test_owner_imbalance_is_the_busiest_owners_squared_widths_over_the_average():
    dims = {"qkv": 4096, "o": 4096, "gate_up": 4096, "down": 11008}
    owners = {"down": 0, "qkv": 1, "o": 1, "gate_up": 1}  # one 7B block on 2 ranks, as assign_owners splits it
    total = 3 * 4096**2 + 11008**2
    assert owner_imbalance(owners, dims, 2) == pytest.approx(2 * 11008**2 / total)  # 1.42
    assert owner_imbalance(dict.fromkeys(dims, 0), dims, 1) == 1.0
    assert owner_imbalance({"a": 0, "b": 1}, {"a": 8, "b": 8}, 2) == 1.0
    with pytest.raises(ValueError, match="'down' has owner 2"):
        owner_imbalance({**owners, "down": 2}, dims, 2)
    with pytest.raises(ValueError, match="'o' has owner None"):
        owner_imbalance({"down": 0, "qkv": 1, "gate_up": 1}, dims, 2)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("flop_cost", 0.0, "flop_cost=0.0 must be a finite number > 0"),
    ("flop_cost", math.inf, "flop_cost=inf"),
    ("owner_imbalance", 0.9, "owner_imbalance=0.9 must be a finite number >= 1"),
    ("owner_imbalance", math.nan, "owner_imbalance=nan"),
])
def test_a_bad_weight_is_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        StepShape(tokens=256, counted_tokens=256, **{field: value}, **LLAMA7B_BLOCK)


def test_a_schedule_within_the_share_is_kept_as_configured():
    requested = StatisticsSchedule(64, 1)
    assert schedule_within_share(0.02, requested, _block(2048)) is requested


def test_above_the_share_the_tokens_are_lowered_first():
    schedule = schedule_within_share(0.02, StatisticsSchedule(64, 1), _block(1024))  # 2.7% as configured
    assert schedule.every == 1 and MIN_STATISTICS_TOKENS <= schedule.tokens < 64
    assert statistics_share(schedule, _block(1024)) <= 0.02
    one_more = StatisticsSchedule(schedule.tokens + 1, 1)
    assert statistics_share(one_more, _block(1024)) > 0.02  # the most tokens that fit


def test_below_the_token_floor_fewer_micro_batches_collect():
    shape = _block(256)  # 10.6% as configured: 2% leaves 12 rows per micro-batch
    schedule = schedule_within_share(0.02, StatisticsSchedule(64, 1), shape)
    assert schedule.tokens == MIN_STATISTICS_TOKENS and schedule.every == 2
    assert statistics_share(schedule, shape) <= 0.02
    assert statistics_share(StatisticsSchedule(MIN_STATISTICS_TOKENS, 1), shape) > 0.02
    tight = schedule_within_share(0.001, StatisticsSchedule(64, 1), shape)
    assert tight.tokens == MIN_STATISTICS_TOKENS and statistics_share(tight, shape) <= 0.001
    assert statistics_share(StatisticsSchedule(tight.tokens, tight.every - 1), shape) > 0.001


def test_the_schedule_never_asks_for_more_than_configured():
    shape = _block(256)
    configured = StatisticsSchedule(8, 3)  # fewer tokens than the floor, already every third micro-batch
    schedule = schedule_within_share(0.002, configured, shape)
    assert schedule.tokens <= 8 and schedule.every >= 3
    assert statistics_share(schedule, shape) <= 0.002
    every_token = schedule_within_share(0.02, StatisticsSchedule(None, 1), _block(2048, 900))
    assert every_token.tokens is not None and statistics_share(every_token, _block(2048, 900)) <= 0.02


@pytest.mark.parametrize("share", [0, -0.1, 1.5, math.nan, "2%"])
def test_a_share_outside_zero_to_one_is_refused(share):
    with pytest.raises(ValueError, match="statistics share"):
        schedule_within_share(share, StatisticsSchedule(64, 1), _block(256))


@pytest.mark.parametrize(("field", "value", "match"), [
    ("tokens", 0, "tokens=0"), ("counted_tokens", -1, "counted_tokens"), ("tokens", math.inf, "tokens"),
    ("input_widths", (), "input_widths"), ("input_widths", (4096, 0), "input_widths"),
    ("linear_parameters", 0, "linear_parameters")])
def test_a_step_shape_names_its_bad_field(field, value, match):
    values = dict(tokens=256, counted_tokens=200, **LLAMA7B_BLOCK) | {field: value}
    with pytest.raises(ValueError, match=match):
        StepShape(**values)


@pytest.mark.parametrize(("tokens", "every"), [(0, 1), (1.5, 1), (64, 0), (64, None)])
def test_a_schedule_names_its_bad_field(tokens, every):
    with pytest.raises(ValueError, match="StatisticsSchedule"):
        StatisticsSchedule(tokens, every)


def test_fewer_collecting_micro_batches_stop_at_one_per_refresh_window():
    """Each refresh folds a window of C_task: a schedule that skips a whole window would leave it empty (an error
    at the refresh), so ``max_every`` caps the skipping and the share stays above the bound instead."""
    shape = _block(256)
    free = schedule_within_share(0.001, StatisticsSchedule(64, 1), shape)
    assert free.every > 4
    capped = schedule_within_share(0.001, StatisticsSchedule(64, 1), shape, max_every=4)
    assert capped == StatisticsSchedule(MIN_STATISTICS_TOKENS, 4)
    assert statistics_share(capped, shape) > 0.001
    assert schedule_within_share(0.001, StatisticsSchedule(64, 6), shape, max_every=4).every == 6  # never more often


def test_which_windows_and_refreshes_a_run_of_known_length_reads():
    # refresh every 100 steps, 250 steps: refreshes at 100 and 200 gate later steps; steps 201-250 feed none
    assert [refresh_is_read(step, 100, 250) for step in (99, 100, 200, 250)] == [False, True, True, False]
    assert [window_is_read(done, 100, 250) for done in (0, 99, 100, 199, 200, 249)] == [True] * 4 + [False] * 2
    # a run that ends at a refresh step: that refresh and its window gate nothing
    assert refresh_is_read(200, 100, 200) is False and window_is_read(150, 100, 200) is False
    # unknown length: everything, as before; no refreshes at all: nothing is read once the length is known
    assert window_is_read(10_000, 100, None) and refresh_is_read(300, 100, None)
    assert not window_is_read(0, 0, 50) and not refresh_is_read(5, 0, None)

"""``method.solve_cost``: the plan's time and memory of one input's solve, full or top-k (issue 26, item 1)."""

from __future__ import annotations

import pytest

from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.solve_cost import (
    SOLVE_WORKSPACE_MATRICES,
    TOP_K_COLUMN_SHARE,
    TOP_K_FACTOR_SHARE,
    TOP_K_KRYLOV_BLOCKS,
    TOP_K_WORKSPACE_MATRICES,
    solve_seconds,
    solve_workspace,
    top_k_columns,
)

RATE = 0.08  # s per (d/1000)³: the float32 full solve on 2 CPU cores (docs/benchmarks.md)


def test_a_full_solve_is_cubic_at_the_measured_rate():
    full = FoLoRAConfig(k=64)
    assert solve_seconds(28672, full, RATE) == pytest.approx(RATE * 28.672**3)
    assert solve_workspace(28672, full) == SOLVE_WORKSPACE_MATRICES * 28672**2 * 8  # float64 by default


def test_auto_solves_wide_inputs_top_k_at_a_fraction_of_the_full_cost():
    auto = FoLoRAConfig(k=64, eigensolver="auto", solve_dtype="float32")
    narrow, wide = solve_seconds(4096, auto, RATE), solve_seconds(28672, auto, RATE)
    assert narrow == pytest.approx(RATE * 4.096**3)  # below TOP_K_MIN_DIM: the full solve
    assert top_k_columns(64) == 640 + TOP_K_KRYLOV_BLOCKS * 80
    assert wide == pytest.approx(RATE * (TOP_K_FACTOR_SHARE * 28.672**3
                                         + TOP_K_COLUMN_SHARE * top_k_columns(64) * 28.672**2))
    assert 8 < RATE * 28.672**3 / wide < 16  # the float32 first solves: 5x at 8192, 7.3x at 14336, 12.7x at 28672
    assert solve_workspace(28672, auto) == TOP_K_WORKSPACE_MATRICES * 28672**2 * 4


def test_more_stored_directions_cost_more_operator_columns():
    small, large = (solve_seconds(14336, FoLoRAConfig(k=k, eigensolver="top_k"), RATE) for k in (64, 512))
    assert large > small

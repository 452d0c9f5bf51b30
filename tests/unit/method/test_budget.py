"""The forgetting budget: penalty and base energy formulas, and the dual ascent of τ."""

from __future__ import annotations

import math

import pytest
import torch

from folora_ds.method.budget import TauDualAscent, adapter_penalty, base_energy, budget_from_config
from folora_ds.method.config import FoLoRAConfig


def _spd(d: int, seed: int) -> torch.Tensor:
    x = torch.randn(3 * d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x / (3 * d)


def test_adapter_penalty_equals_the_trace_of_the_explicit_delta_w():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 12, generator=generator), torch.randn(9, 4, generator=generator)
    c_pre = _spd(12, 1)
    delta = 0.5 * (b.double() @ a.double())
    expected = torch.trace(delta @ c_pre @ delta.T)
    torch.testing.assert_close(adapter_penalty(a, b, 0.5, c_pre), expected, rtol=1e-12, atol=0)
    assert float(adapter_penalty(a, torch.zeros_like(b), 0.5, c_pre)) == 0.0


def test_base_energy_equals_the_trace_of_w_c_wt():
    w = torch.randn(7, 12, generator=torch.Generator().manual_seed(2))
    c_pre = _spd(12, 3)
    torch.testing.assert_close(base_energy(w, c_pre), torch.trace(w.double() @ c_pre @ w.double().T), rtol=1e-12,
                               atol=0)


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match="adapter_penalty: A"):
        adapter_penalty(torch.zeros(4, 12), torch.zeros(9, 3), 1.0, _spd(12, 0))
    with pytest.raises(ValueError, match="C_pre"):
        adapter_penalty(torch.zeros(4, 12), torch.zeros(9, 4), 1.0, _spd(10, 0))
    with pytest.raises(ValueError, match="base_energy"):
        base_energy(torch.zeros(7, 12), _spd(10, 0))


def test_tau_grows_over_budget_and_relaxes_under_it():
    ascent = TauDualAscent(budget=0.01, step_size=0.5, max_scale=100.0)
    assert ascent.tau_scale == 1.0
    assert ascent.update(0.03) == pytest.approx(math.exp(0.5 * 2.0))  # F = 3 b: θ += η·(3 − 1)
    assert ascent.update(0.0) == pytest.approx(math.exp(0.5 * 2.0 - 0.5))  # F = 0: θ −= η
    assert ascent.update(0.01) == pytest.approx(math.exp(0.5))  # on budget: unchanged
    assert ascent.last_measured == 0.01


def test_tau_scale_is_clipped_to_the_configured_range():
    ascent = TauDualAscent(budget=1e-6, step_size=1.0, max_scale=10.0)
    assert ascent.update(1.0) == pytest.approx(10.0)
    for _ in range(30):
        ascent.update(0.0)
    assert ascent.tau_scale == pytest.approx(0.1)


def test_state_round_trips():
    ascent = TauDualAscent(budget=0.02, step_size=0.3, max_scale=50.0)
    ascent.update(0.05)
    restored = TauDualAscent(budget=0.02, step_size=0.3, max_scale=50.0)
    restored.load_state_dict(ascent.state_dict())
    assert restored.tau_scale == ascent.tau_scale and restored.last_measured == 0.05


@pytest.mark.parametrize("measured", [float("nan"), float("inf"), -1e-3])
def test_broken_measurements_do_not_steer_tau(measured):
    ascent = TauDualAscent(budget=0.01, step_size=0.5, max_scale=10.0)
    with pytest.raises(ValueError, match="measured relative penalty"):
        ascent.update(measured)
    assert ascent.log_scale == 0.0


@pytest.mark.parametrize(("field", "value"), [("budget", 0.0), ("step_size", -1.0), ("max_scale", 0.5)])
def test_invalid_settings_are_refused(field, value):
    settings = {"budget": 0.01, "step_size": 0.5, "max_scale": 10.0, field: value}
    with pytest.raises(ValueError, match=field):
        TauDualAscent(**settings)


def test_budget_is_off_by_default_and_built_from_the_config():
    assert budget_from_config(FoLoRAConfig()) is None
    ascent = budget_from_config(FoLoRAConfig(forgetting_budget=0.05, budget_step_size=0.2, budget_max_tau_scale=8.0))
    assert (ascent.budget, ascent.step_size, ascent.max_scale) == (0.05, 0.2, 8.0)
    with pytest.raises(ValueError, match="forgetting_budget"):
        FoLoRAConfig(forgetting_budget=0.05, refresh_interval=0)
    with pytest.raises(ValueError, match="forgetting_budget"):
        FoLoRAConfig(forgetting_budget=-0.1)


def test_relative_forgetting_weighs_every_module_equally():
    from folora_ds.method.budget import relative_forgetting

    # one module with a massive base energy cannot decide the figure (it could with Σ penalty / Σ energy)
    penalties = {"a": 1.0, "b": 2000.0}
    energies = {"a": 10.0, "b": 1e6}
    assert relative_forgetting(penalties, energies) == pytest.approx((0.1 + 0.002) / 2)
    with pytest.raises(ValueError, match="other modules"):
        relative_forgetting({"a": 1.0}, {"b": 1.0})
    with pytest.raises(ValueError, match="module 'a' has base energy 0.0"):
        relative_forgetting({"a": 1.0}, {"a": 0.0})
    with pytest.raises(ValueError, match="no LoRA module"):
        relative_forgetting({}, {})


def test_penalty_and_base_energy_are_exact_across_column_blocks():
    """Inputs wider than one float64 block (2048 columns) give the unblocked values."""
    generator = torch.Generator().manual_seed(4)
    d, r, out = 2500, 3, 2100
    x = torch.randn(d, 40, generator=generator)
    c_pre = x @ x.T / 40
    a, b, w = (torch.randn(r, d, generator=generator), torch.randn(out, r, generator=generator),
               torch.randn(out, d, generator=generator))
    delta = 2.0 * b.double() @ a.double()
    torch.testing.assert_close(adapter_penalty(a, b, 2.0, c_pre), torch.trace(delta @ c_pre.double() @ delta.T),
                               rtol=1e-10, atol=0)
    torch.testing.assert_close(base_energy(w, c_pre), torch.trace(w.double() @ c_pre.double() @ w.double().T),
                               rtol=1e-10, atol=0)

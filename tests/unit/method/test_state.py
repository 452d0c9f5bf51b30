"""``folora_ds.method.state``, on plain dicts (no model): ranks' parts merge into one whole state or are refused by
name, and a state is resumed only with the config fields, LoRA modules and budget it was written with."""

from __future__ import annotations

import pytest
import torch

from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.state import STATE_VERSION, check_state_fits, merge_state_parts

MODULES = {"layers.0.q_proj", "layers.0.k_proj", "layers.0.down_proj"}


def _part(rank: int, world: int, keys: list[str], **changes) -> dict:
    """A rank's part: the common entries, and per-input entries of the keys it owns."""
    per_input = {key: torch.full((2, 2), float(rank)) for key in keys}
    return {"version": STATE_VERSION, "part": (rank, world), "config": FoLoRAConfig().to_dict(),
            "dims": {"attn": 2, "down": 2}, "members": {"attn": ["layers.0.q_proj", "layers.0.k_proj"],
                                                         "down": ["layers.0.down_proj"]},
            "optimizer_steps": 4, "task_forwards": 8, "refreshes": 1, "budget": None,
            "pre": per_input, "ema": dict(per_input), "ema_rows": {key: 10 + rank for key in keys},
            "task_window": {}, "solver": {key: {} for key in keys},
            **changes}


def test_parts_of_every_rank_merge_into_one_whole_state_in_any_order():
    merged = merge_state_parts([_part(1, 2, ["down"]), _part(0, 2, ["attn"])])
    assert merged["part"] == (0, 1) and set(merged["pre"]) == {"attn", "down"}
    assert float(merged["pre"]["down"][0, 0]) == 1.0 and float(merged["ema"]["attn"][0, 0]) == 0.0
    assert merged["optimizer_steps"] == 4 and merged["members"]["down"] == ["layers.0.down_proj"]


def test_the_ema_rows_merge_with_their_inputs_and_a_part_saved_before_them_still_merges():
    merged = merge_state_parts([_part(1, 2, ["down"]), _part(0, 2, ["attn"])])
    assert merged["ema_rows"] == {"attn": 10, "down": 11}
    older = _part(1, 2, ["down"])
    del older["ema_rows"]  # written before the rows were counted
    merged = merge_state_parts([older, _part(0, 2, ["attn"])])
    assert merged["ema_rows"] == {"attn": 10} and set(merged["ema"]) == {"attn", "down"}
    broken = _part(1, 2, ["down"])
    del broken["task_window"]  # any other entry is still required
    with pytest.raises(KeyError, match="task_window"):
        merge_state_parts([broken, _part(0, 2, ["attn"])])


def test_a_missing_rank_or_a_part_of_another_step_is_refused_by_name():
    with pytest.raises(ValueError, match=r"ranks \[0\] were given, the run had 2 ranks \(missing: \[1\]\)"):
        merge_state_parts([_part(0, 2, ["attn"])])
    with pytest.raises(ValueError, match="rank 1 belongs to another run or step"):
        merge_state_parts([_part(0, 2, ["attn"]), _part(1, 2, ["down"], optimizer_steps=5)])
    with pytest.raises(ValueError, match="no FoLoRA state parts"):
        merge_state_parts([])


def test_a_state_fits_the_config_and_modules_it_was_written_with():
    check_state_fits(_part(0, 1, ["attn", "down"]), FoLoRAConfig(), MODULES, has_budget=False)


@pytest.mark.parametrize(("state_changes", "config", "modules", "has_budget", "message"), [
    ({"version": STATE_VERSION - 1}, FoLoRAConfig(), MODULES, False, "version 3 is not supported"),
    ({}, FoLoRAConfig(lora_rank=4), MODULES, False, r"different FoLoRA config: \['lora_rank'\] differ"),
    ({}, FoLoRAConfig(), MODULES | {"layers.0.v_proj"}, False, "LoRA modules differ.*v_proj"),
    ({}, FoLoRAConfig(), MODULES, True, "written without a forgetting_budget"),
])
def test_a_state_that_does_not_fit_is_refused_naming_why(state_changes, config, modules, has_budget, message):
    with pytest.raises(ValueError, match=message):
        check_state_fits(_part(0, 1, ["attn", "down"], **state_changes), config, modules, has_budget=has_budget)


def test_settings_a_resume_may_change_are_not_structural():
    state = _part(0, 1, ["attn", "down"], config=FoLoRAConfig(tau=3.0, refresh_interval=7).to_dict())
    check_state_fits(state, FoLoRAConfig(), MODULES, has_budget=False)


def test_the_tensor_parallel_size_must_be_the_one_written():
    """States before tensor parallelism carry no size: TP = 1. The engine's shards are per TP rank."""
    check_state_fits(_part(0, 1, ["attn", "down"]), FoLoRAConfig(), MODULES, has_budget=False)
    check_state_fits(_part(0, 1, ["attn", "down"], tensor_parallel=2), FoLoRAConfig(), MODULES, has_budget=False,
                     tensor_parallel=2)
    with pytest.raises(ValueError, match="written at tensor-parallel size 2, this run has 4.*resume at TP = 2"):
        check_state_fits(_part(0, 1, ["attn", "down"], tensor_parallel=2), FoLoRAConfig(), MODULES,
                         has_budget=False, tensor_parallel=4)
    with pytest.raises(ValueError, match="written at tensor-parallel size 1, this run has 2"):
        check_state_fits(_part(0, 1, ["attn", "down"]), FoLoRAConfig(), MODULES, has_budget=False,
                         tensor_parallel=2)

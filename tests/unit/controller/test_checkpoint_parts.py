"""FoLoRA's checkpoint parts in one process: a re-save of a tag replaces parts of an earlier save (of any world
size), and parts of different world sizes are never merged."""

from __future__ import annotations

import pytest
import torch

from folora_ds.controller import checkpoint
from folora_ds.method.config import FoLoRAConfig
from tests.testing.controller import calibrated_controller


class _Engine:
    """What ``save_checkpoint`` needs of a DeepSpeed engine."""

    global_steps = 3

    def save_checkpoint(self, directory, tag):
        torch.save({"weights": 1}, f"{directory}/{tag}/mp_rank_00_model_states.pt")


def test_a_resave_replaces_the_parts_of_an_earlier_save_of_another_world_size(tmp_path):
    _, controller = calibrated_controller(FoLoRAConfig())
    stale = tmp_path / "final" / "folora_state" / "rank_00002_of_00003.pt"
    stale.parent.mkdir(parents=True)
    torch.save({"stale": True}, stale)
    folder = checkpoint.save_checkpoint(_Engine(), controller.state_dict(), tmp_path, "final")
    assert sorted(p.name for p in (folder / "folora_state").iterdir()) == ["rank_00000_of_00001.pt"]
    state = checkpoint.read_folora_state(folder)
    assert set(state["pre"]) == set(controller.dims)


def test_parts_of_different_world_sizes_are_refused(tmp_path):
    _, controller = calibrated_controller(FoLoRAConfig())
    folder = checkpoint.save_checkpoint(_Engine(), controller.state_dict(), tmp_path, "t")
    torch.save({"other": True}, folder / "folora_state" / "rank_00001_of_00002.pt")
    with pytest.raises(ValueError, match=r"mixes FoLoRA state parts of runs with \[1, 2\] ranks"):
        checkpoint.read_folora_state(folder)


def test_loading_a_state_replaces_the_c_task_estimate_held_before():
    _, source = calibrated_controller(FoLoRAConfig())
    _, target = calibrated_controller(FoLoRAConfig())
    key = next(iter(source.dims))
    with torch.no_grad():
        target.task_ema[key].mul_(3.0)  # an estimate that differs from the saved one
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target.task_ema[key], source.task_ema[key], rtol=0, atol=0)

"""Kill-and-resume equals an uninterrupted run; resuming on another world size works (ZeRO-0 directly, ZeRO 1/2/3
through DeepSpeed's universal checkpoint); bad checkpoints are refused, named, before DeepSpeed loads them."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from tests.testing.ranks import (
    MICRO_BATCHES_PER_STEP,
    calibration_shards,
    ds_config,
    full_weights,
    run_ranks,
    tiny_model,
    train_steps,
)

TOTAL_STEPS, STOP_AT = 10, 6


def _train(rank: int, world: int, stage: int, first: int, last: int, checkpoint: str | None,
           resume: str | None, folora_overrides: dict | None = None, ds_extra: dict | None = None,
           lora_rank: int | None = None) -> dict:
    import folora_ds

    accumulation = MICRO_BATCHES_PER_STEP // world
    config = ds_config(stage, accumulation=accumulation, folora=folora_overrides, clip=1.0, **(ds_extra or {}))
    model = tiny_model() if lora_rank is None else tiny_model(lora_rank)
    engine, controller = folora_ds.initialize(model, config, resume_from=resume,
                                              **({} if resume else calibration_shards(rank, world)))
    train_steps(engine, controller, rank, world, first, last, accumulation)
    controller.check_gating()
    if checkpoint:
        controller.save_checkpoint(checkpoint)
    return {"weights": full_weights(engine.module, stage), "steps": controller.optimizer_steps,
            "refreshes": controller.refreshes,
            "tau_scale": None if controller.budget is None else controller.budget.tau_scale,
            "last_measured": None if controller.budget is None else controller.budget.last_measured}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per ZeRO stage (computed once): the uninterrupted 2-rank run and a checkpoint taken at STOP_AT."""
    cache = {}

    def get(stage: int) -> tuple[dict, str]:
        if stage not in cache:
            checkpoint = str(tmp_path_factory.mktemp(f"zero{stage}") / "ckpt")
            uninterrupted = run_ranks(2, _train, stage, 0, TOTAL_STEPS, None, None)[0]
            run_ranks(2, _train, stage, 0, STOP_AT, checkpoint, None)  # these processes end here
            cache[stage] = (uninterrupted, checkpoint)
        return cache[stage]

    return get


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_kill_and_resume_equals_uninterrupted(runs, stage):
    uninterrupted, checkpoint = runs(stage)
    resumed = run_ranks(2, _train, stage, STOP_AT, TOTAL_STEPS, None, checkpoint)
    for result in resumed:
        assert result["steps"] == TOTAL_STEPS and result["refreshes"] == uninterrupted["refreshes"] == 2
        for name, expected in uninterrupted["weights"].items():
            torch.testing.assert_close(result["weights"][name], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_another_world_size_through_a_universal_checkpoint(runs, stage):
    """DeepSpeed cannot re-partition ZeRO 1/2/3 optimizer state directly: the error says how, and the converted
    checkpoint resumes on 3 ranks (ZeRO-3's universal loader overwrites every param group with group 0's entries;
    the gate markers are restored, or the LoRA-B group would be taken for LoRA-A)."""
    import folora_ds

    uninterrupted, checkpoint = runs(stage)
    with pytest.raises(ProcessRaisedException, match="load_universal"):
        run_ranks(3, _train, stage, STOP_AT, STOP_AT + 1, None, checkpoint)
    folora_ds.convert_to_universal_checkpoint(checkpoint)
    resumed = run_ranks(3, _train, stage, STOP_AT, TOTAL_STEPS, None, checkpoint, None,
                        {"checkpoint": {"load_universal": True}})
    for result in resumed:
        assert result["steps"] == TOTAL_STEPS
        for name, expected in uninterrupted["weights"].items():
            torch.testing.assert_close(result["weights"][name], expected, rtol=0, atol=1e-6)


def test_resume_on_another_world_size_matches(runs):
    uninterrupted, checkpoint = runs(0)
    resumed = run_ranks(3, _train, 0, STOP_AT, TOTAL_STEPS, None, checkpoint)
    for result in resumed:
        for name, expected in uninterrupted["weights"].items():
            torch.testing.assert_close(result["weights"][name], expected, rtol=0, atol=1e-6)


def test_checkpoint_from_an_incompatible_config_is_refused(tmp_path):
    run_ranks(2, _train, 0, 0, 2, str(tmp_path / "ckpt"), None)
    with pytest.raises(ProcessRaisedException, match="different FoLoRA config: \\['k'\\]"):
        run_ranks(2, _train, 0, 2, 3, None, str(tmp_path / "ckpt"), {"k": 4})
    with pytest.raises(ProcessRaisedException, match="does not exist"):
        run_ranks(2, _train, 0, 2, 3, None, str(tmp_path / "missing"))


def test_kill_and_resume_on_another_world_size_carries_the_forgetting_budget(tmp_path):
    """θ and the base energy survive a resume on 3 ranks (ZeRO-0)."""
    budget = {"forgetting_budget": 0.05, "budget_step_size": 0.5}
    uninterrupted = run_ranks(2, _train, 0, 0, TOTAL_STEPS, None, None, budget)[0]
    run_ranks(2, _train, 0, 0, STOP_AT, str(tmp_path / "ckpt"), None, budget)
    resumed = run_ranks(3, _train, 0, STOP_AT, TOTAL_STEPS, None, str(tmp_path / "ckpt"), budget)
    assert 1.2 < uninterrupted["tau_scale"] < 500, "the budget must move τ without clipping it"
    for result in resumed:
        assert result["last_measured"] == pytest.approx(uninterrupted["last_measured"], rel=1e-6)
        assert result["tau_scale"] == pytest.approx(uninterrupted["tau_scale"], rel=1e-6)
        for name, expected in uninterrupted["weights"].items():
            torch.testing.assert_close(result["weights"][name], expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- damaged and mismatched checkpoints
@pytest.fixture(scope="module")
def zero2_checkpoint(runs):
    return runs(2)[1]


def _copy(checkpoint: str, target) -> str:
    import shutil

    shutil.copytree(checkpoint, target)
    return str(target)


def test_another_lora_rank_is_named_before_deepspeed_loads_weights(zero2_checkpoint, tmp_path):
    """Without the FoLoRA check first, DeepSpeed would print torch's wall of size mismatches."""
    with pytest.raises(ProcessRaisedException, match="different FoLoRA config: \\['lora_rank'\\]") as caught:
        run_ranks(2, _train, 2, STOP_AT, STOP_AT + 1, None, zero2_checkpoint, {"lora_rank": 4}, None, 4)
    assert "size mismatch" not in str(caught.value)


@pytest.mark.parametrize("damaged", ["model", "optimizer", "folora"])
def test_a_truncated_file_is_named(zero2_checkpoint, tmp_path, damaged):
    checkpoint = _copy(zero2_checkpoint, tmp_path / "ckpt")
    tag = (tmp_path / "ckpt" / "latest").read_text().strip()
    pattern = {"model": "mp_rank_00_model_states.pt", "optimizer": "*zero_pp_rank_1_*optim_states.pt",
               "folora": "folora_state/rank_00001_of_00002.pt"}[damaged]
    path = next((tmp_path / "ckpt" / tag).glob(pattern))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ProcessRaisedException, match=f"{path.name}.*truncated or corrupt"):
        run_ranks(2, _train, 2, STOP_AT, STOP_AT + 1, None, checkpoint)


def test_a_missing_folora_state_part_is_named(zero2_checkpoint, tmp_path):
    checkpoint = _copy(zero2_checkpoint, tmp_path / "ckpt")
    tag = (tmp_path / "ckpt" / "latest").read_text().strip()
    (tmp_path / "ckpt" / tag / "folora_state" / "rank_00000_of_00002.pt").unlink()
    with pytest.raises(ProcessRaisedException, match="rank_00000_of_00002.pt' is missing"):
        run_ranks(2, _train, 2, STOP_AT, STOP_AT + 1, None, checkpoint)


def test_latest_naming_a_missing_tag_is_named(zero2_checkpoint, tmp_path):
    checkpoint = _copy(zero2_checkpoint, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "latest").write_text("global_step999")
    with pytest.raises(ProcessRaisedException, match="names tag 'global_step999'.*does not exist"):
        run_ranks(2, _train, 2, STOP_AT, STOP_AT + 1, None, checkpoint)


def test_a_checkpoint_of_another_zero_stage_is_refused(runs):
    """DeepSpeed would restart the Adam moments from zero with only a log line."""
    _, zero0 = runs(0)
    with pytest.raises(ProcessRaisedException, match="written at stage 0, this run uses ZeRO stage 2"):
        run_ranks(2, _train, 2, STOP_AT, STOP_AT + 1, None, zero0)

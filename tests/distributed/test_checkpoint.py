"""Kill-and-resume equals an uninterrupted run; resuming on another world size works (ZeRO-0 directly, ZeRO 1/2/3
through DeepSpeed's universal checkpoint); bad checkpoints are refused."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from tests.distributed.spawn import run_ranks
from tests.distributed.test_equivalence import (
    ADAMW,
    FOLORA,
    MICRO_BATCHES_PER_STEP,
    _batch,
    _micro_batch,
    _model,
    _proxy,
)

TOTAL_STEPS, STOP_AT = 10, 6


def _train(rank: int, world: int, stage: int, first: int, last: int, checkpoint: str | None,
           resume: str | None, folora_overrides: dict | None = None, ds_extra: dict | None = None) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    import folora_ds.engine

    accumulation = MICRO_BATCHES_PER_STEP // world
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": accumulation,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": ADAMW}, "folora": {**FOLORA, **(folora_overrides or {})},
              **(ds_extra or {})}
    shard = dict(proxy_batches=[_proxy(i) for i in range(6) if i % world == rank],
                 task_batches=[_batch(i) for i in range(6) if i % world == rank])
    engine, controller = folora_ds.engine.initialize(_model(), config, resume_from=resume,
                                                     **({} if resume else shard))
    engine.train()
    for step in range(first, last):
        for micro in range(accumulation):
            batch = _micro_batch(step, micro * world + rank)
            with controller.track_task(batch):
                loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            controller.after_engine_step()
    controller.check_gating()
    if checkpoint:
        controller.save_checkpoint(checkpoint)
    weights = {name: (safe_get_full_fp32_param(p) if stage > 0 else p.detach()).clone()
               for name, p in engine.module.named_parameters() if p.requires_grad}
    return {"weights": weights, "steps": controller.optimizer_steps, "refreshes": controller.refreshes,
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
    import folora_ds.engine

    uninterrupted, checkpoint = runs(stage)
    with pytest.raises(ProcessRaisedException, match="load_universal"):
        run_ranks(3, _train, stage, STOP_AT, STOP_AT + 1, None, checkpoint)
    folora_ds.engine.convert_to_universal_checkpoint(checkpoint)
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
    """θ and the base energy (restored on one rank, then summed) survive a resume on 3 ranks (ZeRO-0)."""
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

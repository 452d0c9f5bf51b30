"""``folora-ds plan`` against a measured 2-rank ZeRO-3 run (sampled statistics): statistics, projectors and token
rows sent are the plan's figures exactly; base-weight, LoRA and optimizer shards within 15% (ZeRO-3 pads each
parameter's pieces, which matters at these tiny shapes)."""

from __future__ import annotations

import pytest
import torch

from tests.testing.ranks import (
    FOLORA,
    base_model,
    calibration_shards,
    ds_config,
    micro_batch,
    run_ranks,
    tiny_model,
)

LAYERS = 2
TRAINING_FORWARDS = 3


def _measured(rank: int, world: int) -> dict:
    import folora_ds

    config = ds_config(3, zero={"stage3_param_persistence_threshold": 0}, folora={"statistics_tokens": 8})
    model = tiny_model(num_layers=LAYERS)
    engine, controller = folora_ds.initialize(model, config, **calibration_shards(rank, world))
    exchange = controller.collector._exchange
    before = exchange.bytes_sent
    for index in range(TRAINING_FORWARDS):
        data = micro_batch(0, index * world + rank)
        with controller.track_task(data):
            loss = engine(**data).loss
        engine.backward(loss)
        engine.step()
        controller.after_step()

    def shard_bytes(trainable: bool) -> int:
        return sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters()
                   if p.requires_grad == trainable)

    zero = engine.optimizer
    state = [t for s in zero.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    kept = [controller.solver.projector(key) for key in controller.pre_covariances]
    return {"statistics": controller.statistics_bytes(), "projectors": controller.projector_bytes(),
            "solver": sum(t.numel() * t.element_size() for p in kept for t in (p.c_tilde_v, p.v, p.gates)),
            "sent_per_forward": (exchange.bytes_sent - before) / TRAINING_FORWARDS,
            "base": shard_bytes(False), "lora": shard_bytes(True),
            "optimizer": sum(t.numel() * t.element_size() for t in [*zero.fp32_partitioned_groups_flat, *state]),
            "dims": controller.dims, "owners": controller.owners}


def test_plan_matches_a_measured_zero3_run(tmp_path):
    from folora_ds.method.config import FoLoRAConfig
    from folora_ds.training.plan import PlanSettings, plan_from_files

    base_model(LAYERS).config.to_json_file(tmp_path / "config.json")
    results = run_ranks(2, _measured)
    settings = PlanSettings(world_size=2, zero_stage=3, model_dtype="float32", micro_batch=2, seq_len=10,
                            solve_seconds_per_gflop=1.0)
    plan = plan_from_files(tmp_path / "config.json", settings, FoLoRAConfig(**{**FOLORA, "statistics_tokens": 8}))
    assert plan.owners == results[0]["owners"] and plan.model.inputs == results[0]["dims"]
    for rank, (measured, planned) in enumerate(zip(results, plan.ranks)):
        assert measured["statistics"] == planned.statistics_training, f"rank {rank}"
        assert measured["projectors"] == planned.projectors, f"rank {rank}"
        assert measured["solver"] == planned.solver_projectors, f"rank {rank}"
        assert measured["base"] == pytest.approx(planned.base_weights, rel=0.15), f"rank {rank}"
        assert measured["lora"] == pytest.approx(planned.lora_parameters, rel=0.15), f"rank {rank}"
        assert measured["optimizer"] == pytest.approx(planned.lora_optimizer, rel=0.15), f"rank {rank}"
    mean_sent = sum(result["sent_per_forward"] for result in results) / len(results)
    assert mean_sent == pytest.approx(plan.bytes_per_collecting_micro_batch, rel=1e-9)

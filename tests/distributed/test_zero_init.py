"""A model built under ``deepspeed.zero.Init`` (no rank ever holds it whole, as users load 70B) calibrates through
the ZeRO-3 engine, trains with refreshes, checkpoints and exports, and equals one process on a replicated model;
each rank holds the statistics of its own inputs only: 3 (d, d) buffers per owned input (C_pre, the C_task EMA,
the current window), against C_pre and C_task sums of every input on every rank before (half of that at 3
ranks when owners balance, as they do here)."""

from __future__ import annotations

from tests.testing.ranks import (
    CLIP,
    FOLORA,
    MICRO_BATCHES_PER_STEP,
    STEPS,
    assert_matches_reference,
    base_model,
    calibration_shards,
    ds_config,
    full_weights,
    micro_batch,
    partitioned_tiny_model,
    run_ranks,
    single_process_reference,
    train_steps,
)

LAYERS = 3  # 12 inputs (9 of width 24, 3 of width 40): owners balance exactly over 3 ranks


def _zero_init_run(rank: int, world: int, directory: str) -> dict:
    import folora_ds

    accumulation = MICRO_BATCHES_PER_STEP // world
    config = ds_config(3, accumulation=accumulation, clip=CLIP, zero={"stage3_param_persistence_threshold": 0})
    model = partitioned_tiny_model(config, LAYERS)
    frozen = [param for name, param in model.named_parameters() if not param.requires_grad]
    whole_before = sum(param.data.numel() for param in frozen)
    engine, controller = folora_ds.initialize(model, config, **calibration_shards(rank, world))
    train_steps(engine, controller, rank, world, 0, STEPS, accumulation)
    controller.check_gating()
    statistics_bytes = controller.statistics_bytes()
    controller.save_checkpoint(f"{directory}/checkpoint")
    controller.export_adapter(f"{directory}/adapter")
    return {"weights": full_weights(model, 3), "gated": controller.gated_step_counts(),
            "steps": controller.optimizer_steps, "refreshes": controller.refreshes,
            "frozen_elements_held": whole_before, "frozen_elements": sum(p.ds_numel for p in frozen),
            "statistics_bytes": statistics_bytes, "dims": controller.dims, "owners": controller.owners}


def test_a_model_built_under_zero_init_calibrates_trains_checkpoints_and_exports_like_one_process(tmp_path):
    results = run_ranks(3, _zero_init_run, str(tmp_path))
    for result in results:
        assert result["frozen_elements_held"] == 0 < result["frozen_elements"], "the base model must be partitioned"
    assert_matches_reference(results, single_process_reference(num_layers=LAYERS))
    dims = results[0]["dims"]
    # before: C_pre and C_task sums of every input on every rank during calibration (float64)
    replicated = 2 * sum(dim * dim for dim in dims.values()) * 8
    for rank, result in enumerate(results):
        owned = sum(dims[key] ** 2 for key, owner in result["owners"].items() if owner == rank)
        assert result["statistics_bytes"] == 3 * owned * 8  # C_pre, C_task EMA, current window: owned inputs only
        assert result["statistics_bytes"] <= replicated / 2
    from folora_ds.method.config import FoLoRAConfig
    from folora_ds.training.plan import PlanSettings, plan_from_files

    base_model(LAYERS).config.to_json_file(tmp_path / "config.json")
    plan = plan_from_files(tmp_path / "config.json", PlanSettings(world_size=3, model_dtype="float32",
                                                                  solve_seconds_per_gflop=1.0), FoLoRAConfig(**FOLORA))
    assert [result["statistics_bytes"] for result in results] == [rank.statistics_training for rank in plan.ranks]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "checkpoint" / "latest").is_file()


def _sample_proxy_from_partitioned(rank: int, world: int) -> str:
    import folora_ds
    from folora_ds.training.models import load_model

    _, tokenizer = load_model("tiny-llama")
    config = ds_config(3)
    try:
        folora_ds.initialize(partitioned_tiny_model(config, LAYERS), config, task_batches=[micro_batch(0, rank)],
                             tokenizer=tokenizer)
    except ValueError as error:
        return str(error)
    return "no error"


def test_proxy_sampling_from_a_partitioned_model_is_refused_naming_proxy_path():
    for message in run_ranks(2, _sample_proxy_from_partitioned):
        assert "already partitioned" in message and "proxy.path" in message

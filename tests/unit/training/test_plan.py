"""``folora_ds.training.plan``: the meta-device model shape equals what the collector finds on the real model;
the per-rank figures add up and partition the statistics exactly once; the shipped Llama configs have the
published shapes."""

from __future__ import annotations

import json

import pytest
import torch

from folora_ds.cli import main
from folora_ds.controller import FoLoRAController
from folora_ds.method.config import FoLoRAConfig
from folora_ds.training.models import build_tiny_llama
from folora_ds.training.plan import (
    PlanSettings,
    format_plan,
    load_model_config,
    lora_parameters_per_tp_rank,
    make_plan,
    model_shape,
    plan_from_files,
)

FOLORA = FoLoRAConfig(lora_rank=4, k=6)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "config.json"
    build_tiny_llama(64, hidden_size=32, intermediate_size=48, num_layers=2).config.to_json_file(path)
    return path


def test_meta_shape_equals_the_collectors_inputs_on_the_real_model(tiny_config):
    from peft import LoraConfig, get_peft_model

    shape = model_shape(load_model_config(tiny_config), FOLORA)
    model = get_peft_model(build_tiny_llama(64, hidden_size=32, intermediate_size=48, num_layers=2),
                           LoraConfig(r=4, lora_alpha=FOLORA.lora_alpha, target_modules=list(FOLORA.target_modules)))
    controller = FoLoRAController(model, FOLORA)
    batch = {"input_ids": torch.randint(0, 64, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    controller.calibrate([batch], [{**batch, "labels": batch["input_ids"]}])
    assert shape.inputs == controller.dims
    assert shape.lora_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert shape.base_parameters == sum(p.numel() for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_per_rank_figures_add_up_and_statistics_are_partitioned_once(tiny_config, stage):
    shape = model_shape(load_model_config(tiny_config), FOLORA)
    plan = make_plan(shape, PlanSettings(world_size=3, zero_stage=stage, model_dtype="float32",
                                         solve_seconds_per_gflop=1.0), FOLORA)
    squares = sum(d * d for d in shape.inputs.values())
    assert sum(rank.statistics_training for rank in plan.ranks) == 3 * squares * 4
    assert sum(rank.statistics_calibration for rank in plan.ranks) == 2 * squares * 4
    assert plan.replicated_statistics == 2 * squares * 4
    assert sum(rank.inputs_owned for rank in plan.ranks) == len(shape.inputs)
    assert sum(rank.solve_seconds for rank in plan.ranks) == pytest.approx(sum(d ** 3 for d in shape.inputs.values())
                                                                           / 1e9)
    for rank in plan.ranks:
        parts = (rank.base_weights + rank.lora_parameters + rank.lora_gradients + rank.lora_optimizer
                 + max(rank.statistics_training + rank.projectors + rank.solver_projectors + rank.solve_workspace,
                       rank.statistics_calibration)
                 + rank.exchange_buffers)
        assert rank.peak == parts
        assert rank.base_weights == shape.base_parameters * 4 // (3 if stage == 3 else 1)
        tokens = 4096  # PlanSettings' default micro-batch 1 × 4096
        logits = tokens * 64 * (4 + 4 + 4)
        assert rank.activations == tokens * 2 * (10 * 32 + 4 * 48) * 4 + logits
        assert logits < rank.activations_checkpointed < rank.activations


def test_shipped_llama_3_70b_has_the_published_shape():
    shape = model_shape(load_model_config("llama-3-70b"), FoLoRAConfig(lora_rank=16))
    assert len(shape.inputs) == 80 * 4
    assert sorted(set(shape.inputs.values())) == [8192, 28672]
    assert 70.4e9 < shape.base_parameters < 70.7e9  # 70.55 B (Meta's "70B")
    assert shape.lora_parameters == 80 * 16 * (  # r × (d_in + d_out) of q, k, v, o, gate, up, down
        (8192 + 8192) + 2 * (8192 + 1024) + (8192 + 8192) + 2 * (8192 + 28672) + (28672 + 8192))


def test_plan_command_prints_the_figures_and_json(tiny_config, capsys):
    assert main(["plan", "--model-config", str(tiny_config), "--world", "4", "--nodes", "2", "--dtype", "float32",
                 "--solve-rate", "1.0", "--set", "k=6", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["settings"]["world_size"] == 4 and len(plan["ranks"]) == 4
    assert plan["folora"]["k"] == 6
    assert main(["plan", "--model-config", str(tiny_config), "--world", "2", "--solve-rate", "1.0"]) == 0
    text = capsys.readouterr().out
    assert "statistics before owner partitioning" in text and "peak" in text


def test_plan_reads_the_stage_as_deepspeed_does(tiny_config, tmp_path, capsys):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "folora": {"k": 6}}))  # no zero block: 0
    assert main(["plan", "--model-config", str(tiny_config), "--world", "2", "--config", str(config),
                 "--solve-rate", "1.0", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["settings"]["zero_stage"] == 0 and plan["settings"]["micro_batch"] == 2
    assert plan["settings"]["model_dtype"] == "float32"


@pytest.mark.parametrize(("arguments", "message"), [
    (["--model-config", "no-such-model", "--world", "2"], "not found"),
    (["--model-config", "llama-3-8b", "--world", "6", "--nodes", "4"], "nodes=4 must divide world_size=6"),
    (["--model-config", "llama-3-8b", "--world", "2", "--stage", "4"], "zero_stage=4"),
    (["--model-config", "llama-3-8b", "--world", "2", "--set", "kk=3"], "kk"),
    (["--model-config", "llama-3-8b", "--world", "2", "--solve-rate", "-1"], "solve_seconds_per_gflop (--solve-rate)"
                                                                               "=-1.0 is invalid"),
    (["--model-config", "llama-3-8b", "--world", "2", "--solve-rate", "0"], "solve_seconds_per_gflop (--solve-rate)"
                                                                              "=0.0 is invalid"),
    (["--model-config", "llama-3-8b", "--world", "2", "--solve-rate", "nan"], "(--solve-rate)=nan is invalid"),
    (["--model-config", "llama-3-8b", "--world", "6", "--tp", "4"], "tensor_parallel=4 must be an integer >= 1 "
                                                                     "dividing world_size=6"),
])
def test_plan_command_names_bad_input(arguments, message, capsys):
    rate = [] if "--solve-rate" in arguments else ["--solve-rate", "1.0"]
    assert main(["plan", *arguments, *rate]) == 2
    assert message in capsys.readouterr().err


def test_plan_from_files_accepts_a_model_folder(tiny_config):
    plan = plan_from_files(tiny_config.parent, PlanSettings(world_size=2, solve_seconds_per_gflop=1.0), FOLORA)
    assert plan.model.name == tiny_config.parent.name and len(plan.ranks) == 2


def test_tensor_parallelism_splits_weights_lora_projector_rows_and_traffic(tiny_config, capsys):
    """TP = 2 x DP = 2 against TP = 1 x DP = 4 at ZeRO 1: base weights halve; LoRA per rank follows the Megatron
    layout (column: A whole, B / TP; row: A / TP, B whole) and ZeRO partitions it over DP only; row-parallel
    inputs' projectors hold d / 2 rows; token rows sent halve; the gate all-reduces r x k per row-parallel A."""
    shape = model_shape(load_model_config(tiny_config), FOLORA)
    settings = {"world_size": 4, "zero_stage": 1, "model_dtype": "float32", "solve_seconds_per_gflop": 1.0}
    flat, split = (make_plan(shape, PlanSettings(**settings, tensor_parallel=tp), FOLORA) for tp in (1, 2))
    assert split.ranks[0].base_weights * 2 == flat.ranks[0].base_weights
    r, hidden, ffn = 4, 32, 48  # q/k/v/gate/up column, o/down row; k/v are 16 wide (2 of 4 heads' widths)
    per_layer = (r * hidden + hidden // 2 * r) + 2 * (r * hidden + 16 // 2 * r) + (r * hidden // 2 + hidden * r) \
        + 2 * (r * hidden + ffn // 2 * r) + (r * ffn // 2 + hidden * r)
    assert lora_parameters_per_tp_rank(shape, r, 2) == 2 * per_layer
    assert split.ranks[0].lora_optimizer == 2 * per_layer * 12 // 2  # fp32 master + m + v over DP = 2
    assert split.bytes_per_collecting_micro_batch * 2 == pytest.approx(flat.bytes_per_collecting_micro_batch, abs=1)
    row_inputs = {key for key in shape.inputs if key.endswith(("o_proj", "down_proj"))}
    assert split.model.row_parallel_inputs == row_inputs and len(row_inputs) == 4
    k = FOLORA.k
    rows = sum(shape.inputs[key] // 2 if key in row_inputs else shape.inputs[key] for key in shape.inputs)
    assert split.ranks[0].projectors == -(-(2 * rows * k + k * len(shape.inputs)) * 4 // 2)  # / DP at ZeRO 1
    assert split.tensor_parallel_gate_bytes_per_step == 4 * r * k * 4 * 2 * 1 // 2 // 2  # ring, / DP at ZeRO 1
    assert flat.tensor_parallel_gate_bytes_per_step == 0
    assert main(["plan", "--model-config", str(tiny_config), "--world", "4", "--tp", "2", "--stage", "1",
                 "--solve-rate", "1.0"]) == 0
    text = capsys.readouterr().out
    assert "(TP 2 x DP 2)" in text and "gate coordinates all-reduced over TP per optimizer step" in text


@pytest.mark.parametrize(("change", "message"), [
    ({"num_hidden_layers": 0}, "num_hidden_layers=0 is invalid"),
    ({"hidden_size": -64}, "hidden_size=-64 is invalid"),
    ({"intermediate_size": "wide"}, "intermediate_size='wide' is invalid"),
])
def test_a_model_config_with_impossible_sizes_is_named(tiny_config, tmp_path, capsys, change, message):
    values = {**json.loads(tiny_config.read_text()), **change}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    assert main(["plan", "--model-config", str(path), "--world", "2", "--solve-rate", "1.0"]) == 2
    error = capsys.readouterr().err
    assert message in error and "config.json" in error and len(error.strip().splitlines()) == 1


def test_the_plan_prints_the_statistics_share_the_controller_fits_to_the_same_shape(tiny_config, capsys):
    """The plan's statistics share equals ``statistics_cost`` on the model's own linear weights and inputs, weighted
    by the busiest of the owners the controller assigns and by a bf16 model's flop cost; with
    ``statistics_flops_share`` it shows the schedule the controller would fit (every token of a micro-batch
    counted, as the plan cannot know the labels)."""
    from peft import LoraConfig, get_peft_model

    from folora_ds.controller.calibration import linear_parameters
    from folora_ds.distributed.ownership import assign_owners
    from folora_ds.method.statistics_cost import (
        NARROW_MODEL_FLOP_COST,
        StatisticsSchedule,
        StepShape,
        owner_imbalance,
        schedule_within_share,
        statistics_share,
    )

    shape = model_shape(load_model_config(tiny_config), FOLORA)
    model = build_tiny_llama(64, hidden_size=32, intermediate_size=48, num_layers=2)

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=FOLORA.lora_alpha,
                                                  target_modules=list(FOLORA.target_modules)))
    assert shape.linear_parameters == linear_parameters(peft_model)
    def step_on(world: int) -> StepShape:
        return StepShape(tokens=2 * 40, counted_tokens=2 * 40, input_widths=tuple(shape.inputs.values()),
                         linear_parameters=shape.linear_parameters, flop_cost=NARROW_MODEL_FLOP_COST,
                         owner_imbalance=owner_imbalance(assign_owners(shape.inputs, world), shape.inputs, world))

    step, uneven = step_on(2), step_on(3)
    assert uneven.owner_imbalance > 1  # three owners of eight inputs: one folds more than the average
    on_three = make_plan(shape, PlanSettings(world_size=3, micro_batch=2, seq_len=40, solve_seconds_per_gflop=1.0),
                         FOLORA)
    assert on_three.statistics_share == pytest.approx(statistics_share(StatisticsSchedule(64, 1), uneven))
    settings = PlanSettings(world_size=2, micro_batch=2, seq_len=40, solve_seconds_per_gflop=1.0)
    assert settings.model_dtype == "bfloat16"  # narrower than the float32 statistics
    plan = make_plan(shape, settings, FOLORA)
    assert plan.statistics_schedule == StatisticsSchedule(64, 1)
    assert plan.statistics_share == pytest.approx(statistics_share(StatisticsSchedule(64, 1), step))
    bounded = FoLoRAConfig(lora_rank=4, k=6, statistics_flops_share=0.05)
    fitted = make_plan(shape, settings, bounded)
    assert fitted.statistics_schedule == schedule_within_share(0.05, StatisticsSchedule(64, 1), step)
    assert fitted.statistics_share <= 0.05 < fitted.configured_statistics_share
    assert fitted.collecting_micro_batches_per_step == 1 / fitted.statistics_schedule.every
    assert main(["plan", "--model-config", str(tiny_config), "--world", "2", "--micro-batch", "2", "--seq-len", "40",
                 "--solve-rate", "1.0", "--set", "k=6", "--set", "lora_rank=4",
                 "--set", "statistics_flops_share=0.05"]) == 0
    text = capsys.readouterr().out
    schedule = fitted.statistics_schedule
    assert (f"statistics: {schedule.tokens} tokens per input on one micro-batch in {schedule.every}, "
            f"{fitted.statistics_share:.2%}") in text and "statistics_flops_share 0.05" in text


def test_a_top_k_plan_counts_the_kept_factors_and_prints_the_full_solve_bound():
    """Llama-3-70B with ``eigensolver: auto``: its 28672- and 8192-wide inputs are solved top-k, each owner keeps
    their Cholesky factors, and the plan states that a full-rank C_task's refresh can cost up to the full solve."""
    from folora_ds.method.solve_cost import solve_seconds

    folora = FoLoRAConfig(lora_rank=16, k=64, eigensolver="auto", solve_dtype="float32")
    shape = model_shape(load_model_config("llama-3-70b"), folora)
    settings = PlanSettings(world_size=64, seq_len=256, solve_seconds_per_gflop=0.08)
    plan, full = make_plan(shape, settings, folora), make_plan(shape, settings, FoLoRAConfig(lora_rank=16, k=64,
                                                                                             solve_dtype="float32"))
    for rank, full_rank in zip(plan.ranks, full.ranks, strict=True):
        owned = [key for key, owner in plan.owners.items() if owner == rank.rank]
        assert rank.solve_factors == sum(shape.inputs[key] ** 2 * 4 for key in owned)
        assert rank.solve_seconds == pytest.approx(sum(solve_seconds(shape.inputs[key], folora, 0.08) for key in owned))
        assert rank.solve_seconds < full_rank.solve_seconds / 5
    assert "top-k solves (auto, k=64) for 320 inputs" in format_plan(plan)

"""``folora-ds plan --tp 2`` against a measured TP = 2 run of ``ParallelLlamaForCausalLM`` (2 gloo ranks): LoRA
parameters per TP rank, statistics, projector rows, token rows sent to owners and the gate's coordinates
all-reduced over TP are the plan's figures exactly."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the optional megatron extra)")

from folora_ds.adapters.megatron import parallel_state  # noqa: E402
from folora_ds.adapters.megatron.llama import parallel_llama_from_hf  # noqa: E402
from folora_ds.controller import FoLoRAController  # noqa: E402
from folora_ds.method.config import FoLoRAConfig  # noqa: E402
from folora_ds.method.gated_adamw import GatedAdamW, folora_param_groups  # noqa: E402
from folora_ds.training.models import build_tiny_llama  # noqa: E402
from folora_ds.training.plan import PlanSettings, lora_parameters_per_tp_rank, plan_from_files  # noqa: E402
from tests.testing.megatron import CountingLayout  # noqa: E402
from tests.testing.ranks import run_ranks  # noqa: E402

FOLORA = {"lora_rank": 4, "lora_alpha": 8, "k": 6, "statistics_tokens": None, "statistics_dtype": "float64",
          "refresh_interval": 100}
MICRO_BATCH, SEQ = 2, 9


def _hf_model():
    return build_tiny_llama(64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                            seed=1)


def _batch(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (MICRO_BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _measured(rank: int, world: int) -> dict:
    state = parallel_state()
    state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        model = parallel_llama_from_hf(_hf_model(), lora_rank=4, lora_alpha=8)
        controller = FoLoRAController(model, FoLoRAConfig(**FOLORA))
        controller.layout = CountingLayout(**{field.name: getattr(controller.layout, field.name)
                                              for field in dataclasses.fields(controller.layout)})
        controller.calibrate([_batch(100), _batch(101)], [_batch(200)])
        controller.solve()
        optimizer = GatedAdamW(folora_param_groups(model), lr=1e-3)
        controller.attach(optimizer)
        exchange = controller.collector._exchange
        before = exchange.bytes_sent
        data = _batch(300)
        with controller.track_task(data):
            loss = model(**data).loss
        loss.backward()
        sent = exchange.bytes_sent - before
        optimizer.step()
        return {"lora": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "projectors": controller.projector_bytes(), "statistics": controller.statistics_bytes(),
                "sent": sent, "reduced": sum(math.prod(shape) for shape in controller.layout.reduces)}
    finally:
        state.destroy_model_parallel()


def test_the_tp2_plan_is_what_a_tp2_run_holds_and_sends(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_hf_model().config.to_dict()))
    plan = plan_from_files(config, PlanSettings(world_size=2, tensor_parallel=2, zero_stage=0, model_dtype="float32",
                                                micro_batch=MICRO_BATCH, seq_len=SEQ, solve_seconds_per_gflop=1.0),
                           FOLORA)
    results = run_ranks(2, _measured)
    assert lora_parameters_per_tp_rank(plan.model, 4, 2) == results[0]["lora"] == results[1]["lora"]
    for rank, result in enumerate(results):
        planned = plan.ranks[rank]
        assert result["lora"] * 4 == planned.lora_parameters
        assert result["projectors"] == planned.projectors, f"rank {rank}"
        assert result["statistics"] == planned.statistics_training, f"rank {rank}"
    # token rows: the plan's figure is the average rank's (each input's rows leave for its owner)
    assert sum(result["sent"] for result in results) == 2 * plan.bytes_per_collecting_micro_batch
    # gate: r x k coordinates per row-parallel LoRA-A (o_proj, down_proj in 2 layers) in one step
    assert results[0]["reduced"] == results[1]["reduced"] == 4 * 4 * 6
    assert plan.tensor_parallel_gate_bytes_per_step == results[0]["reduced"] * 4 * 2 * (2 - 1) // 2

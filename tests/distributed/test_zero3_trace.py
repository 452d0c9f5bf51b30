"""After FoLoRA's calibration forwards, a ZeRO-3 engine's training steps gather exactly the parameters a plain
engine's do: the coordinator's trace and cached release decisions of those forwards are forgotten
(``adapters/zero3_trace.py``). Without that, every step re-gathers in the backward what the forward released
(DeepSpeed 0.19.8: the release decisions are cached per trace position and never cleared) — the ZeRO-3 gap of
docs/benchmarks.md. Counts, not times: the number of parameters each step gathers is deterministic."""

from __future__ import annotations

import pytest
import torch

from folora_ds.adapters import zero3_trace
from tests.testing.ranks import (
    ADAMW,
    calibration_shards,
    ds_config,
    micro_batch,
    micro_step,
    partitioned_tiny_model,
    run_ranks,
)

STEPS = 5


def _gathers_per_step(engine, controller, rank: int, world: int) -> list[int]:
    """Parameters gathered (NOT_AVAILABLE → all-gather) in each of STEPS training steps on this rank."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    name = "_PartitionedParameterCoordinator__all_gather_params_"
    original = getattr(PartitionedParameterCoordinator, name)
    counted = [0]

    def counting(self, params, forward, quantize=False):
        counted[0] += sum(1 for param in params if param.ds_status == ZeroParamStatus.NOT_AVAILABLE)
        return original(self, params, forward, quantize)

    setattr(PartitionedParameterCoordinator, name, counting)
    try:
        counts = []
        engine.train()
        for step in range(STEPS):
            counted[0] = 0
            data = micro_batch(step, rank)
            if controller is None:
                engine.backward(engine(**data).loss)
                engine.step()
            else:
                micro_step(engine, controller, data)
            counts.append(counted[0])
        return counts
    finally:
        setattr(PartitionedParameterCoordinator, name, original)


def _both_engines(rank: int, world: int, forget: bool) -> dict:
    import deepspeed

    import folora_ds

    if not forget:  # as before the fix: the calibration's trace and release decisions stay
        zero3_trace.forget_parameter_trace = lambda engine: False
        folora_ds.adapters.engine.forget_parameter_trace = zero3_trace.forget_parameter_trace
    config = ds_config(3, zero={"stage3_param_persistence_threshold": 0}, folora={"refresh_interval": 0})
    plain_model = partitioned_tiny_model(config)
    plain, *_ = deepspeed.initialize(
        model=plain_model, config={key: value for key, value in config.items() if key not in ("folora", "optimizer")},
        optimizer=torch.optim.AdamW([p for p in plain_model.parameters() if p.requires_grad], lr=ADAMW["lr"]))
    plain_counts = _gathers_per_step(plain, None, rank, world)
    engine, controller = folora_ds.initialize(partitioned_tiny_model(config), config,
                                              **calibration_shards(rank, world))
    folora_counts = _gathers_per_step(engine, controller, rank, world)
    controller.check_gating()
    return {"plain": plain_counts, "folora": folora_counts}


@pytest.mark.parametrize("forget", [True, False], ids=["forgotten", "kept (DeepSpeed's behaviour)"])
def test_zero3_steps_after_calibration_gather_what_a_plain_engine_gathers(forget):
    for result in run_ranks(2, _both_engines, forget):
        plain, folora = result["plain"], result["folora"]
        assert plain[1:] == [plain[1]] * (STEPS - 1) and plain[1] > 0  # steady after the recording step
        if forget:
            assert folora[1:] == plain[1:], result
        else:  # the calibration's decisions make every step gather more: what the fix removes
            assert all(count > plain[1] for count in folora[2:]), result


def test_other_stages_have_no_trace_to_forget():
    class Engine:
        def zero_optimization_stage(self):
            return 2

    assert zero3_trace.forget_parameter_trace(Engine()) is False


def test_a_deepspeed_without_the_internals_is_named_in_a_warning(caplog, monkeypatch):
    import logging

    class Coordinator:
        pass

    class Offload:
        def get_param_coordinator(self):
            return Coordinator()

    class Optimizer:
        parameter_offload = Offload()

    class Engine:
        optimizer = Optimizer()

        def zero_optimization_stage(self):
            return 3

    monkeypatch.setattr(logging.getLogger("folora_ds"), "propagate", True)
    with caplog.at_level(logging.WARNING):
        assert zero3_trace.forget_parameter_trace(Engine()) is False
    assert "parameter trace could not be reset" in caplog.text

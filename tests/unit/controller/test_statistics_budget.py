"""``statistics_flops_share``: after calibration the controller fits the training statistics into that share of
the step's flops, counts the training forwards by the fitted schedule, and a resume keeps it (issue 26, item 3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from folora_ds.controller import FoLoRAController
from folora_ds.controller.calibration import TokenTally, linear_parameters, model_itemsize
from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.statistics_cost import StatisticsSchedule, StepShape, schedule_within_share
from tests.testing.controller import tiny_peft_llama, token_batches


def _calibrated(config: FoLoRAConfig, seed: int = 0) -> tuple[nn.Module, FoLoRAController]:
    model = tiny_peft_llama(seed)
    controller = FoLoRAController(model, config)
    controller.calibrate(token_batches(3, 1), token_batches(3, 2))
    return model, controller


def test_linear_parameters_count_every_linear_weight_once_and_no_embedding():
    model = tiny_peft_llama()
    expected = sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear))
    assert linear_parameters(model) == expected  # base layers, LoRA A/B and the LM head; peft's wrappers not again
    embedding = model.get_input_embeddings().weight.numel()
    assert linear_parameters(model) < sum(p.numel() for p in model.parameters()) - embedding + 1


def test_the_tally_counts_tokens_computed_and_tokens_counted():
    batches = token_batches(2, 0)  # 4 x 12 each, one row padded after 9, a 3-token prompt without labels
    labelled = TokenTally(iter(batches), labels=True)
    assert list(labelled) == batches
    assert (labelled.micro_batches, labelled.tokens, labelled.counted_tokens) == (2, 96, 2 * (48 - 3 - 12))
    attention = TokenTally(iter(batches), labels=False)
    list(attention)
    assert attention.counted_tokens == 2 * (48 - 3)


def test_without_a_share_the_configured_schedule_is_used():
    _, controller = _calibrated(FoLoRAConfig(k=4, statistics_tokens=8, statistics_every=2))
    assert controller.statistics_schedule == StatisticsSchedule(8, 2)


def test_a_share_lowers_the_schedule_to_what_the_calibration_batches_allow_and_training_counts_by_it():
    config = FoLoRAConfig(k=4, statistics_tokens=64, statistics_flops_share=0.05, refresh_interval=0)
    model, controller = _calibrated(config)
    shape = StepShape(tokens=48, counted_tokens=33, input_widths=tuple(controller.dims.values()),
                      linear_parameters=linear_parameters(model))
    expected = schedule_within_share(0.05, StatisticsSchedule(64, 1), shape)
    assert controller.statistics_schedule == expected
    assert expected == StatisticsSchedule(16, 2)  # below the token floor: one micro-batch in two
    for batch in token_batches(6, 3):  # forwards 1, 3 and 5 count, 16 tokens per input each
        with controller.track_task(batch), torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert {int(sums.tokens) for sums in controller.collector.sums("task").values()} == {3 * 16}


def test_a_statistics_flop_is_weighed_by_its_cost_in_model_flops():
    """``statistics_flop_cost`` (measured, say, on a GPU) tightens the fit; by default it follows the dtype the
    model's linear layers compute in against the statistics' float32."""
    config = FoLoRAConfig(k=4, statistics_tokens=64, statistics_flops_share=0.2, statistics_flop_cost=4.0,
                          refresh_interval=0)
    model, controller = _calibrated(config)
    shape = StepShape(tokens=48, counted_tokens=33, input_widths=tuple(controller.dims.values()),
                      linear_parameters=linear_parameters(model), flop_cost=4.0)
    assert controller.statistics_schedule == schedule_within_share(0.2, StatisticsSchedule(64, 1), shape)
    unweighted = schedule_within_share(0.2, StatisticsSchedule(64, 1), StepShape(**{**shape.__dict__,
                                                                                   "flop_cost": 1.0}))
    assert controller.statistics_schedule != unweighted
    assert model_itemsize(model) == 4 and model_itemsize(tiny_peft_llama().to(torch.bfloat16)) == 2
    mixed = tiny_peft_llama().to(torch.bfloat16)
    for name, parameter in mixed.named_parameters():  # float32 LoRA factors beside bf16 base weights, as DeepSpeed
        if "lora_" in name:                          # keeps them under bf16: the base weights decide
            parameter.data = parameter.data.float()
    assert model_itemsize(mixed) == 2


def test_the_fitted_schedule_survives_a_resume_without_calibration():
    config = FoLoRAConfig(k=4, statistics_flops_share=0.05, refresh_interval=0)
    _, controller = _calibrated(config)
    controller.solve()
    state = controller.state_dict()
    resumed = FoLoRAController(tiny_peft_llama(), config)
    assert resumed.statistics_schedule == StatisticsSchedule(64, 1)  # the configured one until the state arrives
    resumed.load_state_dict(state)
    assert resumed.statistics_schedule == controller.statistics_schedule != StatisticsSchedule(64, 1)


@pytest.mark.parametrize("share", [0.0, 2.0, "0.02"])
def test_a_bad_share_is_refused_by_the_config(share):
    with pytest.raises(ValueError, match="statistics_flops_share"):
        FoLoRAConfig(statistics_flops_share=share)

"""The calibration forwards in one process: the labels check names its fix, the discovery forward counts nothing,
the statistics forwards count every masked-in token and leave the model's training mode as they found it, and a
training forward's labels check is collective only on the first forward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from folora_ds.controller import calibration
from folora_ds.distributed.statistics import DistributedStatisticsError
from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.covariance import CovarianceCollector
from folora_ds.training.models import build_tiny_llama
from tests.testing.controller import tiny_peft_llama, token_batches


def test_a_batch_without_labels_is_refused_naming_its_keys_and_the_attention_mask_as_the_fix():
    batch = token_batches(1, 3, labels=False)[0]
    problem = calibration.labels_problem(batch, "training")
    assert problem is not None
    assert "a training batch has no 'labels'" in problem
    assert "(keys: attention_mask, input_ids)" in problem
    assert "task_token_mask='attention'" in problem


@pytest.mark.parametrize("shape", [(4,), (4, 11)], ids=["one per sequence", "shifted by one token"])
def test_labels_of_another_shape_than_the_input_ids_are_refused_naming_both_shapes(shape):
    batch = token_batches(1, 3)[0]
    batch["labels"] = torch.zeros(shape, dtype=torch.long)
    problem = calibration.labels_problem(batch, "task calibration")
    assert problem is not None
    assert f"task calibration batch has labels {shape} for input_ids (4, 12)" in problem
    assert "task_token_mask='attention'" in problem


def test_one_label_per_token_passes_the_check_even_when_every_label_is_ignored():
    """A batch whose labels are all -100 is well formed: an input left with no counted token is reported later,
    by name (``owned_covariances``), not here."""
    batch = token_batches(1, 3)[0]
    assert calibration.labels_problem(batch, "training") is None
    batch["labels"] = torch.full_like(batch["input_ids"], -100)
    assert calibration.labels_problem(batch, "training") is None


def test_the_discovery_forward_names_every_input_with_its_width_and_counts_nothing():
    model = tiny_peft_llama()
    model.train()
    collector = CovarianceCollector(model)
    calibration.discover_inputs(model, collector, token_batches(1, 1)[0], torch.device("cpu"))
    # 2 blocks × (attention-in, o-in, mlp-in: width 32; down-in: width 48)
    assert sorted(collector.input_dims().values()) == [32] * 6 + [48] * 2
    assert collector.sums("pre") == {} and collector.sums("task") == {}
    assert model.training, "the discovery forward must leave the model in training mode"


def test_statistics_forwards_count_every_real_token_or_only_the_labelled_ones_and_return_the_batch_count():
    model = tiny_peft_llama()
    model.train()
    collector = CovarianceCollector(model)
    batches = token_batches(3, 2)  # 4 × 12 tokens each, 3 of them padding, 3 more per row without a label
    count = calibration.run_forwards(model, collector, "pre", iter(batches), labels=False, device=torch.device("cpu"))
    assert count == 3
    assert {int(sums.tokens) for sums in collector.sums("pre").values()} == {3 * (48 - 3)}
    calibration.run_forwards(model, collector, "task", iter(batches), labels=True, device=torch.device("cpu"))
    assert {int(sums.tokens) for sums in collector.sums("task").values()} == {3 * (48 - 3 - 4 * 3)}
    assert model.training, "the statistics forwards must leave the model in training mode"


def test_statistics_forwards_skip_the_lm_head_and_count_the_same_rows(monkeypatch):
    """The statistics forwards ask for one position's logits (``logits_to_keep=1``): the LM head sees one row per
    sequence, and the statistics are those of the full forward."""
    model = tiny_peft_llama()
    assert calibration.statistics_forward_arguments(model) == {"logits_to_keep": 1}
    head_rows = []
    hook = model.get_base_model().get_output_embeddings().register_forward_hook(
        lambda module, args, output: head_rows.append(args[0].shape[1]))
    batches = token_batches(2, 2)
    skipped = CovarianceCollector(model)
    calibration.run_forwards(model, skipped, "pre", iter(batches), labels=False, device=torch.device("cpu"))
    assert head_rows == [1, 1]
    monkeypatch.setattr(calibration, "statistics_forward_arguments", lambda model: {})
    full = CovarianceCollector(model)
    calibration.run_forwards(model, full, "pre", iter(batches), labels=False, device=torch.device("cpu"))
    hook.remove()
    assert head_rows == [1, 1, 12, 12]
    for key, sums in skipped.sums("pre").items():
        torch.testing.assert_close(sums.sum, full.sums("pre")[key].sum, rtol=1e-6, atol=1e-6)
    base = build_tiny_llama(64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    with_lora_head = get_peft_model(base, LoraConfig(r=3, target_modules=["q_proj", "lm_head"]))
    assert calibration.statistics_forward_arguments(with_lora_head) == {}  # LoRA on the head needs every row


def test_a_refused_calibration_batch_raises_on_every_rank_and_restores_training_mode():
    model = tiny_peft_llama()
    model.train()
    collector = CovarianceCollector(model)
    with pytest.raises(DistributedStatisticsError, match="task calibration batch has no 'labels'"):
        calibration.run_forwards(model, collector, "task", iter(token_batches(2, 2, labels=False)), labels=True,
                                 device=torch.device("cpu"))
    assert model.training, "a refused batch must not leave the model in eval mode"
    assert collector.sums("task") == {}, "the refused batch must not be counted"


def test_a_training_batch_is_checked_collectively_only_on_the_first_forward(monkeypatch):
    """The labels check of every later forward is local: a collective per micro-batch would cost every step."""
    model = tiny_peft_llama()
    collector = CovarianceCollector(model)
    config = FoLoRAConfig(statistics_every=2)
    collective_checks = []
    monkeypatch.setattr(calibration, "raise_if_any", lambda problem, group=None: collective_checks.append(problem))
    for forward, batch in enumerate(token_batches(3, 4), start=1):
        with calibration.training_forward(collector, batch, config, forward=forward):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert collective_checks == [None]
    with pytest.raises(ValueError, match="training batch has no 'labels'") as refused:
        with calibration.training_forward(collector, token_batches(1, 5, labels=False)[0], config, forward=4):
            pass
    assert type(refused.value) is ValueError, "a later forward's check must not be the collective one"
    # statistics_every = 2: forwards 1 and 3 counted, 4 × 12 − 3 padding − 4 × 3 prompt tokens each
    assert {int(sums.tokens) for sums in collector.sums("task").values()} == {2 * (48 - 3 - 4 * 3)}

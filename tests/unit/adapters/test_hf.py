"""FoLoRA trainers in one process (no DeepSpeed) and their refusals; the DeepSpeed equivalence at ZeRO-2/3 with
Trainer and TRL's SFTTrainer is tests/distributed/test_hf_trainer.py."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import TrainingArguments, default_data_collator

from folora_ds.adapters.hf import FoLoRATrainer, folora_trainer_class
from tests.testing.ranks import FOLORA, batch, proxy_batch, tiny_model


def _dataset(rows: int = 24) -> datasets.Dataset:
    records = []
    for index in range(rows // 2):
        data = batch(500 + index)
        records += [{"input_ids": data["input_ids"][i].tolist(), "attention_mask": [1] * 10,
                     "labels": data["input_ids"][i].tolist()} for i in range(2)]
    return datasets.Dataset.from_list(records)


def _args(tmp_path, **overrides) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=6, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             remove_unused_columns=False, **overrides)


def test_one_process_trainer_gates_every_step_refreshes_and_logs(tmp_path):
    trainer = FoLoRATrainer(model=tiny_model(), args=_args(tmp_path, logging_steps=1), train_dataset=_dataset(),
                            data_collator=default_data_collator, folora={**FOLORA, "refresh_interval": 3},
                            proxy_batches=[proxy_batch(i) for i in range(4)], calibration_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n}
    trainer.train()
    controller = trainer.folora_controller
    # the refresh at 3 gates steps 4-6; the one at 6, the run's last step, would gate nothing: only its values log
    assert set(controller.gated_step_counts()) == {6} and controller.refreshes == 1
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    logged = [entry for entry in trainer.state.log_history if "folora/relative_forgetting" in entry]
    # calibration's values join the first log (step 1), each refresh's the log of its step; no extra log entries
    assert [(entry["step"], entry["folora/optimizer_steps"]) for entry in logged] == [(1, 0), (3, 3), (6, 6)]
    assert all("loss" in entry for entry in logged)
    assert logged[0]["folora/relative_forgetting"] == 0.0 and logged[-1]["folora/relative_forgetting"] > 0
    assert type(trainer.optimizer).__name__ != "AdamW"
    assert (tmp_path / "folora_gates.png").read_bytes()[:4] == b"\x89PNG"


def test_folora_trainer_class_mixes_into_any_trainer_subclass():
    from transformers import Trainer

    class Custom(Trainer):
        pass

    made = folora_trainer_class(Custom)
    assert issubclass(made, Custom) and made is folora_trainer_class(Custom) and made.__name__ == "FoLoRACustom"


@pytest.mark.parametrize("change, match", [
    ({"optimizers": (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), None)}, "optimizers="),
    ({"calibration_steps": 0}, "calibration_steps"),
    ({"folora": {"tua": 1.0}}, "tua"),
])
def test_refusals_name_the_problem(change, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        FoLoRATrainer(model=tiny_model(), args=_args(tmp_path), train_dataset=_dataset(),
                      data_collator=default_data_collator, **{"folora": FOLORA, **change})


def test_a_training_step_before_calibration_is_refused(tmp_path):
    trainer = FoLoRATrainer(model=tiny_model(), args=_args(tmp_path), train_dataset=_dataset(),
                            data_collator=default_data_collator, folora=FOLORA)
    with pytest.raises(RuntimeError, match="before calibration"):
        trainer.training_step(trainer.model, {k: torch.tensor(v) for k, v in _dataset()[:2].items()})


@pytest.mark.parametrize("block, match", [("optimizer", "\"optimizer\" block"), ("folora", "folora="),
                                          ("offload_param", "offload_param")])
def test_deepspeed_configs_that_would_skip_the_gate_are_refused(block, match, tmp_path):
    extra = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, "folora": FOLORA}.get(block)
    zero = {"stage": 3, "offload_param": {"device": "cpu"}} if block == "offload_param" else {"stage": 2}
    args = _args(tmp_path, deepspeed={"train_micro_batch_size_per_gpu": "auto", "zero_optimization": zero,
                                      **({block: extra} if extra is not None else {})})
    with pytest.raises(ValueError, match=match):
        FoLoRATrainer(model=tiny_model(), args=args, train_dataset=_dataset(), data_collator=default_data_collator,
                      folora=FOLORA)


def test_resuming_from_a_trainer_checkpoint_is_refused(tmp_path):
    trainer = FoLoRATrainer(model=tiny_model(), args=_args(tmp_path), train_dataset=_dataset(),
                            data_collator=default_data_collator, folora=FOLORA)
    with pytest.raises(ValueError, match="not supported yet"):
        trainer.train(resume_from_checkpoint=str(tmp_path))


def test_optimizer_offload_keeps_gated_adamw(tmp_path):
    """accelerate would swap in DeepSpeedCPUAdam under offload unless zero_force_ds_cpu_optimizer is false."""
    args = _args(tmp_path, deepspeed={"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu"}}})
    FoLoRATrainer(model=tiny_model(), args=args, train_dataset=_dataset(), data_collator=default_data_collator,
                  folora=FOLORA)
    assert args.hf_deepspeed_config.config["zero_force_ds_cpu_optimizer"] is False

"""FoLoRA inside transformers.Trainer with a DeepSpeed config, on 2 gloo ranks: the result equals
``folora_ds.initialize``'s own loop on the same micro-batches in the same order (weights within 1e-6), every
optimizer step was gated, refreshes ran at step boundaries, and the adapter saved the Trainer way loads with peft."""

from __future__ import annotations

import pytest
import torch

from tests.testing.ranks import (
    ADAMW,
    CLIP,
    FOLORA,
    STEPS,
    batch,
    calibration_shards,
    full_weights,
    micro_step,
    run_ranks,
    tiny_model,
)

ACCUMULATION = 2
MICRO = 2  # sequences per micro-batch


def _micro_batch(step: int, slot: int) -> dict[str, torch.Tensor]:
    """Unpadded, so the Trainer's token-weighted loss equals the mean over micro-batches of the own loop."""
    data = batch(20_000 + step * 16 + slot)
    return {"input_ids": data["input_ids"], "attention_mask": torch.ones_like(data["input_ids"]),
            "labels": data["input_ids"].clone()}


def _rows(world: int) -> list[dict]:
    """The dataset the Trainer reads sequentially: global micro-batch g = slot (a·world + r) of step s."""
    rows = []
    for step in range(STEPS):
        for slot in range(ACCUMULATION * world):
            data = _micro_batch(step, slot)
            rows += [{k: v[i].tolist() for k, v in data.items()} for i in range(MICRO)]
    return rows


def _own_loop(rank: int, world: int, stage: int) -> dict[str, torch.Tensor]:
    import folora_ds
    from folora_ds.distributed import comm

    model = tiny_model()
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUMULATION,
              "gradient_clipping": CLIP, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": ADAMW}, "folora": FOLORA}
    # calibration: this rank's first 8 optimizer steps' micro-batches, as the Trainer takes them
    first = [_micro_batch(s, a * world + rank) for s in range(min(8, STEPS)) for a in range(ACCUMULATION)]
    engine, controller = folora_ds.initialize(model, config, proxy_batches=calibration_shards(rank, world)[
        "proxy_batches"], task_batches=first)
    engine.train()
    for step in range(STEPS):
        for a in range(ACCUMULATION):
            micro_step(engine, controller, _micro_batch(step, a * world + rank))
    controller.check_gating()
    weights = full_weights(model, stage)
    engine.destroy()
    comm.barrier()
    return weights


def _trainer(rank: int, world: int, stage: int, output_dir: str, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    import datasets
    from transformers import TrainingArguments, default_data_collator

    from folora_ds.adapters.hf import FoLoRATrainer, folora_trainer_class

    model = tiny_model()
    extra, trainer_class = {}, FoLoRATrainer
    if kind == "sft":  # TRL's SFTTrainer on the same pre-tokenized rows and collator
        from trl import SFTConfig, SFTTrainer

        from folora_ds.training.models import build_byte_tokenizer

        arguments_class, trainer_class = SFTConfig, folora_trainer_class(SFTTrainer)
        extra = {"packing": False, "dataset_kwargs": {"skip_prepare_dataset": True},
                 "bf16": False, "gradient_checkpointing": False}  # SFTConfig turns both on by default
    else:
        arguments_class = TrainingArguments
    args = arguments_class(**extra,
        output_dir=output_dir, per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS, learning_rate=ADAMW["lr"], adam_beta1=ADAMW["betas"][0], adam_beta2=ADAMW["betas"][1],
        adam_epsilon=ADAMW["eps"], weight_decay=ADAMW["weight_decay"], max_grad_norm=CLIP,
        lr_scheduler_type="constant", train_sampling_strategy="sequential", report_to=[], save_strategy="no",
        logging_steps=1000, dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True, use_cpu=True,
        deepspeed={"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                   "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {
                       "stage": stage, **({"stage3_gather_16bit_weights_on_model_save": True} if stage == 3 else {})}})
    trainer = trainer_class(model=model, args=args, train_dataset=datasets.Dataset.from_list(_rows(world)),
                            data_collator=default_data_collator, folora=FOLORA,
                            proxy_batches=calibration_shards(rank, world)["proxy_batches"],
                            **({"processing_class": build_byte_tokenizer()} if kind == "sft" else {}))
    trainer.train()
    controller = trainer.folora_controller
    weights = full_weights(model, stage)
    engine = trainer.deepspeed
    info = {"gated": controller.gated_step_counts(), "steps": controller.optimizer_steps,
            "refreshes": controller.refreshes, "engine": type(engine).__name__,
            "stage": None if engine is None else engine.zero_optimization_stage(),
            "partitions": len(controller.layouts)}
    trainer.save_model(output_dir)
    return weights, info


def _both(rank: int, world: int, stage: int, output_dir: str, kind: str) -> dict:
    reference = _own_loop(rank, world, stage)
    weights, info = _trainer(rank, world, stage, output_dir, kind)
    return {"reference": reference, "trainer": weights, **info}


@pytest.mark.parametrize("kind", ["trainer", "sft"])
@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_equals_the_own_loop(stage, kind, tmp_path):
    from peft import PeftModel

    from tests.testing.ranks import base_model

    if kind == "sft":
        pytest.importorskip("trl")
    results = run_ranks(2, _both, stage, str(tmp_path), kind)
    for rank, result in enumerate(results):
        assert result["steps"] == STEPS and set(result["gated"]) == {STEPS}, (rank, result["gated"])
        assert result["refreshes"] == STEPS // FOLORA["refresh_interval"]
        assert result["engine"] == "DeepSpeedEngine" and result["stage"] == stage, "the Trainer ran under DeepSpeed"
        assert result["partitions"] >= 1, "the gate ran on DeepSpeed's ZeRO partitions"
        for name, expected in result["reference"].items():
            torch.testing.assert_close(result["trainer"][name], expected, rtol=0, atol=1e-6,
                                       msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")
    # the adapter the Trainer saved is a plain peft adapter with the trained weights
    loaded = PeftModel.from_pretrained(base_model(), str(tmp_path))
    trained = results[0]["trainer"]
    for name, param in loaded.named_parameters():
        if "lora_" in name:
            key = next(k for k in trained if k.replace(".default", "") == name.replace(".default", ""))
            torch.testing.assert_close(param.detach(), trained[key], rtol=0, atol=1e-6)

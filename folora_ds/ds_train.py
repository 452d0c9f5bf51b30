"""FoLoRA training under the DeepSpeed engine, one process per rank (``deepspeed``/``torchrun``/``mpirun``).

    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero2.json --steps 40
    torchrun --nproc_per_node 2 launch/train.py --deepspeed ds_configs/zero2.json --steps 40

Each rank samples its shard of the proxy set (or reads its shard of ``proxy.path``), calibrates on its shard of
the first task batches, and trains on its micro-batches of the same global batch order a single process would
use. Rank 0 writes the peft adapter and ``summary.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from folora_ds.config import FoLoRAConfig
from folora_ds.data import TaskCollator, build_task_dataset, split_train_eval
from folora_ds.distributed import comm
from folora_ds.engine import initialize, load_ds_config, proxy_batches_for_this_rank
from folora_ds.models import load_model
from folora_ds.run import RunSettings, batch_order, iterate_batches


def run_deepspeed(settings: RunSettings, ds_config_path: str, *,
                  collective_timeout_seconds: float = 600.0) -> dict | None:
    """Train FoLoRA with DeepSpeed on every rank; returns the summary on rank 0 (None elsewhere).

    ``collective_timeout_seconds`` bounds every collective: a dead or hung rank stops the others with an error.
    """
    started = time.perf_counter()
    ds_config = load_ds_config(ds_config_path)
    folora = FoLoRAConfig.from_deepspeed_config(ds_config)  # validated before the process group starts
    comm.init_distributed(timeout_seconds=collective_timeout_seconds)
    rank, world = comm.rank(), comm.world_size()
    micro = int(ds_config.get("train_micro_batch_size_per_gpu", settings.batch_size))
    accumulation = int(ds_config.get("gradient_accumulation_steps", 1))
    ds_config.pop("train_batch_size", None)
    ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"] = micro, accumulation

    model, tokenizer = load_model(settings.model, seed=settings.seed)
    dataset = build_task_dataset(settings.data, tokenizer, max_length=folora.max_seq_len)
    train_set, _ = split_train_eval(dataset, eval_fraction=settings.eval_fraction, seed=settings.seed)
    collate = TaskCollator(pad_token_id=tokenizer.pad_token_id)
    proxy = proxy_batches_for_this_rank(model, tokenizer, folora, max_length=folora.max_seq_len,
                                        progress=settings.progress and rank == 0)  # from the base model, before LoRA
    torch.manual_seed(settings.seed)
    targets = folora.target_modules if isinstance(folora.target_modules, str) else list(folora.target_modules)
    model = get_peft_model(model, LoraConfig(r=folora.lora_rank, lora_alpha=folora.lora_alpha,
                                             lora_dropout=folora.lora_dropout, target_modules=targets))

    global_batch = micro * accumulation * world
    order = batch_order(len(train_set), global_batch, settings.steps, settings.seed)

    def my_micro_batches(step_indices: list[int]) -> list[list[int]]:
        return [step_indices[(m * world + rank) * micro:(m * world + rank + 1) * micro] for m in range(accumulation)]

    calibration = [batch for step in order[:settings.calibration_batches] for batch in my_micro_batches(step)]
    engine, controller = initialize(
        model, ds_config, proxy_batches=proxy,
        task_batches=list(iterate_batches(train_set, calibration, collate)), progress=settings.progress and rank == 0)
    engine.train()
    losses = []
    for step_indices in tqdm(order, desc=f"FoLoRA ZeRO-{engine.zero_optimization_stage()} ×{world}",
                             disable=not (settings.progress and rank == 0)):
        step_loss = 0.0
        for batch in iterate_batches(train_set, my_micro_batches(step_indices), collate):
            with controller.track_task(batch):
                loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            controller.after_engine_step()
            step_loss += float(loss.detach()) / accumulation
        losses.append(step_loss)
    controller.check_gating()
    counts = comm.all_gather_objects(controller.gated_step_counts())
    summary = None
    output_dir = Path(settings.output_dir)
    controller.export_adapter(output_dir / "folora_adapter")
    if rank == 0:
        summary = {"settings": asdict(settings), "folora_config": folora.to_dict(), "world_size": world,
                   "zero_stage": engine.zero_optimization_stage(), "optimizer_steps": controller.optimizer_steps,
                   "gated_steps_per_rank": counts, "refreshes": controller.refreshes, "train_losses": losses,
                   "tau_scale": None if controller.budget is None else controller.budget.tau_scale,
                   "seconds": time.perf_counter() - started}
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"FoLoRA under DeepSpeed ZeRO-{summary['zero_stage']} on {world} ranks: {controller.optimizer_steps} "
              f"optimizer steps, gated steps per rank {[sorted(set(c)) for c in counts]}, refreshes "
              f"{controller.refreshes}, train loss {losses[0]:.4f} → {losses[-1]:.4f}")
        print(f"adapter: {output_dir / 'folora_adapter'}  summary: {output_dir / 'summary.json'}")
    return summary

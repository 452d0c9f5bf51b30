"""Shared pieces of the multi-rank tests: gloo ranks on localhost, the tiny model and data, DeepSpeed configs, the
training loop and full-weight gathering.

Shapes: one block, LoRA r = 5 (odd) on inputs of width 24 and 40, 7 LoRA-A weights (920 elements), so ZeRO
partitions cut LoRA-A rows with 2 and 3 ranks (see test_equivalence.py).
"""

from __future__ import annotations

import datetime
import importlib
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
from peft import LoraConfig, get_peft_model

from folora_ds.models import build_tiny_llama

STEPS = 10
CLIP = 1.0
MICRO_BATCHES_PER_STEP = 6
FOLORA = {"lora_rank": 5, "lora_alpha": 10, "k": 5, "refresh_interval": 4, "ema_decay": 0.5, "tau": 1.0,
          "statistics_dtype": "float64", "statistics_tokens": None}  # exact statistics: every token counts
ADAMW = {"lr": 1e-2, "betas": [0.9, 0.99], "eps": 1e-3, "weight_decay": 0.01}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 64


# ---------------------------------------------------------------------- ranks
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup_rank(rank: int, world: int, port: int, timeout_seconds: float = 90) -> None:
    """Make this process rank ``rank`` of a gloo group on localhost (one thread; DeepSpeed's CPU op build skipped)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # skip a 55 s JIT build
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=timeout_seconds))


def _entry(rank: int, world: int, port: int, function, args: tuple, out_dir: str) -> None:
    setup_rank(rank, world, port)
    import deepspeed.comm as dist

    try:
        result = function(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    # Results are on disk. Skip interpreter teardown: destroying a live ZeRO-3 engine and gloo's threads at exit
    # aborted a rank once in CI ("terminate called without an active exception") after the work was done.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(world: int, function, *args) -> list:
    """Run ``function(rank, world, *args)`` on ``world`` processes; returns each rank's result (rank order)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world, free_port(), function, args, out_dir), nprocs=world, join=True)
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


# ---------------------------------------------------------------------- model and data
def base_model(num_layers: int = 1, seed: int = 3):
    return build_tiny_llama(VOCAB, hidden_size=24, intermediate_size=40, num_layers=num_layers, num_heads=4,
                            num_kv_heads=2, seed=seed)


def tiny_model(lora_rank: int = FOLORA["lora_rank"], targets: list[str] = TARGETS, *, num_layers: int = 1,
               seed: int = 3):
    """The peft model every test trains (LoRA init seeded, so every rank and the reference start equal)."""
    base = base_model(num_layers, seed)
    torch.manual_seed(0)
    return get_peft_model(base, LoraConfig(r=lora_rank, lora_alpha=FOLORA["lora_alpha"], target_modules=targets))


def batch(seed: int, tokens: int = VOCAB) -> dict[str, torch.Tensor]:
    """Two sequences of 10 random ids out of the first ``tokens`` of the vocabulary (one sequence padded)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tokens, (2, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[seed % 2, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def proxy_batch(index: int) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch(1000 + index).items() if k != "labels"}


def micro_batch(step: int, index: int, tokens: int = VOCAB) -> dict[str, torch.Tensor]:
    """Micro-batch ``index`` (of MICRO_BATCHES_PER_STEP) of optimizer step ``step``."""
    return batch(10_000 + step * MICRO_BATCHES_PER_STEP + index, tokens)


def calibration_shards(rank: int, world: int, count: int = 6, tokens: int = VOCAB) -> dict[str, list]:
    """This rank's share of ``count`` proxy and task calibration batches (``initialize`` keyword arguments); the
    task batches use the first ``tokens`` ids of the vocabulary."""
    return {"proxy_batches": [proxy_batch(i) for i in range(count) if i % world == rank],
            "task_batches": [batch(i, tokens) for i in range(count) if i % world == rank]}


# ---------------------------------------------------------------------- DeepSpeed
def ds_config(stage: int, *, accumulation: int = 1, zero: dict | None = None, folora: dict | None = None,
              adamw: dict | None = None, clip: float | None = None, **extra) -> dict:
    """A DeepSpeed config of micro-batch 2 with FOLORA and ADAMW (plus overrides) at ZeRO ``stage``."""
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": accumulation,
              "zero_optimization": {"stage": stage, **(zero or {})},
              "optimizer": {"type": "AdamW", "params": {**ADAMW, **(adamw or {})}},
              "folora": {**FOLORA, **(folora or {})}, **extra}
    if clip is not None:
        config["gradient_clipping"] = clip
    return config


def train_steps(engine, controller, rank: int, world: int, first: int, last: int, accumulation: int,
                tokens: int = VOCAB) -> None:
    """Optimizer steps ``first``..``last`` − 1: rank r takes micro-batch slots m·world + r of each step."""
    engine.train()
    for step in range(first, last):
        for micro in range(accumulation):
            data = micro_batch(step, micro * world + rank, tokens)
            with controller.track_task(data):
                loss = engine(**data).loss
            engine.backward(loss)
            engine.step()
            controller.after_step()


def full_weights(model, stage: int) -> dict[str, torch.Tensor]:
    """Every trainable weight, whole (fp32 master copies gathered from the ZeRO partitions; a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: (safe_get_full_fp32_param(param) if stage > 0 else param.detach()).clone()
            for name, param in model.named_parameters() if param.requires_grad}


def budget_values(controller) -> dict[str, torch.Tensor]:
    """τ's factor and the last measured F of a run with a forgetting budget (empty without one)."""
    if controller.budget is None:
        return {}
    return {"tau_scale": torch.tensor(controller.budget.tau_scale, dtype=torch.float64),
            "last_measured": torch.tensor(controller.budget.last_measured, dtype=torch.float64)}

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

from folora_ds.controller import FoLoRAController
from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.gated_adamw import GatedAdamW, folora_param_groups
from folora_ds.training.models import build_tiny_llama

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
    """Run ``function(rank, world, *args)`` on ``world`` processes; returns each rank's result (rank order).

    The ranks are forked from the test process, so torch, DeepSpeed and the test's modules are already imported
    (a spawned rank spent ~4 s importing them, most of a small test's time); each rank sets one thread before its
    first torch operation (``setup_rank``) and starts its own process group."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world, free_port(), function, args, out_dir), nprocs=world, join=True,
                           start_method="fork")
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


def partitioned_tiny_model(config: dict, num_layers: int = 1):
    """``tiny_model(num_layers=...)``'s weights, built under ``zero.Init`` and loaded the way transformers does under
    ZeRO-3 (rank 0 writes each gathered parameter, which is partitioned again on exit)."""
    import deepspeed
    from transformers import LlamaForCausalLM

    replicated = base_model(num_layers)
    state = replicated.state_dict()
    with deepspeed.zero.Init(config_dict_or_path={key: value for key, value in config.items() if key != "folora"}):
        model = LlamaForCausalLM(replicated.config)
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            if torch.distributed.get_rank() == 0:
                param.copy_(state[name])
    torch.manual_seed(0)  # the LoRA init of tiny_model()
    return get_peft_model(model, LoraConfig(r=FOLORA["lora_rank"], lora_alpha=FOLORA["lora_alpha"],
                                            target_modules=TARGETS))


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
            micro_step(engine, controller, micro_batch(step, micro * world + rank, tokens))


def micro_step(engine, controller, data: dict[str, torch.Tensor]) -> None:
    """One micro-batch through the engine with C_task tracked; ``after_step`` counts an optimizer step only at an
    accumulation boundary."""
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


def single_process_reference(folora_overrides: dict | None = None, adamw_overrides: dict | None = None,
                             tokens: int = VOCAB, num_layers: int = 1) -> dict[str, torch.Tensor]:
    """The same controller in one plain process (world size 1, no process group, no DeepSpeed)."""
    adamw = {**ADAMW, **(adamw_overrides or {})}
    model = tiny_model(num_layers=num_layers)
    controller = FoLoRAController(model, FoLoRAConfig(**{**FOLORA, **(folora_overrides or {})}))
    controller.calibrate([proxy_batch(i) for i in range(6)], [batch(i, tokens) for i in range(6)])
    controller.solve()
    controller.initialize_lora_a()
    optimizer = GatedAdamW(folora_param_groups(model, weight_decay=adamw["weight_decay"]), lr=adamw["lr"],
                           betas=tuple(adamw["betas"]), eps=adamw["eps"])
    controller.attach(optimizer)
    model.train()
    for step in range(STEPS):
        for index in range(MICRO_BATCHES_PER_STEP):
            data = micro_batch(step, index, tokens)
            with controller.track_task(data):
                loss = model(**data).loss / MICRO_BATCHES_PER_STEP
            loss.backward()
        if CLIP:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP)
        optimizer.step()
        optimizer.zero_grad()
        controller.after_step()
    controller.check_gating()
    assert set(optimizer.gated_step_counts().values()) == {STEPS}
    weights = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    return {**weights, **budget_values(controller), "summaries": controller.layer_summaries()}


def assert_matches_reference(results: list[dict], reference: dict, atol: float = 1e-6) -> None:
    """Every rank's result (``steps``, ``refreshes``, ``gated`` counts, ``weights``) equals the single-process
    ``reference``: weights to ``atol``, the budget's scalars to a relative 1e-6."""
    for rank, result in enumerate(results):
        assert result["steps"] == STEPS, f"rank {rank}"
        assert result["refreshes"] == STEPS // FOLORA["refresh_interval"]
        assert result["gated"] and set(result["gated"]) == {STEPS}, f"rank {rank}: gated steps {result['gated']}"
        for name, expected in reference.items():
            if name == "summaries":
                continue
            # τ's factor (~6) and F are scalars computed from float32 statistics summed in another order on every
            # world size: relative agreement to 1e-6, not absolute; weights stay at the absolute 1e-6
            budget_scalar = name in ("tau_scale", "last_measured")
            torch.testing.assert_close(result["weights"][name], expected, rtol=1e-6 if budget_scalar else 0,
                                       atol=0 if budget_scalar else atol,
                                       msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")

"""``folora_ds.initialize``: FoLoRA on a DeepSpeed engine (ZeRO 0, 1, 2, 3; fp32, and bf16 at ZeRO 1/2/3).

    engine, controller = folora_ds.initialize(peft_model, "ds_configs/zero2.json",
                                              proxy_batches=my_proxy_shard, task_batches=my_task_shard)
    for batch in loader:                         # this rank's micro-batches
        with controller.track_task(batch):       # C_task keeps being collected (rows go to the owners)
            loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        controller.after_step()                  # counts optimizer steps; refreshes every K of them
    controller.check_gating()                    # raises unless every optimizer step was gated on this rank

DeepSpeed first builds the engine around ``GatedAdamW`` (so a model built under ``deepspeed.zero.Init``, which no
rank holds whole, works as well as a replicated one). Every rank then runs its calibration shard through the
engine's module (ZeRO-3 gathers each layer as it runs); each input's token rows go to its owner rank, owners
solve, and the projected LoRA-A init is written into the engine's weights and optimizer partitions. The ZeRO
partitions are mapped (``distributed/zero_layout.py``) and each owner sends its projectors only to the ranks
holding rows they gate.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from folora_ds.adapters.checkpoint import check_deepspeed_files, load_engine_checkpoint, refuse_world_size_change
from folora_ds.adapters.ds_config import PreparedConfig, prepare_ds_config
from folora_ds.adapters.megatron.mpu import check_mpu
from folora_ds.adapters.zero3_trace import forget_parameter_trace
from folora_ds.controller import FoLoRAController
from folora_ds.controller.checkpoint import read_folora_state, resolve_tag
from folora_ds.controller.proxy import calibration_batches, proxy_samples_for_this_rank
from folora_ds.distributed import comm
from folora_ds.method.gated_adamw import GatedAdamW, folora_param_groups


def initialize(model: nn.Module, config: str | Path | Mapping[str, Any] | PreparedConfig, *, proxy_batches=None,
               task_batches=None, tokenizer=None, resume_from: str | Path | None = None, tag: str | None = None,
               lr_scheduler=None, mpu=None, progress: bool = False) -> tuple[Any, FoLoRAController]:
    """Build a DeepSpeed engine that trains ``model`` (a peft LoRA model) with FoLoRA's gated AdamW.

    Args:
        model: the same peft model on every rank (not yet wrapped by DeepSpeed; replicated, or built under
            ``deepspeed.zero.Init`` / ``HfDeepSpeedConfig`` for ZeRO-3).
        config: DeepSpeed config (JSON path, dict, or ``prepare_ds_config``'s result) with a ``"folora"`` block.
            An ``"optimizer"`` block may only be AdamW; its params (lr, betas, eps, weight_decay) go to GatedAdamW.
        proxy_batches: this rank's shard of proxy calibration batches (``input_ids``, ``attention_mask``). When
            None and ``tokenizer`` is given, they come from the ``"folora"`` block's ``proxy`` settings
            (``proxy_samples_for_this_rank``).
        task_batches: this rank's shard of task calibration batches (plus ``labels``).
        tokenizer: the model's tokenizer, needed only to sample or read the proxy set here.
        resume_from: a checkpoint directory written by ``controller.save_checkpoint``; calibration is skipped and
            weights, optimizer and FoLoRA state are restored (any world size for FoLoRA's own state).
        tag: checkpoint tag (``latest``, or ``latest_universal`` with ``checkpoint.load_universal``, when None).
        lr_scheduler: passed to ``deepspeed.initialize``.
        mpu: Megatron's model-parallel unit (``folora_ds.adapters.megatron.MegatronMpu()``), required when the
            model's LoRA layers are tensor-parallel; DeepSpeed then reduces and partitions over the data-parallel
            group, and each TP group's ranks share one calibration shard.

    Returns:
        ``(engine, controller)``.

    Raises:
        KeyError: no ``"folora"`` block. ValueError: an unsupported combination (before any work), a damaged or
        incompatible checkpoint (before DeepSpeed loads it). FileNotFoundError: a missing checkpoint or tag.
        DistributedStatisticsError: a rank without data, mismatched LoRA modules, bad statistics.
    """
    if resume_from is None and (task_batches is None or (proxy_batches is None and tokenizer is None)):
        raise ValueError("initialize needs task_batches and proxy_batches (or a tokenizer to sample the proxy set "
                         "with the config's proxy settings), or resume_from a checkpoint")
    if resume_from is not None and any(value is not None for value in (task_batches, proxy_batches, tokenizer)):
        raise ValueError("resume_from restores the statistics and bases from the checkpoint; task_batches, "
                         "proxy_batches and tokenizer would be ignored, so pass them only for a fresh start")
    if resume_from is None and tag is not None:
        raise ValueError(f"tag={tag!r} names a checkpoint to resume from; pass resume_from too")
    prepared = prepare_ds_config(config)
    universal = bool((prepared.ds_config.get("checkpoint") or {}).get("load_universal"))
    folder = None if resume_from is None else resolve_tag(resume_from, tag, universal=universal)
    comm.init_distributed()  # a no-op when the launcher's script already started the process group
    import deepspeed

    controller = FoLoRAController(model, prepared.folora)
    layout = controller.layout
    check_mpu(mpu, layout.tp_size)
    if folder is None and proxy_batches is None and layout.tp_size > 1 and prepared.folora.proxy.path is None:
        raise ValueError("a tensor-parallel model cannot sample its proxy set here (generation needs whole layers): "
                         "set proxy.path to a proxy set or a {\"text\": ...} corpus, or pass proxy_batches")
    if folder is None and proxy_batches is None:  # generation needs the whole model on each rank
        if any(hasattr(param, "ds_id") for param in model.parameters()) and prepared.folora.proxy.path is None:
            raise ValueError("the model is already partitioned (built under deepspeed.zero.Init), so this rank cannot "
                             "sample the proxy set from it: set proxy.path to a proxy set (folora-ds sample-proxy on "
                             "a node that holds the model, or a {\"text\": ...} corpus) or pass proxy_batches")
        samples = proxy_samples_for_this_rank(model, tokenizer, prepared.folora, replica=layout.dp_rank,
                                              replicas=layout.dp_size, progress=progress and comm.rank() == 0)
        proxy_batches = calibration_batches(samples, tokenizer, prepared.folora)
    state = None
    if folder is not None:  # FoLoRA's config and every file are checked before DeepSpeed touches the checkpoint
        state = read_folora_state(folder)  # memory-mapped: only the owned inputs are read, on loading
        controller.check_state(state)
        check_deepspeed_files(folder)
    arguments = dict(prepared.optimizer_arguments)
    optimizer = GatedAdamW(folora_param_groups(model, weight_decay=arguments.pop("weight_decay")), **arguments,
                           variant=prepared.folora.variant, cap_update_norm=prepared.folora.cap_update_norm)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=prepared.ds_config,
                                           lr_scheduler=lr_scheduler, mpu=mpu)
    client = engine.optimizer if engine.zero_optimization_stage() == 0 else engine.optimizer.optimizer
    if client is not optimizer:
        raise RuntimeError(f"DeepSpeed wrapped the optimizer in {type(engine.optimizer).__name__}; FoLoRA cannot "
                           "guarantee the gate runs inside it")
    if folder is None:  # calibration runs through the engine's module: ZeRO-3 gathers each layer as it runs
        controller.calibrate(proxy_batches, task_batches, progress=progress)
        forget_parameter_trace(engine)  # training records its own ZeRO-3 trace, not the calibration's forwards'
        controller.solve()
        controller.initialize_lora_a(engine)
    else:
        refuse_world_size_change(folder, engine.zero_optimization_stage(), engine.dp_world_size, universal)
        controller.load_state_dict(state)  # after the engine placed the model: the statistics follow it
        load_engine_checkpoint(engine, optimizer, folder)
    controller.attach(optimizer, engine)
    if folder is None:
        controller.log_metrics()  # the calibration's gates, at optimizer step 0, to the engine's monitor
    return engine, controller

"""FoLoRA inside Hugging Face ``transformers.Trainer`` and TRL's ``SFTTrainer`` (under DeepSpeed, or one process).

    from folora_ds.hf import FoLoRATrainer                      # a transformers.Trainer (public path)
    trainer = FoLoRATrainer(model=peft_model, args=TrainingArguments(..., deepspeed="ds_zero2.json"),
                            train_dataset=..., folora={"tau": 1.0, "proxy": {"num_sequences": 256}})
    trainer.train(); trainer.save_model("out")                  # a standard peft adapter

    from folora_ds.hf import folora_trainer_class               # any Trainer subclass, e.g. TRL's
    FoLoRASFTTrainer = folora_trainer_class(trl.SFTTrainer)

What the mixin changes, and why each is needed under DeepSpeed (transformers 5.x, DeepSpeed 0.19):

- **The optimizer** comes from ``create_optimizer`` (``GatedAdamW`` on ``folora_param_groups``, with the
  Trainer's lr, betas, eps and weight decay). An optimizer passed as ``optimizers=(opt, sched)`` would be replaced
  silently by DeepSpeed's, and a DeepSpeed config with an ``"optimizer"`` block makes transformers hand DeepSpeed a
  placeholder instead of calling ``create_optimizer`` — both are refused at construction, naming the fix.
- **Calibration at train begin** (``on_train_begin`` runs after DeepSpeed built the engine): every rank collects
  C_pre on its proxy batches and the initial C_task on its first ``calibration_steps`` optimizer steps of training
  batches (the same batches the run then trains on), owners solve, the projected LoRA-A init is written into the
  engine's weights and optimizer partitions, and the projectors are delivered — exactly ``folora_ds.initialize``'s
  sequence, so a Trainer run equals the own-loop run on the same batches.
- **C_task tracking**: each training micro-batch's forward runs inside ``controller.track_task``.
- **Refreshes** at optimizer-step boundaries (``on_step_end``: under DeepSpeed the real step happened inside
  ``engine.step()`` by then), **gating checked** at ``on_train_end`` (an optimizer step that skipped the gate stops
  the run with an error instead of finishing silently ungated).
- **Not yet**: resuming from a Trainer checkpoint (refused: it would not carry FoLoRA's state). Calibration reads
  a second train dataloader; its first batches equal training's with the default seeded and the sequential
  samplers (tested: sequential), not necessarily with ``group_by_length``.
- **Logs**: ``controller.metrics()`` (relative forgetting F, τ and Σg and attenuated directions per input, τ's
  budget scale, solve time, statistics tokens, gated steps) of the calibration and of every refresh joins the
  Trainer's next regular log (``folora/...`` keys, so TensorBoard/W&B/CSV reporters get them);
  ``folora_gates.png`` (gates per layer) is written to the output directory at train end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from folora_ds.adapters.ds_config import refuse_unsupported
from folora_ds.adapters.zero3_trace import forget_parameter_trace
from folora_ds.common.checks import require_int
from folora_ds.common.plots import plot_gates
from folora_ds.controller import FoLoRAController
from folora_ds.controller.proxy import calibration_batches, proxy_samples_for_this_rank
from folora_ds.distributed import comm
from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.gated_adamw import GatedAdamW, folora_param_groups


def _folora_config(folora: FoLoRAConfig | Mapping[str, Any] | None) -> FoLoRAConfig:
    if folora is None:
        return FoLoRAConfig()
    return folora if isinstance(folora, FoLoRAConfig) else FoLoRAConfig.from_dict(dict(folora))


def _deepspeed_config(args) -> dict | None:
    """The DeepSpeed config the Trainer will use (None without DeepSpeed)."""
    plugin = getattr(args, "hf_deepspeed_config", None)
    return None if plugin is None else plugin.config


class FoLoRATrainerMixin:
    """FoLoRA for a ``transformers.Trainer`` subclass; mix it in first (``folora_trainer_class`` does).

    Extra keyword arguments:
        folora: a ``FoLoRAConfig`` or its dict (the ``"folora"`` block of a DeepSpeed config).
        proxy_batches: this rank's proxy calibration batches (``input_ids``, ``attention_mask``); when None they
            are sampled from the model with ``folora.proxy`` (or read from ``proxy.path``) using the Trainer's
            ``processing_class`` as tokenizer.
        calibration_steps: the first optimizer steps whose training batches give the initial C_task.
    """

    def __init__(self, *args, folora: FoLoRAConfig | Mapping[str, Any] | None = None,
                 proxy_batches: Iterable[Mapping[str, torch.Tensor]] | None = None, calibration_steps: int = 8,
                 **kwargs) -> None:
        optimizers = kwargs.get("optimizers")
        if optimizers is not None and any(item is not None for item in optimizers):
            raise ValueError("FoLoRA trainers build their own optimizer (GatedAdamW); do not pass optimizers=(...): "
                             "under DeepSpeed it would be replaced silently, without the gate")
        require_int("calibration_steps", calibration_steps)
        super().__init__(*args, **kwargs)
        ds_config = _deepspeed_config(self.args)
        plugin = getattr(getattr(self, "accelerator", None), "state", None)
        plugin = getattr(plugin, "deepspeed_plugin", None)
        if ds_config is None and plugin is not None:  # DeepSpeed from `accelerate launch`'s config, not args
            ds_config = plugin.deepspeed_config
        if ds_config is not None and "optimizer" in ds_config:
            raise ValueError("the DeepSpeed config has an \"optimizer\" block: transformers would give DeepSpeed a "
                             "placeholder and never call create_optimizer, so FoLoRA's gate would not run; remove it "
                             "(lr, betas, eps and weight decay come from TrainingArguments)")
        if ds_config is not None and "folora" in ds_config:
            raise ValueError("pass FoLoRA's settings as folora=... to the trainer, not as a \"folora\" block of the "
                             "DeepSpeed config given to TrainingArguments")
        self.folora_config = _folora_config(folora)
        if getattr(self.args, "fp16", False):
            raise ValueError("fp16 is not supported with FoLoRA (README, Troubleshooting); use bf16=True or fp32")
        if ds_config is not None:  # the same refusals as folora-ds train: parameter offload, ZeRO++, fp16, ...
            refuse_unsupported(ds_config, self.folora_config)
            # with optimizer offload DeepSpeed/accelerate would swap GatedAdamW for DeepSpeedCPUAdam unless told not to
            # (the same dict is what accelerate hands to deepspeed.initialize)
            ds_config.setdefault("zero_force_ds_cpu_optimizer", False)
        self.folora_controller = FoLoRAController(self.model, self.folora_config)
        self._folora_proxy_batches = None if proxy_batches is None else list(proxy_batches)
        self._folora_calibration_steps = calibration_steps
        self._folora_optimizer: GatedAdamW | None = None
        self._folora_ready = False
        self._folora_pending_logs: dict[str, float] = {}
        self.add_callback(_FoLoRACallback(self))

    # ------------------------------------------------------------------ Trainer hooks
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint:
            raise ValueError("resuming a FoLoRA Trainer run from a Trainer checkpoint is not supported yet: the "
                             "checkpoint lacks FoLoRA's statistics and bases, and calibrating again on the trained "
                             "adapter would re-project it; start a new run, or use folora_ds.initialize's "
                             "checkpoints (controller.save_checkpoint / resume_from) in your own loop")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            source = self.model if model is None else model
            args = self.args
            self.optimizer = GatedAdamW(folora_param_groups(source, weight_decay=args.weight_decay),
                                        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                        eps=args.adam_epsilon, variant=self.folora_config.variant,
                                        cap_update_norm=self.folora_config.cap_update_norm)
            self._folora_optimizer = self.optimizer
        return self.optimizer

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The Trainer's log, with FoLoRA's latest metrics joined in (no log call of its own: TRL's SFTTrainer
        averages and clears its metric window at every call)."""
        if self._folora_pending_logs:
            logs = {**logs, **self._folora_pending_logs}
            self._folora_pending_logs.clear()
        return super().log(logs, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        if not self._folora_ready:
            raise RuntimeError("FoLoRA: a training step ran before calibration (on_train_begin did not run)")
        with self.folora_controller.track_task(inputs):
            return super().training_step(model, inputs, *args, **kwargs)

    # ------------------------------------------------------------------ calibration
    def _folora_engine(self):
        return getattr(self, "deepspeed", None)

    def _folora_calibrate(self) -> None:
        engine = self._folora_engine()
        optimizer = self._folora_optimizer
        if optimizer is None:
            raise RuntimeError("FoLoRA: the Trainer did not build its optimizer with create_optimizer")
        if engine is not None:
            client = engine.optimizer if engine.zero_optimization_stage() == 0 else engine.optimizer.optimizer
            if client is not optimizer:
                raise RuntimeError(f"DeepSpeed steps {type(client).__name__}, not FoLoRA's GatedAdamW: the gate would "
                                   "not run (check the DeepSpeed config has no \"optimizer\" block)")
        module = self.model
        proxy = self._folora_proxy_batches
        if proxy is None:
            if any(hasattr(param, "ds_id") for param in module.parameters()) and self.folora_config.proxy.path is None:
                raise ValueError("ZeRO-3 partitions the model, so the proxy set cannot be sampled from it here: set "
                                 "folora proxy.path or pass proxy_batches=")
            tokenizer = self.processing_class
            if tokenizer is None:
                raise ValueError("FoLoRA needs proxy_batches= or a processing_class (tokenizer) to sample them")
            tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
            samples = proxy_samples_for_this_rank(module, tokenizer, self.folora_config)
            proxy = calibration_batches(samples, tokenizer, self.folora_config)
        device = self.args.device
        micro_batches = self._folora_calibration_steps * self.args.gradient_accumulation_steps
        task = []
        for batch in self.get_train_dataloader():
            task.append({k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
            if len(task) == micro_batches:
                break
        proxy = [{k: v.to(device) for k, v in b.items()} for b in proxy]
        controller = self.folora_controller
        controller.calibrate(proxy, task)
        if engine is not None:  # training records its own ZeRO-3 trace, not the calibration's forwards'
            forget_parameter_trace(engine)
        controller.solve()
        controller.initialize_lora_a(engine)
        controller.attach(optimizer, engine)
        self._folora_pending_logs.update(controller.log_metrics())  # the calibration's gates, with the first log
        comm.barrier()
        self._folora_ready = True


class _FoLoRACallback(TrainerCallback):
    """Calibration at train begin, refresh at each optimizer step's end, gating check at train end."""

    def __init__(self, trainer: FoLoRATrainerMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.trainer._folora_ready:
            self.trainer._folora_calibrate()
        # the Trainer knows the run's length: the last window's statistics and final refresh would gate nothing
        self.trainer.folora_controller.set_total_steps(state.max_steps if state.max_steps > 0 else None)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        controller = self.trainer.folora_controller
        controller.after_step()
        if controller.last_metrics.get("folora/optimizer_steps") == controller.optimizer_steps:  # logged just now
            self.trainer._folora_pending_logs.update(controller.last_metrics)  # joins the Trainer's next log
        return control

    def on_train_end(self, args, state, control, **kwargs):
        controller = self.trainer.folora_controller
        controller.check_gating()
        layers = [dataclasses.asdict(summary) for summary in controller.layer_summaries()]
        if comm.rank() == 0 and args.output_dir:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            plot_gates(layers, Path(args.output_dir) / "folora_gates.png",
                       title=f"FoLoRA gates after {controller.optimizer_steps} steps")
        return control


_CLASSES: dict[type, type] = {}


def folora_trainer_class(base: type) -> type:
    """A subclass of ``base`` (``transformers.Trainer`` or a subclass such as ``trl.SFTTrainer``) with FoLoRA."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"FoLoRA{base.__name__}", (FoLoRATrainerMixin, base), {"__module__": __name__})
    return _CLASSES[base]


FoLoRATrainer = folora_trainer_class(Trainer)
"""``transformers.Trainer`` with FoLoRA (``FoLoRATrainerMixin``)."""

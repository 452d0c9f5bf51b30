"""The one training run: model → task data → proxy set → peft → FoLoRA under DeepSpeed (and plain AdamW to compare).

The same function runs in one plain process (a DeepSpeed world of one) and on every rank of a launch
(``deepspeed``/``torchrun``/``mpirun launch/train.py``). Everything the DeepSpeed config says is honoured by the
engine or refused by name before the model is loaded (``folora_ds.adapters.ds_config``).

Both runs start from the same LoRA weights (peft's Kaiming A, B = 0; FoLoRA then projects A when
``init="projected"``), see the same global batches in the same order (rank r takes micro-batch slots r, r + world,
…), and use the same optimizer settings. The summary reports, per input, what the gate did (effective rank Σg,
attenuated directions) and, per run, the task losses and the relative forgetting F (mean over modules of
tr(ΔW C_pre ΔWᵀ) / tr(W C_pre Wᵀ), on the proxy statistics; ``budget.relative_forgetting``). Every output file
appears only when complete.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from folora_ds.adapters.ds_config import prepare_ds_config, resolve_batch_sizes
from folora_ds.adapters.engine import initialize
from folora_ds.common.checks import require_int
from folora_ds.common.files import write_json
from folora_ds.common.plots import plot_gates
from folora_ds.controller.export import save_adapter
from folora_ds.controller.proxy import calibration_batches, proxy_samples_for_this_rank, save_proxy_jsonl
from folora_ds.distributed import comm
from folora_ds.distributed.phases import phase
from folora_ds.method.budget import relative_forgetting
from folora_ds.method.config import FoLoRAConfig
from folora_ds.training.data import DEFAULT_TASK_FILE, TaskCollator, build_task_dataset, split_train_eval
from folora_ds.training.models import TINY_MODEL_NAME, load_model
from folora_ds.training.outputs import previous_run_kept, refuse_other_runs

DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}}, "folora": {}}
"""The DeepSpeed config of a run given none: one process, ZeRO-0, fp32, micro-batch 8, AdamW lr 1e-3."""


@dataclass(kw_only=True, frozen=True)
class RunSettings:
    """What to train on and where to write; batch sizes, optimizer and FoLoRA knobs live in the DeepSpeed config.

    Attributes:
        model: "tiny-llama" (built from a config) or a local Hugging Face model directory.
        data: task data file or saved ``datasets`` directory (prompt/response or chat messages).
        output_dir: where the proxy set, adapters and ``summary.json`` go.
        steps: optimizer steps per run.
        eval_fraction: share of the task data held out for the eval loss.
        calibration_steps: the first optimizer steps' batches, used for the initial C_task.
        seed: seed of the model init, LoRA init, data order and proxy sampling offset.
        baseline: also train plain AdamW for the comparison.
        overwrite: replace the content of a non-empty ``output_dir`` (refused otherwise).
        progress: show progress bars (rank 0).
        collective_timeout_seconds: every collective fails after this long when a rank dies or hangs.
    """

    model: str = TINY_MODEL_NAME
    data: str = str(DEFAULT_TASK_FILE)
    output_dir: str = "runs/folora-default"
    steps: int = 60
    eval_fraction: float = 0.1
    calibration_steps: int = 8
    seed: int = 0
    baseline: bool = True
    overwrite: bool = False
    progress: bool = True
    collective_timeout_seconds: float = 600.0

    def __post_init__(self) -> None:
        for name in ("steps", "calibration_steps"):
            require_int(name, getattr(self, name), where="run settings: ")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"run settings: eval_fraction={self.eval_fraction!r} must be in (0, 1)")
        if not (math.isfinite(self.collective_timeout_seconds) and self.collective_timeout_seconds > 0):
            raise ValueError(f"--collective-timeout {self.collective_timeout_seconds!r} must be > 0 seconds")


def batch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Example indices of every global step: reshuffled each epoch with a seeded generator (same for both runs)."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(num_examples, generator=generator).tolist())
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def rank_micro_batches(step_indices: list[int], micro: int, accumulation: int, rank: int, world: int
                       ) -> list[list[int]]:
    """This rank's micro-batches of one global step: slot m·world + rank of each accumulation step m."""
    return [step_indices[(m * world + rank) * micro:(m * world + rank + 1) * micro] for m in range(accumulation)]


def train_steps(engine, batches: Callable[[int], Iterator[dict]], steps: int, *, controller, description: str,
                progress: bool) -> list[float]:
    """Train ``steps`` optimizer steps; returns each step's mean micro-batch loss over all ranks (collective)."""
    engine.train()
    losses = torch.zeros(steps, dtype=torch.float64, device=engine.device)
    for step in tqdm(range(steps), desc=description, disable=not progress):
        micro_batches = list(batches(step))
        with phase(f"{description}: training step {step + 1}"):  # a rank that stops answering is named
            for batch in micro_batches:
                batch = {name: tensor.to(engine.device) for name, tensor in batch.items()}
                with controller.track_task(batch) if controller is not None else contextlib.nullcontext():
                    loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()
                if controller is not None:
                    controller.after_step()
                losses[step] += loss.detach().double() / len(micro_batches)  # no host sync per micro-batch
    return (comm.all_reduce_sum(losses) / comm.world_size()).tolist()


@torch.no_grad()
def _eval_loss(engine, dataset, collate: TaskCollator, batch_size: int) -> float:
    """Token-mean cross-entropy over the response tokens of ``dataset`` (collective: ranks evaluate interleaved
    shares and sum; every rank runs the same number of forwards, as ZeRO-3 needs)."""
    rank, world = comm.rank(), comm.world_size()
    mine = list(range(rank, len(dataset), world))
    forwards = math.ceil(math.ceil(len(dataset) / world) / batch_size)
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)
    for index in range(forwards):
        indices = mine[index * batch_size:(index + 1) * batch_size]
        batch = {name: tensor.to(engine.device) for name, tensor in collate([dataset[i] for i in (indices or [0])]
                                                                             ).items()}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if not indices:  # a rank with no example left still joins the forward
            continue
        labels = batch["labels"][:, 1:]
        totals[0] += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                             ignore_index=-100, reduction="sum"))
        totals[1] += float((labels != -100).sum())
    engine.train()
    comm.all_reduce_sum(totals)
    return float(totals[0] / totals[1])


def check_targets(model: torch.nn.Module, targets: list[str] | str, name: str) -> None:
    """Raise ValueError naming the ``target_modules`` that match no linear layer of ``model`` (peft's rule: the
    module's name, or its last dotted parts, equals the target), with the names that would; "all-linear" passes."""
    if isinstance(targets, str):
        return
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    linear = sorted({module_name.rsplit(".", 1)[-1] for module_name, module in model.named_modules()
                     if isinstance(module, (torch.nn.Linear, Conv1D))})
    names = [module_name for module_name, _ in model.named_modules()]
    missing = [target for target in targets
               if not any(module_name == target or module_name.endswith("." + target) for module_name in names)]
    if missing:
        raise ValueError(f"target_modules {missing} match no module of {name!r}; its linear layers are named "
                         f"{', '.join(linear[:12])}")


def _peft_model(name: str, folora: FoLoRAConfig, seed: int):
    """The base model on this rank's accelerator, its tokenizer, and the LoRA config of ``folora.target_modules``
    (``torch.manual_seed(seed)`` is set last, so ``get_peft_model`` draws the same LoRA init for the same seed)."""
    from deepspeed.accelerator import get_accelerator

    model, tokenizer = load_model(name, seed=seed)
    targets = folora.target_modules if isinstance(folora.target_modules, str) else list(folora.target_modules)
    check_targets(model, targets, name)  # before minutes of proxy sampling, not after
    model.to(get_accelerator().current_device_name())
    torch.manual_seed(seed)
    return model, tokenizer, LoraConfig(r=folora.lora_rank, lora_alpha=folora.lora_alpha,
                                        lora_dropout=folora.lora_dropout, target_modules=targets)


def run(settings: RunSettings, ds_config: Mapping[str, Any] | str | Path) -> dict | None:
    """Train FoLoRA (and plain AdamW unless ``settings.baseline`` is False) on every rank; returns the summary on
    rank 0 (None elsewhere), which is also written to ``output_dir/summary.json``.

    Raises:
        ValueError / KeyError / FileNotFoundError: a bad config, batch sizes, output directory, model or data —
        each named, and the config ones before any model is loaded.
    """
    started = time.perf_counter()
    prepared = prepare_ds_config(ds_config)
    output_dir = Path(settings.output_dir)
    refuse_other_runs(output_dir, overwrite=settings.overwrite, inputs=(settings.data, prepared.folora.proxy.path))
    started_group = comm.init_distributed(timeout_seconds=settings.collective_timeout_seconds)
    try:
        resolve_batch_sizes(prepared.ds_config, comm.world_size())  # needs the world size; before any file moves
        with previous_run_kept(output_dir, active=comm.rank() == 0):  # --overwrite: deleted once this run finished
            return _run(settings, prepared, output_dir, started)
    finally:
        if started_group:
            comm.shutdown()


def _run(settings: RunSettings, prepared, output_dir: Path, started: float) -> dict | None:
    import datasets
    import deepspeed
    import transformers

    folora = prepared.folora
    rank, world = comm.rank(), comm.world_size()
    micro, accumulation = resolve_batch_sizes(prepared.ds_config, world)
    progress = settings.progress and rank == 0
    if not progress:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    comm.barrier()  # rank 0 has emptied the output directory

    model, tokenizer, lora = _peft_model(settings.model, folora, settings.seed)
    dataset = build_task_dataset(settings.data, tokenizer, max_length=folora.max_seq_len)
    train_set, eval_set = split_train_eval(dataset, eval_fraction=settings.eval_fraction, seed=settings.seed)
    collate = TaskCollator(pad_token_id=tokenizer.pad_token_id)
    samples = proxy_samples_for_this_rank(model, tokenizer, folora, progress=progress)  # the base model's own text
    all_samples = sorted((s for share in comm.all_gather_objects(samples) for s in share), key=lambda s: s.index)
    if rank == 0 and folora.proxy.path is None:
        save_proxy_jsonl(all_samples, output_dir / "proxy.jsonl", folora.proxy)
    model = get_peft_model(model, lora)

    order = batch_order(len(train_set), micro * accumulation * world, settings.steps, settings.seed)

    def batches(step: int) -> Iterator[dict]:
        for indices in rank_micro_batches(order[step], micro, accumulation, rank, world):
            yield collate([train_set[i] for i in indices])

    calibration = [batch for step in range(min(settings.calibration_steps, settings.steps)) for batch in batches(step)]
    engine, controller = initialize(model, prepared, proxy_batches=calibration_batches(samples, tokenizer, folora),
                                    task_batches=calibration, progress=progress)
    engine_settings = _engine_settings(engine, controller.optimizer, prepared.ds_config)
    base_eval_loss = _eval_loss(engine, eval_set, collate, micro)
    folora_losses = train_steps(engine, batches, settings.steps, controller=controller,
                                description=f"FoLoRA, ZeRO-{prepared.stage} ×{world}", progress=progress)
    controller.check_gating()  # on every rank: one that skipped the gate stops all
    base_energies = controller.base_energies()
    result = {"train_losses": folora_losses, "train_loss_last10": _mean_last(folora_losses),
              "eval_loss": _eval_loss(engine, eval_set, collate, micro),
              "penalty_by_module": controller.forgetting_penalty(),
              "relative_forgetting": controller.measured_forgetting(), "refreshes": controller.refreshes,
              "gated_steps_per_rank": comm.all_gather_objects(controller.gated_step_counts()),
              "tau_scale": None if controller.budget is None else controller.budget.tau_scale}
    layers = controller.layer_summaries()
    controller.export_adapter(output_dir / "folora_adapter")
    controller.remove()
    engine.destroy()

    baseline = None
    if settings.baseline:
        plain_model, _, _ = _peft_model(settings.model, folora, settings.seed)
        plain_model = get_peft_model(plain_model, lora)
        arguments = prepared.optimizer_arguments
        optimizer = torch.optim.AdamW([p for p in plain_model.parameters() if p.requires_grad], **arguments)
        plain_engine, _, _, _ = deepspeed.initialize(model=plain_model, optimizer=optimizer,
                                                     config=prepared.ds_config)
        plain_losses = train_steps(plain_engine, batches, settings.steps, controller=None,
                                   description=f"plain LoRA (AdamW), ZeRO-{prepared.stage} ×{world}",
                                   progress=progress)
        baseline = {"train_losses": plain_losses, "train_loss_last10": _mean_last(plain_losses),
                    "eval_loss": _eval_loss(plain_engine, eval_set, collate, micro),
                    "penalty_by_module": controller.forgetting_penalty(plain_model)}
        baseline["relative_forgetting"] = relative_forgetting(baseline["penalty_by_module"], base_energies)
        save_adapter(plain_model, output_dir / "adamw_adapter")
        plain_engine.destroy()
    if rank != 0:
        return None
    summary = {"settings": asdict(settings), "folora_config": folora.to_dict(), "world_size": world,
               "zero_stage": prepared.stage, **engine_settings, "optimizer_steps": controller.optimizer_steps,
               "proxy_sequences": len(all_samples),
               "train_examples": len(train_set), "eval_examples": len(eval_set), "base_eval_loss": base_eval_loss,
               "layers": [asdict(layer) for layer in layers], "base_energy_by_module": base_energies,
               "folora": result, "adamw": baseline,
               "seconds": time.perf_counter() - started}
    write_json(output_dir / "summary.json", summary)
    plot_gates(summary["layers"], output_dir / "gates.png",
               title=f"FoLoRA gates ({settings.model}, after {controller.optimizer_steps} steps)")
    return summary


SCHEDULE_PEAKS = ("warmup_max_lr", "cycle_max_lr")
"""The scheduler parameters that set the peak learning rate (DeepSpeed's WarmupLR / WarmupDecayLR, OneCycle)."""


def _engine_settings(engine, optimizer: torch.optim.Optimizer, ds_config: Mapping[str, Any]) -> dict[str, Any]:
    """What the engine and the optimizer really run with (read back from them, not from the config), and the
    configured learning rate: the schedule's peak where a DeepSpeed scheduler sets one (the rate in the optimizer
    at the start of a warm-up is its floor, often 0), else the optimizer's; the schedule as configured."""
    group = optimizer.param_groups[0]
    scheduler = ds_config.get("scheduler") or None
    params = (scheduler or {}).get("params") or {}
    peak = next((params[key] for key in SCHEDULE_PEAKS if key in params), optimizer.defaults["lr"])
    return {"micro_batch": engine.train_micro_batch_size_per_gpu(),
            "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
            "gradient_clipping": engine.gradient_clipping(), "bf16": engine.bfloat16_enabled(),
            "optimizer": {"lr": peak, "betas": list(group["betas"]), "eps": group["eps"],
                          "weight_decay": group["weight_decay"],
                          "schedule": None if scheduler is None else {"type": scheduler.get("type"), **params}}}


def _mean_last(losses: list[float], count: int = 10) -> float:
    tail = losses[-count:]
    return sum(tail) / len(tail)


def format_summary(summary: dict) -> str:
    """A human-readable report of a ``run`` summary."""
    folora, adamw = summary["folora"], summary["adamw"]

    energies = summary["base_energy_by_module"]

    def members_penalty(result: dict, members) -> float:
        """The input's relative forgetting: mean over its modules of penalty / base energy."""
        return sum(result["penalty_by_module"][name] / energies[name] for name in members) / len(members)

    lines = [f"{'input (shared by)':<50} {'d':>5} {'Σg':>8} {'atten.':>6} {'kept@base':>10} {'F FoLoRA':>11}"
             + (f" {'F AdamW':>11}" if adamw else "")]
    for layer in summary["layers"]:
        short = [name.split("model.layers.")[-1] for name in layer["members"]]
        label = short[0] + (f" (+{','.join(s.split('.')[-1] for s in short[1:])})" if len(short) > 1 else "")
        kept = f"{layer['stored']}@{layer['base_gate']:.2g}"
        row = (f"{label[:50]:<50} {layer['dim']:>5} {layer['effective_rank']:>8.1f} {layer['attenuated']:>6} "
               f"{kept:>10} {members_penalty(folora, layer['members']):>11.3e}")
        if adamw:
            row += f" {members_penalty(adamw, layer['members']):>11.3e}"
        lines.append(row)
    total_folora = sum(folora["penalty_by_module"].values())
    gated = [sorted(set(counts)) for counts in folora["gated_steps_per_rank"]]
    lines += ["", f"DeepSpeed ZeRO-{summary['zero_stage']} on {summary['world_size']} rank(s): "
                  f"{summary['optimizer_steps']} optimizer steps of {summary['micro_batch']} × "
                  f"{summary['gradient_accumulation_steps']} × {summary['world_size']} examples, gated steps per "
                  f"rank {gated}, refreshes {folora['refreshes']}",
              f"base model eval loss: {summary['base_eval_loss']:.4f}",
              f"FoLoRA: eval loss {folora['eval_loss']:.4f}, train loss (last 10) {folora['train_loss_last10']:.4f}, "
              f"relative forgetting F = {folora['relative_forgetting']:.4e} (raw Σ tr(ΔW C_pre ΔWᵀ) "
              f"{total_folora:.4e})"]
    if adamw:
        total_adamw = sum(adamw["penalty_by_module"].values())
        lines.append(f"AdamW : eval loss {adamw['eval_loss']:.4f}, train loss (last 10) "
                     f"{adamw['train_loss_last10']:.4f}, relative forgetting F = {adamw['relative_forgetting']:.4e} "
                     f"(raw {total_adamw:.4e})")
        lines.append(f"relative forgetting ratio FoLoRA / AdamW = "
                     f"{folora['relative_forgetting'] / max(adamw['relative_forgetting'], 1e-30):.3f} (F = mean over "
                     "modules of tr(ΔW C_pre ΔWᵀ) / tr(W C_pre Wᵀ); measure real forgetting with folora-ds evaluate)")
    lines.append(f"wall time {summary['seconds']:.1f} s")
    return "\n".join(lines)

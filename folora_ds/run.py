"""The single-process FoLoRA run: proxy sampling → statistics → solves → gated training, vs plain AdamW.

Both runs start from the same LoRA weights (peft's Kaiming A, B = 0; FoLoRA then projects A when
``init="projected"``), see the same batches in the same order, and use the same learning rate and steps. The
summary reports, per input, what the gate did (effective rank Σg, attenuated directions) and, per run, the task
loss and the measured forgetting penalty Σ tr(ΔW C_pre ΔWᵀ) on the proxy statistics.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from folora_ds.config import FoLoRAConfig
from folora_ds.controller import FoLoRAController
from folora_ds.data import DEFAULT_TASK_FILE, TaskCollator, build_task_dataset, split_train_eval
from folora_ds.models import TINY_MODEL_NAME, load_model
from folora_ds.optim import GatedAdamW, folora_param_groups
from folora_ds.proxy import load_proxy_jsonl, proxy_batches, sample_proxy, save_proxy_jsonl


@dataclass(kw_only=True, frozen=True)
class RunSettings:
    """Settings of the single-process comparison run (the FoLoRA knobs live in ``FoLoRAConfig``).

    Attributes:
        model: "tiny-llama" (built from a config) or a local Hugging Face model directory.
        data: task data file or saved ``datasets`` directory (prompt/response or chat messages).
        output_dir: where the proxy set, adapters and ``summary.json`` go.
        steps: optimizer steps per run.
        batch_size: examples per step.
        lr: learning rate of both runs.
        weight_decay: decoupled weight decay of both runs.
        eval_fraction: share of the task data held out for the eval loss.
        calibration_batches: training batches used for the initial C_task.
        seed: seed of the model init, LoRA init, data order and proxy sampling offset.
        baseline: also train plain AdamW for the comparison.
        progress: show progress bars.
    """

    model: str = TINY_MODEL_NAME
    data: str = str(DEFAULT_TASK_FILE)
    output_dir: str = "runs/folora-default"
    steps: int = 60
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    eval_fraction: float = 0.1
    calibration_batches: int = 8
    seed: int = 0
    baseline: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "calibration_batches"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"run settings: {name}={value!r} must be an integer >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"run settings: lr={self.lr!r} must be a finite number > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"run settings: weight_decay={self.weight_decay!r} must be >= 0")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"run settings: eval_fraction={self.eval_fraction!r} must be in (0, 1)")


def batch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Example indices of every step: reshuffled each epoch with a seeded generator (same for both runs)."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(num_examples, generator=generator).tolist())
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def iterate_batches(dataset, index_lists: list[list[int]],
                    collate: TaskCollator) -> Iterator[dict[str, torch.Tensor]]:
    for indices in index_lists:
        yield collate([dataset[i] for i in indices])


@torch.no_grad()
def _eval_loss(model, dataset, collate: TaskCollator, batch_size: int) -> float:
    """Token-mean cross-entropy over the response tokens of ``dataset``."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                   ignore_index=-100, reduction="sum")
        total += float(losses)
        tokens += int((labels != -100).sum())
    model.train(was_training)
    return total / tokens


def _train(model, optimizer, batches, steps: int, *, controller: FoLoRAController | None, description: str,
           progress: bool) -> list[float]:
    model.train()
    losses = []
    for batch in tqdm(batches, total=steps, desc=description, disable=not progress):
        if controller is not None:
            with controller.track_task(batch):
                loss = model(**batch).loss
        else:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if controller is not None:
            controller.after_optimizer_step()
        losses.append(float(loss.detach()))
    return losses


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def run_comparison(settings: RunSettings, config: FoLoRAConfig) -> dict:
    """Run FoLoRA (and plain AdamW unless ``settings.baseline`` is False); returns and writes the summary."""
    started = time.perf_counter()
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(settings.model, seed=settings.seed)

    dataset = build_task_dataset(settings.data, tokenizer, max_length=config.max_seq_len)
    train_set, eval_set = split_train_eval(dataset, eval_fraction=settings.eval_fraction, seed=settings.seed)
    collate = TaskCollator(pad_token_id=tokenizer.pad_token_id)

    if config.proxy.path is not None:
        samples = load_proxy_jsonl(config.proxy.path, tokenizer=tokenizer, max_length=config.max_seq_len)
    else:
        samples = sample_proxy(model, tokenizer, config.proxy, progress=settings.progress)
        save_proxy_jsonl(samples, output_dir / "proxy.jsonl", config.proxy)

    torch.manual_seed(settings.seed)
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    model = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                             lora_dropout=config.lora_dropout, target_modules=targets))
    initial_state = _trainable_state(model)
    base_eval_loss = _eval_loss(model, eval_set, collate, settings.batch_size)
    order = batch_order(len(train_set), settings.batch_size, settings.steps, settings.seed)

    controller = FoLoRAController(model, config)
    calibration = order[:settings.calibration_batches]
    controller.calibrate(proxy_batches(samples, batch_size=config.proxy.batch_size,
                                       pad_token_id=tokenizer.pad_token_id),
                         iterate_batches(train_set, calibration, collate), progress=settings.progress)
    controller.solve(progress=settings.progress)
    controller.initialize_lora_a()
    optimizer = GatedAdamW(folora_param_groups(model, weight_decay=settings.weight_decay), lr=settings.lr,
                           variant=config.variant, cap_update_norm=config.cap_update_norm)
    controller.attach_optimizer(optimizer)
    folora_losses = _train(model, optimizer, iterate_batches(train_set, order, collate), settings.steps,
                           controller=controller, description="FoLoRA (gated AdamW)", progress=settings.progress)
    gated_counts = optimizer.gated_step_counts()
    ungated = {name: count for name, count in gated_counts.items() if count != settings.steps}
    if ungated:
        raise RuntimeError(f"gating did not run on every step: {ungated} (expected {settings.steps} each)")
    folora = {"train_loss_last10": sum(folora_losses[-10:]) / len(folora_losses[-10:]),
              "eval_loss": _eval_loss(model, eval_set, collate, settings.batch_size),
              "penalty_by_module": controller.forgetting_penalty(),
              "gated_steps": gated_counts, "refreshes": controller.refreshes,
              "update_norm_ratios": optimizer.update_norm_ratios(), "train_losses": folora_losses}
    model.save_pretrained(str(output_dir / "folora_adapter"))
    layers = controller.layer_summaries()

    baseline = None
    if settings.baseline:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in initial_state:
                    param.copy_(initial_state[name])
        plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                  weight_decay=settings.weight_decay)
        plain_losses = _train(model, plain, iterate_batches(train_set, order, collate), settings.steps, controller=None,
                              description="plain LoRA (AdamW)", progress=settings.progress)
        baseline = {"train_loss_last10": sum(plain_losses[-10:]) / len(plain_losses[-10:]),
                    "eval_loss": _eval_loss(model, eval_set, collate, settings.batch_size),
                    "penalty_by_module": controller.forgetting_penalty(), "train_losses": plain_losses}
        model.save_pretrained(str(output_dir / "adamw_adapter"))
    controller.remove()

    summary = {
        "settings": asdict(settings), "folora_config": config.to_dict(),
        "proxy_sequences": len(samples), "train_examples": len(train_set), "eval_examples": len(eval_set),
        "base_eval_loss": base_eval_loss,
        "layers": [asdict(layer) for layer in layers],
        "folora": folora, "adamw": baseline, "seconds": time.perf_counter() - started,
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict) -> str:
    """A human-readable report of a ``run_comparison`` summary."""
    folora, adamw = summary["folora"], summary["adamw"]

    def members_penalty(run: dict, members) -> float:
        return sum(run["penalty_by_module"][name] for name in members)

    lines = [f"{'input (shared by)':<58} {'d':>5} {'Σg':>8} {'atten.':>6} {'pen FoLoRA':>11}"
             + (f" {'pen AdamW':>11}" if adamw else "")]
    for layer in summary["layers"]:
        short = [name.split("model.layers.")[-1] for name in layer["members"]]
        label = short[0] + (f" (+{','.join(s.split('.')[-1] for s in short[1:])})" if len(short) > 1 else "")
        row = (f"{label[:58]:<58} {layer['dim']:>5} {layer['effective_rank']:>8.1f} {layer['attenuated']:>6} "
               f"{members_penalty(folora, layer['members']):>11.3e}")
        if adamw:
            row += f" {members_penalty(adamw, layer['members']):>11.3e}"
        lines.append(row)
    total_folora = sum(folora["penalty_by_module"].values())
    lines.append("")
    lines.append(f"base model eval loss: {summary['base_eval_loss']:.4f}")
    lines.append(f"FoLoRA: eval loss {folora['eval_loss']:.4f}, "
                 f"train loss (last 10) {folora['train_loss_last10']:.4f}, "
                 f"forgetting penalty Σ tr(ΔW C_pre ΔWᵀ) = {total_folora:.4e}, "
                 f"gated steps per LoRA-A = {sorted(set(folora['gated_steps'].values()))}, "
                 f"refreshes = {folora['refreshes']}")
    if adamw:
        total_adamw = sum(adamw["penalty_by_module"].values())
        lines.append(f"AdamW : eval loss {adamw['eval_loss']:.4f}, train loss (last 10) "
                     f"{adamw['train_loss_last10']:.4f}, forgetting penalty = {total_adamw:.4e}")
        lines.append(f"penalty ratio FoLoRA / AdamW = {total_folora / max(total_adamw, 1e-30):.3f}")
    lines.append(f"wall time {summary['seconds']:.1f} s")
    return "\n".join(lines)

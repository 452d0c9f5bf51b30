"""What a ``folora-ds train`` summary records about the engine, and its human-readable report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

SCHEDULE_PEAKS = ("warmup_max_lr", "cycle_max_lr")
"""The scheduler parameters that set the peak learning rate (DeepSpeed's WarmupLR / WarmupDecayLR, OneCycle)."""


def engine_settings(engine, optimizer: torch.optim.Optimizer, ds_config: Mapping[str, Any]) -> dict[str, Any]:
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
    resumed = {run: step for run, step in (summary.get("resumed_from_step") or {}).items() if step is not None}
    if resumed:
        lines.append("resumed from a checkpoint at " + ", ".join(f"{run} step {step}" for run, step in resumed.items()))
    lines.append(f"wall time {summary['seconds']:.1f} s")
    return "\n".join(lines)

"""What the retention probe measures: its noise floor, and where each run's change sits.

Retention counts the base-correct questions an adapted model still answers right, by greedy exact match. Two
measures put a run's retention in context (nothing is trained; the base model is restored after each adapter):

- ``noise_floor``: what a change with no task in it costs on the probe at a given KL. A question the base model
  gets right by a slim margin (its first token nearly tied between "Dublin" and "Ireland is ...") flips under *any*
  small change of the model. peft LoRA adapters with random A and B (the grid's rank, alpha and targets;
  ``init_lora_weights=False``), B scaled until KL(base ‖ adapted) on the grid's held-out passages hits each target,
  answer the same questions in the same batches as every run.
- ``probe_kl``: each finished run's KL on the base model's own answers to the probe's questions (chat format,
  teacher-forced; ``measures.answer_kl``) beside its KL on the held-out passages: a run whose change sits where
  chat answers are made loses more questions than its passage KL says.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from folora_ds.common.files import replace_atomically
from folora_ds.toolkit.grid.artifacts import SharedArtifacts
from folora_ds.toolkit.grid.rows import last_step_rows, saved_adapters
from folora_ds.toolkit.grid.spec import GridSettings, GridSpec
from folora_ds.toolkit.measures import answer_kl, answers_correct, greedy_answers, kl_on_text, retention

_log = logging.getLogger(__name__)

DEFAULT_KLS = (0.001, 0.005, 0.02, 0.1)
"""KL(base ‖ adapted) per token of the random adapters: FoLoRA's range on the word-order grid (0.001-0.009) to
plain LoRA's (0.02-0.2)."""


def noise_floor(spec: GridSpec, output_dir: str | Path, *, kls: Sequence[float] = DEFAULT_KLS,
                seeds: Sequence[int] = (0, 1), tolerance: float = 0.2, progress: bool = True) -> str:
    """Retention (and legacy retention) of random adapters at each KL in ``kls``, one adapter per seed; writes
    and returns ``noise_floor.md`` and ``noise_floor.json`` in ``output_dir``.

    Each adapter's B is rescaled (KL grows like the square of the scale) until its measured KL is within
    ``tolerance`` of the target, at most 6 times; the row records the KL reached and whether it is within
    ``tolerance`` (``reached``: a random adapter's KL saturates, so a high target may be out of reach).

    Raises:
        ValueError: a KL target is not positive, or no seed is given — before any model is loaded.
    """
    kls, seeds = [float(k) for k in kls], [int(s) for s in seeds]
    if not kls or not all(k > 0 and math.isfinite(k) for k in kls):
        raise ValueError(f"noise floor: KL targets must be positive numbers, got {kls}")
    if not seeds:
        raise ValueError("noise floor: give at least one seed")
    output_dir = Path(output_dir)
    shared = SharedArtifacts(spec.settings, output_dir / "shared", progress=progress)
    suite = shared.suite()
    base_evaluation = shared.base_evaluation()
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        with shared.peft_on_base(functools.partial(random_lora, settings=spec.settings, seed=seed)) as (
                model, tokenizer):
            draws = {name: param.detach().clone() for name, param in model.named_parameters() if "lora_B" in name}
            parameters = dict(model.named_parameters())

            def measured_kl(scale: float, draws=draws, parameters=parameters) -> float:
                with torch.no_grad():
                    for name, draw in draws.items():
                        parameters[name].copy_(draw * scale)
                return kl_on_text(model, tokenizer, suite.texts, max_length=suite.settings.max_length,
                                  base_cache=shared.base_logits)["kl_per_token"]

            scale = 1e-2
            for target in sorted(kls):
                kl = measured_kl(scale)
                for _ in range(6):
                    if abs(kl / target - 1) <= tolerance:
                        break
                    scale *= math.sqrt(target / max(kl, 1e-30))
                    kl = measured_kl(scale)
                reached = abs(kl / target - 1) <= tolerance
                if not reached:
                    _log.warning("noise floor: seed %d reached KL %.4g, not %g (a random adapter of this rank "
                                 "saturates below it); its row says so", seed, kl, target)
                rows.append(_probe_row(model, tokenizer, suite, base_evaluation) | {
                    "seed": seed, "target_kl": target, "kl_per_token": kl, "scale": scale, "reached": reached})
                _log.info("noise floor: seed %d, KL %.4f (target %g): retention %.1f%%", seed, kl, target,
                          100 * rows[-1]["retention"])
    return _written(output_dir, "noise_floor", rows, noise_floor_markdown(rows))


def random_lora(base, settings: GridSettings, seed: int):
    """``base`` with a peft LoRA adapter of the grid's rank, alpha and targets whose A and B are both random
    (``init_lora_weights=False``: nn.Linear's draw, seeded)."""
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules
    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                        target_modules=list(targets) if isinstance(targets, tuple) else targets,
                        init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is untouched
        torch.manual_seed(seed)
        return get_peft_model(base, config)


def _probe_row(model, tokenizer, suite, base_evaluation: dict[str, Any]) -> dict[str, Any]:
    """Retention (and legacy retention) of ``model`` on the suite's probes, as the grid's evaluation scores them."""
    def correct(questions) -> list[bool]:
        return answers_correct(model, tokenizer, questions, max_new_tokens=suite.settings.max_new_tokens,
                               batch_size=suite.settings.batch_size)

    base_correct = base_evaluation["correct"]
    answered = correct(suite.questions)
    row = {"retention": retention(base_correct, answered), "base_correct": sum(base_correct),
           "kept": sum(a for a, b in zip(answered, base_correct) if b)}
    if suite.legacy_questions:
        row["legacy_retention"] = retention(base_evaluation["legacy_correct"], correct(suite.legacy_questions))
    return row


def noise_floor_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """``noise_floor.md``: per KL target, the random adapters' retention (mean and each seed)."""
    lines = ["# The retention probe's noise floor (random adapters, no task)", "",
             "| target KL | KL reached (per seed) | retention (mean) | per seed | legacy probe (mean) |",
             "|---|---|---|---|---|"]
    for target in sorted({row["target_kl"] for row in rows}):
        at = [row for row in rows if row["target_kl"] == target]
        reached = ", ".join(f"{row['kl_per_token']:.4f}" + ("" if row["reached"] else " (not reached)")
                            for row in at)
        mean = sum(row["retention"] for row in at) / len(at)
        per_seed = ", ".join(f"{100 * row['retention']:.1f}% ({row['kept']}/{row['base_correct']})" for row in at)
        legacy = [row["legacy_retention"] for row in at if "legacy_retention" in row]
        legacy_mean = f"{100 * sum(legacy) / len(legacy):.1f}%" if legacy else "—"
        lines.append(f"| {target:g} | {reached} | {100 * mean:.1f}% | {per_seed} | {legacy_mean} |")
    return "\n".join(lines) + "\n"


def probe_kl(spec: GridSpec, output_dir: str | Path, *, labels: Sequence[str] | None = None,
             progress: bool = True) -> str:
    """Every finished run's (or ``labels``') KL at its last step on the base model's greedy answers to the
    retention questions, beside its KL on held-out passages and its retention; writes and returns
    ``probe_kl.md`` and ``probe_kl.json`` in ``output_dir``.

    Raises:
        ValueError: no finished run (of ``labels``) in ``output_dir`` — checked before any model is loaded.
    """
    output_dir = Path(output_dir)
    last = last_step_rows(spec, output_dir, labels)
    adapters = saved_adapters(output_dir, last)
    shared = SharedArtifacts(spec.settings, output_dir / "shared", progress=progress)
    suite = shared.suite()
    prompts = [question.prompt for question in suite.questions]
    base, tokenizer = shared.base()
    base_answers = greedy_answers(base, tokenizer, prompts, max_new_tokens=suite.settings.max_new_tokens,
                                  batch_size=suite.settings.batch_size, progress=progress,
                                  description="the base model's answers")
    rows = []
    for row, adapter in zip(last, adapters):
        with shared.adapted(adapter) as (model, model_tokenizer):
            measured = answer_kl(model, model_tokenizer, prompts, base_answers, batch_size=suite.settings.batch_size)
        rows.append({key: row[key] for key in ("label", "lr", "seed", "steps", "target_accuracy", "retention",
                                               "kl_per_token")}
                    | {"answer_kl": measured["kl_per_token"], "first_token_kl": measured["first_token_kl"],
                       "answer_tokens": measured["tokens"]})
        _log.info("probe KL: %s lr %g seed %d: %.4f on answers, %.4f on passages", row["label"], row["lr"],
                  row["seed"], measured["kl_per_token"], row["kl_per_token"])
    return _written(output_dir, "probe_kl", rows, probe_kl_markdown(rows))


def probe_kl_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """``probe_kl.md``: per run, KL on the probe's answers against KL on passages, and retention."""
    lines = ["# Where each run's change sits: KL on the probe's answers vs on held-out passages", "",
             "| run | lr | seed | steps | target accuracy | retention | KL, passages | KL, probe answers | "
             "KL, first answer token | answers ÷ passages |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | {row['lr']:g} | {row['seed']} | {row['steps']} | "
                     f"{100 * row['target_accuracy']:.0f}% | {100 * row['retention']:.1f}% | "
                     f"{row['kl_per_token']:.4f} | {row['answer_kl']:.4f} | {row['first_token_kl']:.4f} | "
                     f"{row['answer_kl'] / max(row['kl_per_token'], 1e-30):.1f} |")
    return "\n".join(lines) + "\n"


def _written(output_dir: Path, name: str, rows: Sequence[dict[str, Any]], text: str) -> str:
    """``<name>.json`` (the rows) and ``<name>.md`` (``text``) in ``output_dir``, each complete or not at all;
    returns ``text``."""
    with replace_atomically(output_dir / f"{name}.json") as scratch:
        scratch.write_text(json.dumps(list(rows), indent=1))
    with replace_atomically(output_dir / f"{name}.md") as scratch:
        scratch.write_text(text)
    return text

"""A grid folder's finished runs, read back: which runs are complete, their result rows, and which questions
each run lost.

A run's folder (``<output>/runs/<slug>/``) is complete when every step's ``evaluation.json`` exists and its
``train.json`` was made with today's resolved settings. ``collect_rows`` reads the complete ones into the rows
that ``folora_ds.toolkit.report`` turns into tables and plots; nothing is trained here. ``lost_questions`` loads
each run's last adapter again to answer the retention questions (generation only); ``direction_rows`` splits every
saved adapter's change by FoLoRA's passed and attenuated directions (``folora_ds.toolkit.directions``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from folora_ds.common.files import read_json_file, replace_atomically
from folora_ds.toolkit.directions import DirectionSplit, GateBasis, adapter_direction_split, gate_basis
from folora_ds.toolkit.grid.artifacts import SharedArtifacts
from folora_ds.toolkit.grid.spec import GridRun, GridSettings, GridSpec, changed_settings, resolved_settings
from folora_ds.toolkit.measures import answer_is_correct, greedy_answers
from folora_ds.toolkit.report import OPTIONAL_METRICS, directions_markdown, lost_questions_markdown, write_csv

_log = logging.getLogger(__name__)


def is_complete(run: GridRun, directory: Path, settings: GridSettings | None = None) -> bool:
    """Every step's evaluation of ``run`` exists in ``directory`` and, given ``settings``, the run was made with
    today's resolved settings (a default changed since makes it stale: it is trained again)."""
    if not all((directory / f"step{s}" / "evaluation.json").is_file() for s in run.steps):
        return False
    if settings is None:
        return True
    recorded = read_json_file(directory / "train.json", what="grid run record").get("resolved")
    if recorded is None:  # written before resolved settings were recorded
        return True
    changed = changed_settings(recorded, resolved_settings(run, settings))
    if changed:
        _log.info("%s: made with another %s; training it again", directory.name, ", ".join(changed[:3]))
        return False
    return True


def collect_rows(spec: GridSpec, output_dir: str | Path) -> list[dict[str, Any]]:
    """One row per complete (run, step) of ``spec`` in ``output_dir`` (incomplete runs are left out); the runs of
    ``"lrs": "best"`` entries at the rate their finished sweep chooses."""
    output_dir = Path(output_dir)
    rows = []
    runs = list(spec.runs)
    if spec.best:
        concrete = collect_rows(GridSpec(spec.settings, spec.runs), output_dir)
        for entry in spec.best:
            lr = entry.resolve(concrete)
            runs += [] if lr is None else [run for run in entry.runs(lr)
                                           if run.slug(spec.settings) not in {r.slug(spec.settings) for r in runs}]
    for run in runs:
        directory = output_dir / "runs" / run.slug(spec.settings)
        try:
            if not is_complete(run, directory, spec.settings):
                continue
            train = read_json_file(directory / "train.json", what="grid run record")
            results = {steps: read_json_file(directory / f"step{steps}" / "evaluation.json", what="grid evaluation")
                       for steps in run.steps}
        except FileNotFoundError:  # another worker on this folder is removing it as stale: not complete
            continue
        for steps, result in results.items():
            penalty, energy = result["penalty_by_module"], result["base_energy_by_module"]
            rows.append({
                "label": run.label, "method": run.method, "lr": run.lr, "seed": run.seed, "steps": steps,
                "knobs": json.dumps(dict(run.knobs), sort_keys=True), "target_accuracy": result["target_accuracy"],
                "questions_correct": result["questions_correct"], "retention": result["retention"],
                "kl_per_token": result["kl_per_token"], "base_perplexity": result["base_perplexity"],
                "adapted_perplexity": result["adapted_perplexity"],
                "penalty_total": sum(penalty.values()),
                "penalty_relative_total": sum(penalty.values()) / sum(energy.values()),
                "penalty_relative_mean": sum(penalty[n] / energy[n] for n in penalty) / len(penalty),
                "train_seconds": train["train_seconds"], "eval_seconds": result["seconds"],
                "proxy_sequences": run.proxy_sequences, "slug": directory.name,
                **{key: result[key] for key in OPTIONAL_METRICS if key in result}})
    return rows


def saved_adapters(output_dir: Path, rows: Sequence[dict[str, Any]]) -> list[Path]:
    """The adapter each row's run saved at its step, to load again; all checked before any model is loaded.

    Raises:
        FileNotFoundError: a run has none: its record came without adapters (``--records``); train it in this
            folder to measure it again.
    """
    adapters = [output_dir / "runs" / row["slug"] / f"step{row['steps']}" / "adapter" for row in rows]
    for row, adapter in zip(rows, adapters):
        if not adapter.is_dir():
            raise FileNotFoundError(f"run {row['slug']} has no adapter at step {row['steps']} ({adapter}): its "
                                    "record was brought in without adapters (--records); remove its folder and run "
                                    "the grid to train it here")
    return adapters


def last_step_rows(spec: GridSpec, output_dir: Path, labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The row of each finished run's last step (optionally only ``labels``), by label, lr and seed.

    Raises:
        ValueError: no finished run (of ``labels``) in ``output_dir``.
    """
    last: dict[str, dict[str, Any]] = {}
    for row in collect_rows(spec, output_dir):
        if (labels is None or row["label"] in labels) and row["steps"] > last.get(row["slug"], {"steps": -1})["steps"]:
            last[row["slug"]] = row
    if not last:
        raise ValueError(f"no finished run{' of ' + ', '.join(map(repr, labels)) if labels else ''} in "
                         f"{str(output_dir)!r}")
    return sorted(last.values(), key=lambda r: (r["label"], r["lr"], r["seed"]))


def lost_questions(spec: GridSpec, output_dir: str | Path, *, labels: Sequence[str] | None = None,
                   progress: bool = True) -> str:
    """Which base-correct retention questions each finished run lost at its last step, and how: every run's
    adapter (optionally only ``labels``) answers the questions again, greedily as in the evaluation. Writes and
    returns ``lost_questions.md`` (``report.lost_questions_markdown``). Answers are not part of the cached
    evaluation, so this reruns generation (~15 s per run for SmolLM2 on 2 cores).

    Raises:
        ValueError: no finished run (of ``labels``) in ``output_dir`` — checked before any model is loaded.
    """
    output_dir = Path(output_dir)
    last = last_step_rows(spec, output_dir, labels)
    adapters = saved_adapters(output_dir, last)
    shared = SharedArtifacts(spec.settings, output_dir / "shared", progress=progress)
    suite = shared.suite()
    questions = list(suite.questions)
    answered = []
    for row, adapter in zip(last, adapters):
        with shared.adapted(adapter) as (model, tokenizer):
            answers = greedy_answers(model, tokenizer, [q.prompt for q in questions],
                                     max_new_tokens=suite.settings.max_new_tokens,
                                     batch_size=suite.settings.batch_size, progress=progress,
                                     description=f"{row['label']} lr {row['lr']:g} s{row['seed']}")
        answered.append((row, answers, [answer_is_correct(a, q.answers) for a, q in zip(answers, questions)]))
    text = lost_questions_markdown(questions, shared.base_evaluation()["correct"], answered)
    with replace_atomically(output_dir / "lost_questions.md") as scratch:
        scratch.write_text(text)
    return text


def direction_rows(spec: GridSpec, output_dir: str | Path, *, labels: Sequence[str] | None = None,
                   progress: bool = True) -> str:
    """Where every finished (run, step) of ``spec`` (optionally only ``labels``) moved the model: its adapter's ΔW
    split by FoLoRA's passed and attenuated directions (``directions.split_change``). The yardstick is FoLoRA's gate
    at the grid's FoLoRA defaults on the seed's shared statistics (C_pre, and C_task over every real token), the
    same for every method. Writes ``directions.csv`` (one row per run and step) and ``directions.md``
    (``report.directions_markdown``) and returns the markdown. No generation: ~1 s per adapter for SmolLM2, plus
    one solve per input and seed.

    Raises:
        ValueError: no finished run (of ``labels``) in ``output_dir`` — checked before any model is loaded.
    """
    output_dir = Path(output_dir)
    finished = [row for row in collect_rows(spec, output_dir) if labels is None or row["label"] in labels]
    if not finished:
        raise ValueError(f"no finished run{' of ' + ', '.join(map(repr, labels)) if labels else ''} in "
                         f"{str(output_dir)!r}")
    finished.sort(key=lambda r: (r["seed"], r["label"], r["lr"], r["steps"]))
    adapters = saved_adapters(output_dir, finished)
    shared = SharedArtifacts(spec.settings, output_dir / "shared", progress=progress)
    config = shared.folora_config()
    measured, bases, bases_seed = [], {}, None
    for row, adapter in zip(finished, adapters):
        if row["seed"] != bases_seed:
            bases = _gate_bases(shared.statistics(row["seed"]), config)
            bases_seed = row["seed"]
        with shared.adapted(adapter) as (model, _):
            splits = adapter_direction_split(model, bases)
        total = sum(splits.values(), DirectionSplit(0.0, 0.0, 0.0, 0.0, 0, 0))
        measured.append({key: row[key] for key in ("label", "method", "lr", "seed", "steps", "knobs", "slug")}
                        | {"passed_size": total.passed_size, "attenuated_size": total.attenuated_size,
                           "passed_task_size": total.passed_task_size,
                           "forgetting_share_passed": total.forgetting_share_passed,
                           "passed_task": total.passed_task, "attenuated_task": total.attenuated_task,
                           "passed_directions": total.passed_directions, "directions": total.directions})
    write_csv(output_dir / "directions.csv", measured)
    text = directions_markdown(measured)
    with replace_atomically(output_dir / "directions.md") as scratch:
        scratch.write_text(text)
    return text


def _gate_bases(statistics: dict[str, Any], config) -> dict[str, GateBasis]:
    """Module name → FoLoRA's gate basis of its input, one solve per input (``SharedArtifacts.statistics``)."""
    bases = {}
    for key, names in statistics["members"].items():
        basis = gate_basis(statistics["task"][key], statistics["pre"][key], config, layer=key)
        bases.update({name: basis for name in names})
    return bases

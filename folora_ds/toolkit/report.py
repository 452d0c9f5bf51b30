"""Tables and plots of a comparison grid (``folora_ds.toolkit.grid``): what users read to judge the method.

- ``results_runs.csv``: one row per (run, step) — every seed.
- ``results.csv`` / ``results.md``: mean ± std over seeds per (label, learning rate, steps).
- ``frontier.png``: target accuracy against KL(base ‖ adapted) and against retention; plain LoRA's frontier (its
  Pareto-best points over learning rates and steps) drawn as a curve, every other group as a point with error bars.
- ``gates.png``: FoLoRA's gate per layer — effective rank Σg / d of each input kind.
- The *frontier comparison*: for each group, plain LoRA's lowest KL at an accuracy at least as high (interpolated
  on the frontier), so "beyond the frontier" is a number, not an impression.
- ``directions.md`` (``folora-ds grid --directions``): how far each group moved along FoLoRA's passed and
  attenuated directions, and FoLoRA's passed size against plain LoRA's at the same rate (its effective rate there).
- The *forgetting-proxy check*: Spearman correlation, across every row, of measured KL with each printed proxy
  (raw Σ tr(ΔW C_pre ΔWᵀ), the same relative to Σ tr(W C_pre Wᵀ), and the per-module relative mean).

The statistics are pure functions of the rows (``aggregate``, ``pareto_frontier``, ``frontier_kl_at``,
``spearman``), tested without a model.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from folora_ds.common.files import read_json_file, replace_atomically
from folora_ds.common.plots import plot_gates, pyplot, save_figure
from folora_ds.toolkit.measures import has_number_answer, retention_by_group

METRICS = ("target_accuracy", "retention", "questions_correct", "kl_per_token", "adapted_perplexity",
           "penalty_total", "penalty_relative_total", "penalty_relative_mean", "train_seconds", "eval_seconds")
OPTIONAL_METRICS = ("legacy_retention", "legacy_questions_correct")
"""Metrics only grids with a legacy retention probe measure (aggregated where every seed of a group has them)."""
PROXIES = ("penalty_total", "penalty_relative_total", "penalty_relative_mean")
PLAIN_LABEL_METHOD = "lora"
MAIN_FIGURE = "frontier"  # frontier.png; a spec entry's "figure": NAME draws its label in frontier_NAME.png
REFERENCE_LABEL = "FoLoRA"  # drawn in every secondary figure too, as the point of reference of a knob study


# ---------------------------------------------------------------------------------------------- pure statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group rows by (label, method, knobs, lr, steps): ``seeds`` and ``<metric>_mean`` / ``<metric>_std``."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["label"], row["method"], row["knobs"], row["lr"], row["steps"]), []).append(row)
    result = []
    for (label, method, knobs, lr, steps), members in groups.items():
        entry: dict[str, Any] = {"label": label, "method": method, "knobs": knobs, "lr": lr, "steps": steps,
                                 "seeds": len(members)}
        for metric in METRICS + tuple(m for m in OPTIONAL_METRICS if all(m in row for row in members)):
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = mean_std([float(m[metric]) for m in members])
        result.append(entry)
    return sorted(result, key=lambda e: (e["label"] != "plain LoRA", e["label"], e["lr"], e["steps"]))


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (forgetting, accuracy) points no other point beats on both (lower forgetting, higher accuracy), sorted by
    forgetting: along the result, accuracy strictly increases."""
    frontier: list[tuple[float, float]] = []
    for forgetting, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not frontier or accuracy > frontier[-1][1]:
            frontier.append((forgetting, accuracy))
    return frontier


def frontier_kl_at(frontier: Sequence[tuple[float, float]], accuracy: float) -> float | None:
    """The least forgetting on the frontier curve (linear between its points) that reaches ``accuracy``; None
    when no frontier point reaches it."""
    if not frontier or accuracy > frontier[-1][1]:
        return None
    if accuracy <= frontier[0][1]:
        return frontier[0][0]
    for (x0, y0), (x1, y1) in zip(frontier, frontier[1:]):
        if y0 < accuracy <= y1:
            return x0 + (x1 - x0) * (accuracy - y0) / (y1 - y0)
    return frontier[-1][0]


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (ties share their mean rank); NaN for fewer than 3 points or a constant side."""
    if len(x) != len(y):
        raise ValueError(f"spearman of {len(x)} and {len(y)} values")
    if len(x) < 3:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return math.nan if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def frontier_comparison(groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For every group: its mean accuracy/KL/retention against plain LoRA's two frontiers at that accuracy.

    KL: ``frontier_kl`` is the least KL plain LoRA needs for the group's accuracy and ``kl_ratio`` = group KL /
    frontier KL (< 1 is beyond the frontier). Retention: ``frontier_retention`` is the most retention plain LoRA keeps
    at that accuracy (its Pareto frontier of lost share 1 − retention vs accuracy, linear between points) and
    ``retention_gain`` = group retention − frontier retention (> 0 is beyond it). When plain LoRA never got as
    accurate, both frontier values are None, ``beyond_plain`` is True, and the ratio and gain are taken against plain's
    most accurate point: bounds (``kl_ratio`` from above, ``retention_gain`` from below), since plain LoRA would need
    at least that KL, and keep at most that retention, to get there, if it can at all."""
    plain = [g for g in groups if g["method"] == PLAIN_LABEL_METHOD]
    kl_frontier = pareto_frontier([(g["kl_per_token_mean"], g["target_accuracy_mean"]) for g in plain])
    lost_frontier = pareto_frontier([(1.0 - g["retention_mean"], g["target_accuracy_mean"]) for g in plain])
    best = max((g["target_accuracy_mean"] for g in plain), default=None)
    result = []
    for group in groups:
        accuracy = group["target_accuracy_mean"]
        reference_kl = frontier_kl_at(kl_frontier, accuracy)
        reference_lost = frontier_kl_at(lost_frontier, accuracy)
        beyond = reference_kl is None and best is not None
        # beyond plain's best accuracy: the frontiers' ends (least KL / most retention among plain's most accurate)
        against_kl = kl_frontier[-1][0] if beyond else reference_kl
        against_lost = lost_frontier[-1][0] if beyond else reference_lost
        against_retention = None if against_lost is None else 1.0 - against_lost
        result.append({"label": group["label"], "lr": group["lr"], "steps": group["steps"], "seeds": group["seeds"],
                       "target_accuracy": accuracy, "kl": group["kl_per_token_mean"],
                       "retention": group["retention_mean"],
                       "accuracy_vs_best_plain": None if not best else accuracy / best,
                       "frontier_kl": reference_kl, "beyond_plain": beyond,
                       "kl_ratio": None if not against_kl else group["kl_per_token_mean"] / against_kl,
                       "frontier_retention": None if beyond or reference_lost is None else 1.0 - reference_lost,
                       "retention_gain": (None if against_retention is None
                                          else group["retention_mean"] - against_retention)})
    return result


# ---------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class Report:
    markdown: str
    files: tuple[Path, ...]


def _fmt(mean: float, std: float, percent: bool = False, digits: int = 4) -> str:
    if percent:
        return f"{mean:.1%} ± {std:.1%}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_tables(rows: Sequence[Mapping[str, Any]]) -> str:
    """The results table, the frontier comparison and the forgetting-proxy check as markdown."""
    if not rows:
        return "No finished run yet."
    groups = aggregate(rows)
    legacy = any("legacy_retention_mean" in g for g in groups)  # a second column: the grid's earlier probe
    lines = ["| method | lr | steps | seeds | target accuracy | retention of base-correct | "
             + ("legacy probe retention | " if legacy else "") + "KL(base‖adapted)/token | "
             "perplexity | relative forgetting F | train s |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if legacy else "")]
    for g in groups:
        knobs = json.loads(g["knobs"])
        label = g["label"] + (f" ({', '.join(f'{k}={v}' for k, v in knobs.items())})"
                              if knobs and g["label"] in ("FoLoRA",) else "")
        lines.append(f"| {label} | {g['lr']:g} | {g['steps']} | {g['seeds']} | "
                     f"{_fmt(g['target_accuracy_mean'], g['target_accuracy_std'], True)} | "
                     f"{_fmt(g['retention_mean'], g['retention_std'], True)} | "
                     + (("—" if "legacy_retention_mean" not in g else
                         _fmt(g["legacy_retention_mean"], g["legacy_retention_std"], True)) + " | " if legacy else "")
                     + f"{_fmt(g['kl_per_token_mean'], g['kl_per_token_std'])} | "
                     f"{g['adapted_perplexity_mean']:.2f} | "
                     f"{g['penalty_relative_mean_mean']:.2e} ± {g['penalty_relative_mean_std']:.1e} | "
                     f"{g['train_seconds_mean']:.0f} |")
    lines += ["", "Against plain LoRA's frontier (its Pareto-best mean points over learning rates and steps; "
              "frontier KL = the least KL plain LoRA needs for the same accuracy; frontier retention = the most it "
              "keeps at that accuracy):", "",
              "| method | lr | steps | accuracy / best plain | KL | frontier KL at that accuracy | KL / frontier | "
              "retention | frontier retention at that accuracy | retention − frontier |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in frontier_comparison(groups):
        if c["label"] == "plain LoRA":
            continue
        ratio = "—" if c["kl_ratio"] is None else ("< " if c["beyond_plain"] else "") + f"{c['kl_ratio']:.2f}"
        reference = (f"beyond plain's best accuracy (its KL {c['kl'] / c['kl_ratio']:.4f})" if c["beyond_plain"]
                     else "—" if c["frontier_kl"] is None else f"{c['frontier_kl']:.4f}")
        versus = "—" if c["accuracy_vs_best_plain"] is None else f"{c['accuracy_vs_best_plain']:.0%}"
        kept = ("—" if c["retention_gain"] is None
                else f"{c['retention'] - c['retention_gain']:.1%} (plain's best)" if c["beyond_plain"]
                else f"{c['frontier_retention']:.1%}")
        gain = ("—" if c["retention_gain"] is None
                else ("> " if c["beyond_plain"] else "") + f"{100 * c['retention_gain']:+.1f} points")
        lines.append(f"| {c['label']} | {c['lr']:g} | {c['steps']} | {versus} | {c['kl']:.4f} | {reference} | "
                     f"{ratio} | {c['retention']:.1%} | {kept} | {gain} |")
    kl = [float(r["kl_per_token"]) for r in rows]
    if len(rows) < 3:  # a rank correlation of fewer points says nothing
        return "\n".join(lines + ["", f"(Forgetting proxies vs measured KL: needs ≥ 3 (run, step) rows; "
                                       f"{len(rows)} so far.)"])
    lines += ["", f"Forgetting proxies vs measured KL over all {len(rows)} (run, step) rows (Spearman ρ):", ""]
    for proxy in PROXIES:
        lines.append(f"- `{proxy}`: ρ = {spearman([float(r[proxy]) for r in rows], kl):.2f}")
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with replace_atomically(path) as scratch, open(scratch, "w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def plot_frontier(groups: Sequence[Mapping[str, Any]], path: Path, *, title: str = "accuracy vs forgetting"
                  ) -> None:
    """Target accuracy vs KL (log) and vs retention: plain LoRA's two frontiers as curves, groups with error bars."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    plain = [g for g in groups if g["method"] == PLAIN_LABEL_METHOD]
    frontier = pareto_frontier([(g["kl_per_token_mean"], g["target_accuracy_mean"]) for g in plain])
    if frontier:
        left.plot([p[0] for p in frontier], [p[1] for p in frontier], "-", color="0.35", lw=2,
                  label="plain LoRA frontier (lr × steps)", zorder=1)
    kept_frontier = pareto_frontier([(1.0 - g["retention_mean"], g["target_accuracy_mean"]) for g in plain])
    if kept_frontier:  # the same frontier in retention: the most plain LoRA keeps for each accuracy
        right.plot([1.0 - p[0] for p in kept_frontier], [p[1] for p in kept_frontier], "-", color="0.35", lw=2,
                   zorder=1)
    labels = sorted({g["label"] for g in groups}, key=lambda label: (label != "plain LoRA", label != "FoLoRA", label))
    markers = "osD^v<>pPX*h"
    for index, label in enumerate(labels):
        members = [g for g in groups if g["label"] == label]
        style = {"fmt": markers[index % len(markers)], "capsize": 3, "ms": 6, "label": label, "alpha": 0.9}
        for axis, x in ((left, "kl_per_token"), (right, "retention")):
            axis.errorbar([g[f"{x}_mean"] for g in members], [g["target_accuracy_mean"] for g in members],
                          xerr=[g[f"{x}_std"] for g in members], yerr=[g["target_accuracy_std"] for g in members],
                          **style)
            style.pop("label", None)
        for g in members:
            left.annotate(f"{g['lr']:g}/{g['steps']}", (g["kl_per_token_mean"], g["target_accuracy_mean"]),
                          fontsize=6, alpha=0.6, xytext=(3, 3), textcoords="offset points")
    left.set_xscale("log")
    left.set_xlabel("KL(base ‖ adapted) per token on held-out text (lower = kept more)")
    right.set_xlabel("retention of questions the base model answered correctly")
    for axis in (left, right):
        axis.set_ylabel("target exact-match accuracy")
        axis.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    left.set_title(f"{title} (labels: lr/steps; bars: ±1 std over seeds)", fontsize=9)
    save_figure(figure, path)


def figure_groups(groups: Sequence[Mapping[str, Any]], figures: Mapping[str, str]
                  ) -> dict[str, list[Mapping[str, Any]]]:
    """Figure name → the aggregated groups drawn in it: each label in its figure (``figures``; unlisted labels in
    ``MAIN_FIGURE``), plus plain LoRA (its frontier) and ``REFERENCE_LABEL`` in every other figure."""
    drawn: dict[str, list[Mapping[str, Any]]] = {}
    for group in groups:
        drawn.setdefault(figures.get(group["label"], MAIN_FIGURE), []).append(group)
    shared = [g for g in groups if g["method"] == PLAIN_LABEL_METHOD or g["label"] == REFERENCE_LABEL]
    for name, members in drawn.items():
        if name != MAIN_FIGURE:
            members[:0] = [g for g in shared if g not in members]
    return drawn


def _cell(text: str, limit: int | None = None) -> str:
    """``text`` fit for one markdown table cell (no newline, no column bar), cut to ``limit`` characters."""
    text = " ".join(text.split()).replace("|", "/")
    return text if limit is None else text[:limit]


def lost_questions_markdown(questions: Sequence[Any], base_correct: Sequence[bool],
                            answered: Sequence[tuple[Mapping[str, Any], Sequence[str], Sequence[bool]]]) -> str:
    """``lost_questions.md``: per run (``row``, its answers, which are correct), the base-correct questions kept,
    split by ``measures.has_number_answer``; then each base-correct question with how many runs lost it and one
    lost answer. A run whose fresh answers score differently from its cached ``questions_correct`` is flagged
    (greedy generation should reproduce it exactly; a difference means the table is not the evaluation's)."""
    summary = ["| run | lr | seed | steps | number answers kept | other questions kept | note |",
               "|---|---|---|---|---|---|---|"]
    lost: dict[int, list[str]] = {index: [] for index, correct in enumerate(base_correct) if correct}
    for row, answers, correct in answered:
        groups = retention_by_group(questions, base_correct, correct)
        fraction = sum(correct) / len(correct)
        note = ("" if abs(fraction - row["questions_correct"]) < 1e-9 else
                f"differs from the cached evaluation ({fraction:.3f} vs {row['questions_correct']:.3f} correct)")
        summary.append(f"| {_cell(row['label'])} | {row['lr']:g} | {row['seed']} | {row['steps']} | "
                       + " | ".join(f"{kept}/{total}" for kept, total in groups.values()) + f" | {note} |")
        for index in lost:
            if not correct[index]:
                lost[index].append(answers[index])
    detail = ["| question | number answer | lost by | one lost answer |", "|---|---|---|---|"]
    for index, answers in sorted(lost.items(), key=lambda item: -len(item[1])):
        detail.append(f"| {_cell(questions[index].prompt)} | {'yes' if has_number_answer(questions[index]) else ''} "
                      f"| {len(answers)}/{len(answered)} | {_cell(answers[0], 70) if answers else ''} |")
    return "\n".join(["# Base-correct questions lost, per run (last step)", "", *summary, "", "# Per question", "",
                      *detail, ""])


def equal_move_rate(plain: Mapping[float, float], size: float) -> float | None:
    """The plain-LoRA learning rate that moves as far as ``size``: ``plain`` maps rate → passed size (at one step
    count), interpolated linearly in (log rate, log size) between the two rates around ``size``; None outside
    plain's range or for sizes that do not grow with the rate there."""
    points = sorted((lr, value) for lr, value in plain.items() if lr > 0 and value > 0)
    for (lr0, s0), (lr1, s1) in zip(points, points[1:]):
        if size > 0 and min(s0, s1) <= size <= max(s0, s1) and s1 > s0:
            share = (math.log(size) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return math.exp(math.log(lr0) + share * (math.log(lr1) - math.log(lr0)))
    return None


def directions_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """``directions.md``: per (label, lr, steps), mean ± std over seeds of the passed and attenuated sizes
    (√ of the C̃-energy of ΔW along them, summed over modules), the passed share of that energy, the passed size
    over plain LoRA's at the same rate and steps, and the plain rate that moves as far along the passed directions
    (``equal_move_rate``): a method whose passed size at rate lr equals plain LoRA's at 2·lr has twice plain's
    effective rate there."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["label"], row["method"], row["knobs"], row["lr"], row["steps"]), []).append(row)
    metrics = ("passed_size", "attenuated_size", "forgetting_share_passed", "passed_task_size")
    means = {key: {metric: mean_std([float(r[metric]) for r in members]) for metric in metrics}
             for key, members in groups.items()}
    plain: dict[int, dict[float, tuple[float, float]]] = {}
    for (_, method, knobs, lr, steps), value in means.items():
        if method == PLAIN_LABEL_METHOD and knobs == "{}":
            plain.setdefault(steps, {})[lr] = (value["passed_size"][0], value["passed_task_size"][0])
    lines = ["| method | lr | steps | seeds | passed size | attenuated size | energy share passed | passed task size | "
             "passed size / plain's at this lr | task size / plain's | moves like plain LoRA at lr |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(means, key=lambda k: (k[1] != PLAIN_LABEL_METHOD, k[0], k[3], k[4])):
        label, method, knobs, lr, steps = key
        value, reference = means[key], plain.get(steps, {}).get(lr)
        size, task = value["passed_size"][0], value["passed_task_size"][0]
        like = equal_move_rate({rate: sizes[0] for rate, sizes in plain.get(steps, {}).items()}, size)
        lines.append(f"| {label} | {lr:g} | {steps} | {len(groups[key])} | {_fmt(*value['passed_size'], digits=3)} | "
                     f"{_fmt(*value['attenuated_size'], digits=3)} | "
                     f"{_fmt(*value['forgetting_share_passed'], percent=True)} | "
                     f"{_fmt(*value['passed_task_size'], digits=3)} | "
                     f"{'—' if not reference else f'{size / reference[0]:.2f}'} | "
                     f"{'—' if not reference else f'{task / reference[1]:.2f}'} | "
                     f"{'—' if like is None else f'{like:.2g}'} |")
    return "\n".join(["# Where each adapter moved: FoLoRA's passed and attenuated directions", "",
                       "Sizes are √ of tr(ΔW C̃ ΔWᵀ) restricted to the directions FoLoRA's default gate passes "
                       "(g ≥ 0.5) or attenuates, on the grid's shared statistics, summed over modules; the task "
                       "size is √ of tr(ΔW C_task ΔWᵀ) along the passed ones (how far the outputs on task inputs "
                       "moved).", "", *lines, ""])


def write_report(rows: Sequence[Mapping[str, Any]], spec, output_dir: Path) -> Report:
    """Write the CSVs, ``results.md``, ``frontier.png`` (one ``frontier_<figure>.png`` more per figure named in
    the spec) and ``gates.png`` of ``rows`` into ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = markdown_tables(rows)
    files = [output_dir / "results_runs.csv", output_dir / "results.csv", output_dir / "results.md"]
    write_csv(files[0], rows)
    groups = aggregate(rows) if rows else []
    write_csv(files[1], groups)
    with replace_atomically(files[2]) as scratch:
        scratch.write_text(markdown + "\n")
    for name, members in figure_groups(groups, getattr(spec, "figures", {})).items():
        files.append(output_dir / (f"{MAIN_FIGURE}.png" if name == MAIN_FIGURE else f"{MAIN_FIGURE}_{name}.png"))
        plot_frontier(members, files[-1], title="accuracy vs forgetting" + (
            "" if name == MAIN_FIGURE else f": {name.replace('_', ' ')}"))
    folora = [row for row in rows if row["method"] == "folora" and row["knobs"] == "{}"
              and row.get("proxy_sequences") is None]
    folora = [row for row in folora if row["label"] == REFERENCE_LABEL] or folora
    if folora:
        first = min(folora, key=lambda r: (r["seed"], r["lr"]))
        train = read_json_file(output_dir / "runs" / first["slug"] / "train.json", what="grid run record")
        files.append(output_dir / "gates.png")
        plot_gates(train["layers"], files[-1], title=f"FoLoRA gates after training ({spec.settings.model}, lr "
                                                     f"{first['lr']:g}, seed {first['seed']})")
    return Report(markdown, tuple(files))

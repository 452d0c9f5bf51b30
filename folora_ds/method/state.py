"""The format of FoLoRA's saved state: its version, what a resume may not change, and merging ranks' parts.

A controller's ``state_dict()`` on one rank is that rank's *part*: the common entries (config, input widths and
sharing, counters, budget) plus the per-input entries of the inputs it owns::

    {"version": 4, "part": (rank, world), "config": {...}, "dims": {key: d}, "members": {key: [module, ...]},
     "optimizer_steps": n, "task_forwards": n, "refreshes": n, "budget": {...} | None,
     "pre": {key: (d, d)}, "ema": {key: (d, d)}, "ema_rows": {key: n | None},
     "task_window": {key: {"sum": (d, d), "tokens": n}},
     "solver": {...}}                                   ← per-input entries: only the keys this rank owns

``ema_rows`` (the token rows folded into each C_task EMA, a bound on its rank) came after version 4's other
entries: a part without it still merges and loads, its EMAs' rows unknown.

``merge_state_parts`` of every rank's part is the whole state (``part == (0, 1)``), which any world size loads.
Pure Python and torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from folora_ds.method.config import FoLoRAConfig

STATE_VERSION = 4
STRUCTURAL_FIELDS = ("lora_rank", "lora_alpha", "target_modules", "k", "variant", "statistics_dtype")
PER_INPUT_PARTS = ("pre", "ema", "ema_rows", "task_window", "solver")


def merge_state_parts(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The whole FoLoRA state from every rank's ``state_dict()`` part (tensors are not copied).

    Raises:
        ValueError: parts of different runs or versions, or a rank's part missing (named).
    """
    parts = list(parts)
    if not parts:
        raise ValueError("no FoLoRA state parts to merge")
    world = parts[0]["part"][1]
    ranks = sorted(part["part"][0] for part in parts)
    if ranks != list(range(world)) or any(part["part"][1] != world for part in parts):
        missing = sorted(set(range(world)) - set(ranks))
        raise ValueError(f"FoLoRA state parts of ranks {ranks} were given, the run had {world} ranks"
                         + (f" (missing: {missing})" if missing else ""))
    first = min(parts, key=lambda part: part["part"][0])
    common = {key: value for key, value in first.items() if key not in PER_INPUT_PARTS}
    for part in parts:
        if part.get("version") != first.get("version") or part["dims"] != first["dims"] or (
                part["optimizer_steps"] != first["optimizer_steps"]):
            raise ValueError(f"FoLoRA state part of rank {part['part'][0]} belongs to another run or step")
    merged = {name: {} for name in PER_INPUT_PARTS}
    for part in parts:
        for name in PER_INPUT_PARTS:
            merged[name].update(part.get(name, {}) if name == "ema_rows" else part[name])  # older parts lack it
    return {**common, "part": (0, 1), **merged}


def check_state_fits(state: Mapping[str, Any], config: FoLoRAConfig, module_names: set[str], *,
                     has_budget: bool, tensor_parallel: int = 1) -> None:
    """Raise ValueError unless ``state`` can be resumed with ``config`` on a model whose LoRA modules are
    ``module_names`` split over ``tensor_parallel`` TP ranks (version, the structural config fields, the modules,
    the TP size, and a budget's state where one is configured). FoLoRA's own statistics and bases are whole,
    TP-independent; the TP size is checked because the engine's weights and optimizer are saved per TP rank."""
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"FoLoRA state version {state.get('version')!r} is not supported (expected "
                         f"{STATE_VERSION})")
    saved = FoLoRAConfig.from_dict(state["config"])
    changed = [f for f in STRUCTURAL_FIELDS if getattr(saved, f) != getattr(config, f)]
    if changed:
        raise ValueError(f"the checkpoint was written with a different FoLoRA config: {changed} differ "
                         f"(checkpoint {[getattr(saved, f) for f in changed]}, now "
                         f"{[getattr(config, f) for f in changed]})")
    saved_modules = {name for names in state["members"].values() for name in names}
    if saved_modules != module_names:
        extra = sorted(saved_modules ^ module_names)[:3]
        raise ValueError(f"the checkpoint's LoRA modules differ from this model's (e.g. {extra})")
    saved_tp = int(state.get("tensor_parallel", 1))
    if saved_tp != tensor_parallel:
        raise ValueError(f"the checkpoint was written at tensor-parallel size {saved_tp}, this run has "
                         f"{tensor_parallel}: the engine's weights and optimizer are saved per TP rank, so resume at "
                         f"TP = {saved_tp}")
    if has_budget and state.get("budget") is None:
        raise ValueError("the checkpoint was written without a forgetting_budget; resume without one or start "
                         "a new run")

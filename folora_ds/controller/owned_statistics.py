"""The statistics of the inputs this rank owns: their covariances from the collector's sums, and their way into
and out of FoLoRA's state (whose format, merge and checks are ``method.state``).

Each rank's state part carries, for every input key it owns, C_pre (d, d), the C_task EMA (d, d) with the token
rows folded into it, and the open task window; ``merge_state_parts`` joins the parts, and a resume on any world
size takes only the keys it owns now::

    one Llama-70B block (down-in d = 28672, the other inputs 8192; owners balance Σd³):
      saved on 2 ranks:    part 0 {down-in}     part 1 {attn-in, mlp-in, o-in}
                                   └───────── merged ─────────┘
      resumed on 3 ranks:  rank 0 {down-in}     rank 1 {attn-in, o-in}     rank 2 {mlp-in}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from folora_ds.method.covariance import CovarianceCollector, CovarianceEMA, CovarianceSums


class OwnedStatistics(NamedTuple):
    """The statistics of the inputs a rank owns, on its device: C_pre (d, d) and the C_task EMA (d, d) per key, and
    the open task window's sums of the keys that had one."""

    pre_covariances: dict[str, torch.Tensor]
    task_ema: CovarianceEMA
    task_window: dict[str, CovarianceSums]


def owned_covariances(collector: CovarianceCollector, source: str, keys: list[str], *,
                      in_place: bool) -> dict[str, torch.Tensor]:
    """The (d, d) covariance of every input in ``keys`` (those this rank owns) from ``collector``'s ``source`` sums.

    Args:
        in_place: divide the sums in place (they are spent; no (d, d) copy).

    Raises:
        ValueError: naming the first input of ``keys`` without a counted token.
    """
    sums = collector.sums(source)
    missing = [key for key in keys if key not in sums]
    if missing:
        raise ValueError(f"{missing[0]!r} [{source}]: zero unmasked tokens were counted; check the "
                         "attention/label masks and that the calibration set is not empty")
    return {key: sums[key].covariance(name=f"{key} [{source}]", in_place=in_place) for key in keys}


def save_owned_statistics(pre_covariances: Mapping[str, torch.Tensor], task_ema: CovarianceEMA,
                          task_window: Mapping[str, CovarianceSums]) -> dict[str, Any]:
    """The ``pre``, ``ema``, ``ema_rows`` and ``task_window`` entries of a state part for the keys of
    ``pre_covariances`` (the owned keys) and of the open window: CPU tensors, the live ones where they already are
    on the CPU (as ``nn.Module.state_dict`` does; at 70B a copy would be gigabytes); token counts as ints (an
    EMA's rows None where unknown)."""
    return {"pre": {key: value.cpu() for key, value in pre_covariances.items()},
            "ema": {key: task_ema[key].cpu() for key in pre_covariances},
            "ema_rows": {key: task_ema.rows(key) for key in pre_covariances},
            "task_window": {key: {"sum": sums.sum.cpu(), "tokens": int(sums.tokens)}
                            for key, sums in task_window.items()}}


def load_owned_statistics(state: Mapping[str, Any], keys: list[str], device: torch.device,
                          ema_decay: float) -> OwnedStatistics:
    """The statistics of ``keys`` (the inputs this rank owns now) from a whole state, moved to ``device``; the EMA
    is a new one with ``ema_decay``, so it replaces (never blends with) an estimate held before. A state saved
    before the EMA's rows were counted (no ``ema_rows``) leaves them unknown.

    Raises:
        ValueError: the state lacks one of ``keys`` (one rank's part was loaded instead of the merged parts).
    """
    missing = [key for key in keys if key not in state["pre"]]
    if missing:
        raise ValueError(f"the FoLoRA state lacks input {missing[0]!r} ({len(missing)} missing): load the "
                         "merge_state_parts of every rank's part, not one rank's")
    task_ema = CovarianceEMA(ema_decay)
    rows = state.get("ema_rows", {})
    for key in keys:
        task_ema.update(key, state["ema"][key].to(device), rows=rows.get(key))
    windows = {key: state["task_window"][key] for key in keys if key in state["task_window"]}
    return OwnedStatistics(
        pre_covariances={key: state["pre"][key].to(device) for key in keys}, task_ema=task_ema,
        task_window={key: CovarianceSums(window["sum"].to(device), torch.tensor(window["tokens"], device=device))
                     for key, window in windows.items()})

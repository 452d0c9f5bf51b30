"""Figures shared by the training run, the HF adapter and the comparison toolkit: matplotlib set up headless,
figures written atomically, and the plot of FoLoRA's gates per layer.

matplotlib is an optional heavy backend: imported on first use, never at module level.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from folora_ds.common.files import replace_atomically


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend (no display on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> None:
    """Lay out ``figure``, write it to ``path`` as a 120-dpi PNG (complete or not at all) and close it."""
    figure.tight_layout()
    with replace_atomically(path) as scratch:
        figure.savefig(scratch, dpi=120, format="png")
    pyplot().close(figure)


def plot_gates(layers: Sequence[Mapping[str, Any]], path: Path, *, title: str) -> None:
    """FoLoRA's effective rank Σg / d per layer and input kind (from a run's ``layers`` summaries)."""
    plt = pyplot()
    series: dict[str, list[tuple[int, float, float]]] = {}
    for layer in layers:
        first = layer["members"][0]
        match = re.search(r"\.(\d+)\.", first)  # the block index (layers.N., h.N., blocks.N., ...)
        if match is None:
            continue
        kind = "+".join(member.rsplit(".", 1)[-1] for member in layer["members"])
        series.setdefault(kind, []).append((int(match.group(1)), layer["effective_rank"] / layer["dim"],
                                            layer["attenuated"] / layer["dim"]))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for kind, points in sorted(series.items()):
        points.sort()
        top.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, label=kind)
        bottom.plot([p[0] for p in points], [p[2] for p in points], "o-", ms=3, label=kind)
    top.set_ylabel("effective rank Σg / d")
    bottom.set_ylabel("attenuated directions (g < ½) / d")
    bottom.set_xlabel("decoder layer")
    top.set_title(title, fontsize=9)
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
    top.legend(fontsize=7, ncol=2)
    save_figure(figure, path)

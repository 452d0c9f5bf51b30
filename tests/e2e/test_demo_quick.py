"""The README's main command, quick path: ``scripts/demo.sh --quick`` runs ``folora-ds grid quick`` — the real
SmolLM2, FoLoRA and plain LoRA through the product's path, every measure, the table and both plots. It checks the
pipeline end to end, not the scientific result (a few steps)."""

from __future__ import annotations

import csv
from pathlib import Path

from folora_ds.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_script_runs_the_demo_grid_and_quick_runs_the_quick_one():
    script = (ROOT / "scripts" / "demo.sh").read_text()
    assert "folora-ds grid quick" in script and "folora-ds grid demo" in script


def test_quick_demo_grid_on_the_real_model(tmp_path, capsys):
    assert main(["grid", "quick", "--output", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| plain LoRA | 0.001 | 2 | 1 |" in printed and "| FoLoRA | 0.001 | 2 | 1 |" in printed
    assert "frontier.png" in printed
    with open(tmp_path / "results_runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["label"] for row in rows} == {"plain LoRA", "FoLoRA"}
    for row in rows:
        assert float(row["kl_per_token"]) > 0 and 0 <= float(row["retention"]) <= 1
    assert (tmp_path / "gates.png").read_bytes()[:4] == b"\x89PNG"

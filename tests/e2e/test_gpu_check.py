"""``scripts/gpu_check.sh --cpu``: the GPU check's smoke mode runs every step at small sizes, so the script a GPU
session runs unprepared cannot rot; a failing step is recorded and makes the check fail."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_smoke_mode_runs_every_step_and_writes_the_tables(tmp_path):
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result["steps"]) == {"train", "optimizer", "block", "eigensolve", "statistics"}
    assert not [name for name, entry in result["steps"].items() if "error" in entry]
    train = result["steps"]["train"]["rows"]
    assert train["gated_steps_per_rank"] == [[3] * len(train["gated_steps_per_rank"][0])] and train["bf16"]
    assert {row["k"] for row in result["steps"]["optimizer"]["rows"]} == {8, 16}
    assert result["steps"]["block"]["rows"]["gated_steps"] == [3]  # warm-up + timed steps, every one gated
    for row in result["steps"]["eigensolve"]["rows"]:
        assert row["min_cosine"] > 1 - 1e-6 and row["update_error"] < 0.05 and row["top_k_fallbacks"] == 0
    statistics = result["steps"]["statistics"]["rows"]
    assert set(statistics["model"]) == {"bfloat16", "float32"} and len(statistics["statistics"]) == 2
    assert all(row["gflops"] > 0 and set(row["cost_per_flop_vs_model"]) == {"bfloat16", "float32"}
               for row in statistics["statistics"])
    table = (tmp_path / "result.md").read_text()
    assert "| d | dtype | full s | top-k s |" in table and "gated on every rank" in table
    assert "| d | rows folded | TF32 |" in table


def test_a_failing_step_is_recorded_and_fails_the_check(tmp_path, monkeypatch):
    gpu_check = _gpu_check()
    steps = {"train": ([sys.executable, "-c", "import sys; sys.exit('no GPU here')"], 30),
             "optimizer": ([sys.executable, "-c", "print('no json written')"], 30)}
    monkeypatch.setattr(gpu_check, "_steps", lambda cpu, output: steps)
    result = gpu_check.run_check(True, tmp_path)
    assert "no GPU here" in result["steps"]["train"]["error"]
    assert "optimizer.json" in result["steps"]["optimizer"]["error"]  # a step that wrote no rows failed too
    assert "failed" in (tmp_path / "result.md").read_text()
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--cpu", "--output", str(tmp_path)])
    assert gpu_check.main() == 1


def test_an_eigensolve_step_past_its_limit_keeps_the_sizes_it_finished(tmp_path, monkeypatch):
    gpu_check = _gpu_check()
    row = {"dim": 4096, "dtype": "float32", "full_seconds": 1.0, "top_k_seconds": 0.5, "top_k_warm_seconds": 0.2,
           "speedup": 2.0, "min_cosine": 1.0, "gate_error": 0.0, "update_error": 0.0, "tau_error": 0.0}
    script = (f"import json, pathlib, time; pathlib.Path({str(tmp_path / 'eigensolve.json')!r}).write_text("
              f"json.dumps([{row!r}])); time.sleep(60)")
    monkeypatch.setattr(gpu_check, "_steps", lambda cpu, output: {"eigensolve": ([sys.executable, "-c", script], 3)})
    result = gpu_check.run_check(True, tmp_path)
    entry = result["steps"]["eigensolve"]
    assert "ran past its 3 s limit" in entry["error"] and entry["rows"] == [row]
    assert "| 4096 | float32 | 1.00 | 0.50 |" in (tmp_path / "result.md").read_text()

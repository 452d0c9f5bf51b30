"""``folora-ds train --save-every N / --resume`` and stop signals, through the real command in a subprocess: a
run killed with ``kill -9`` (or stopped by SIGTERM, as SLURM's time limit does) and resumed writes the adapters and
losses of a run never stopped, bit for bit; a signal without checkpoints leaves no half-written output."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from folora_ds.cli import main

SMALL = ["--set", "proxy.num_sequences=8", "--set", "proxy.seq_len=24", "--set", "proxy.batch_size=4",
         "--set", "max_seq_len=64", "--set", "refresh_interval=4", "--set", "lora_rank=4", "--no-progress", "-q"]
STEPS = 24


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "folora_ds.cli", "train", "--steps", str(STEPS), "--batch-size", "4",
            "--calibration-steps", "2", "--output-dir", str(out), *SMALL, *extra]


def _stop_when(out: Path, run: str, stop: signal.Signals, *extra: str) -> subprocess.CompletedProcess:
    """Start the run, and send ``stop`` the moment ``run``'s first checkpoint is complete (its ``latest``)."""
    process = subprocess.Popen(_command(out, "--save-every", "2", *extra), stderr=subprocess.PIPE, text=True)
    latest = out / "checkpoints" / run / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert process.poll() is None, "the run ended before it could be stopped"
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=240)
    return subprocess.CompletedProcess(process.args, process.returncode, "", stderr)


def _resume(out: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(out, "--save-every", "2", "--resume"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _outputs(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    return {"folora_losses": summary["folora"]["train_losses"], "adamw_losses": summary["adamw"]["train_losses"],
            **{name: (out / name / "adapter_model.safetensors").read_bytes()
               for name in ("folora_adapter", "adamw_adapter")}}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = subprocess.run(_command(out), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return _outputs(out)


def test_kill_9_during_folora_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted, capsys):
    out = tmp_path / "run"
    killed = _stop_when(out, "folora", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists() and (out / "checkpoints" / "folora" / "latest").is_file()
    # a resume that would change the run is refused by name, before any model is loaded
    assert main(["train", "--steps", str(STEPS), "--batch-size", "4", "--calibration-steps", "2", "--lr", "5e-3",
                 "--output-dir", str(out), "--resume", *SMALL]) == 2
    error = capsys.readouterr().err
    assert "started with other settings (optimizer.lr: 0.001 then, 0.005 now)" in error, error
    resumed = _resume(out)
    assert "resumed from a checkpoint at folora step" in resumed.stdout
    assert _outputs(out) == uninterrupted
    assert sorted(path.name for path in out.iterdir()) == ["adamw_adapter", "folora_adapter", "gates.png",
                                                          "proxy.jsonl", "summary.json"]  # checkpoints removed


def test_sigterm_during_the_comparison_run_saves_and_resumes_exactly(tmp_path, uninterrupted):
    out = tmp_path / "run"
    stopped = _stop_when(out, "adamw", signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("folora-ds: stopped by SIGTERM after plain LoRA (AdamW) step "), stopped.stderr[-2000:]
    assert "--resume" in last and not (out / "summary.json").exists()
    resumed = _resume(out)
    assert f"folora step {STEPS}, adamw step" in resumed.stdout  # FoLoRA was done: only the comparison went on
    assert _outputs(out) == uninterrupted
    again = _resume(out)  # a requeued job whose run already finished: the summary again, nothing retrained
    assert "relative forgetting ratio" in again.stdout and not (out / "checkpoints").exists()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_without_checkpoints_stops_in_one_line_and_leaves_no_output(tmp_path, stop):
    out = tmp_path / "run"
    process = subprocess.Popen(_command(out), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "proxy.jsonl").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)  # the proxy set is written before calibration and training
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 128 + stop
    lines = [line for line in stderr.strip().splitlines() if "[WARNING]" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"folora-ds: stopped by {stop.name} before a checkpoint"), lines
    assert "partial outputs were removed" in lines[0] and "--save-every" in lines[0]
    assert not out.exists(), "a stopped run leaves no half-written output"


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    arguments = ["train", "--steps", "2", "--output-dir", str(tmp_path / "run"), *SMALL]
    assert main([*arguments, "--resume", "--overwrite"]) == 2
    assert "pass one" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("a run without checkpoints")
    assert main([*arguments, "--resume"]) == 2
    assert "holds no checkpointed run" in capsys.readouterr().err
    assert main([*arguments, "--save-every", "-1"]) == 2
    assert "--save-every" in capsys.readouterr().err

"""A stop signal that reaches one rank of a checkpointed ``folora_ds.training.run`` stops every rank after the same
optimizer step, with one checkpoint; resuming it on the same ranks ends where a run never stopped ends."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from folora_ds.training.interrupts import RunInterrupted, StopSignals
from folora_ds.training.run import RunSettings, run
from tests.testing.ranks import run_ranks

STEPS = 8
STOP_AFTER_STEP = 3
CONFIG = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
          "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
          "folora": {"lora_rank": 4, "refresh_interval": 4, "max_seq_len": 48,
                     "proxy": {"num_sequences": 4, "seq_len": 16, "batch_size": 2}}}


def _settings(out: Path, **changes) -> RunSettings:
    return RunSettings(output_dir=str(out), steps=STEPS, calibration_steps=1, baseline=False, progress=False,
                       save_every=100, **changes)  # checkpoints only when stopped


def _adapter(out: Path) -> bytes:
    return (out / "folora_adapter" / "adapter_model.safetensors").read_bytes()


def _stop_rank_1_only(rank: int, world: int, root: str) -> dict:
    root = Path(root)
    original = StopSignals.stop_requested
    calls = []

    def signalled_after_step(self, device):
        calls.append(1)
        if rank == 1 and len(calls) == STOP_AFTER_STEP:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to this rank only, handled by run()'s handler
        return original(self, device)

    StopSignals.stop_requested = signalled_after_step
    try:
        run(_settings(root / "stopped"), CONFIG)
        stopped = None
    except RunInterrupted as error:
        stopped = (str(error), error.exit_code, error.checkpointed)
    finally:
        StopSignals.stop_requested = original
    latest = (root / "stopped" / "checkpoints" / "folora" / "latest").read_text()
    run(_settings(root / "stopped", resume=True), CONFIG)
    run(_settings(root / "never_stopped"), CONFIG)
    return {"stopped": stopped, "latest": latest, "resumed": _adapter(root / "stopped"),
            "never_stopped": _adapter(root / "never_stopped")}


def test_a_signal_on_one_rank_stops_all_after_the_same_step_and_resumes_exactly(tmp_path):
    results = run_ranks(2, _stop_rank_1_only, str(tmp_path))
    for result in results:  # rank 0 got no signal: it learned of rank 1's through the step's agreement
        message, code, checkpointed = result["stopped"]
        assert f"stopped by SIGTERM after FoLoRA step {STOP_AFTER_STEP} of {STEPS}" in message
        assert code == 128 + signal.SIGTERM and checkpointed
        assert result["latest"] == f"global_step{STOP_AFTER_STEP}"
    assert results[0]["resumed"] == results[0]["never_stopped"]

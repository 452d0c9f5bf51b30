"""Checkpoints of a ``folora-ds train`` run (``--save-every N``, ``--resume``): a crash, a ``kill -9`` or a SLURM
time limit costs at most N optimizer steps, and the resumed run ends with the adapters an uninterrupted run
writes (bit for bit on the same world size; tested through the CLI).

    out/
      checkpoints/
        run.json                                  what the run was started with; --resume must match it
        folora/latest, folora/global_step8/       controller.save_checkpoint: DeepSpeed's files + FoLoRA's state,
                                                  plus progress.json (losses so far, …) and rng/ (each rank's
                                                  random state), written before DeepSpeed writes ``latest``
        folora_result.json                        the FoLoRA run's results, once it finished and was exported
        adamw/latest, adamw/global_step4/         the plain-AdamW comparison run, the same way

Only the newest complete checkpoint of each run is kept (an older one is deleted once a newer one's ``latest`` is
written), so a kill during a save leaves the previous checkpoint. The folder is removed when the run finishes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from folora_ds.common.files import read_json_file, remove_path, replace_atomically, write_json
from folora_ds.controller.checkpoint import resolve_tag
from folora_ds.distributed import comm
from folora_ds.distributed.statistics import raise_if_any

CHECKPOINTS_DIR = "checkpoints"
_RUN_FILE = "run.json"
_PROGRESS_FILE = "progress.json"
_FOLORA_RESULT_FILE = "folora_result.json"
_TAG = re.compile(r"^global_step(\d+)$")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {key: leaf for name, item in value.items() for key, leaf in _flat(item, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): value}


@dataclass(frozen=True)
class RunCheckpoints:
    """The checkpoint folder of one output directory.

    Attributes:
        directory: ``output_dir/checkpoints``.
        every: optimizer steps between checkpoints (0: the run is not checkpointed).
    """

    directory: Path
    every: int

    def started(self) -> bool:
        """Whether a checkpointed run was started here (its ``run.json`` exists)."""
        return (self.directory / _RUN_FILE).is_file()

    def start(self, identity: Mapping[str, Any]) -> None:
        """Record what the run was started with (rank 0 calls it; atomic)."""
        write_json(self.directory / _RUN_FILE, dict(identity))

    def check_identity(self, identity: Mapping[str, Any]) -> None:
        """Raise ValueError naming every setting that differs from the checkpointed run's: a resume continues one
        run (its data order, schedule and statistics), it cannot change it."""
        path = self.directory / _RUN_FILE
        saved = _flat(read_json_file(path, what="checkpointed run settings"))
        now = _flat(_json_round_trip(identity))
        differing = sorted(key for key in saved.keys() | now.keys() if saved.get(key) != now.get(key))
        if differing:
            changes = ", ".join(f"{key}: {saved.get(key)!r} then, {now.get(key)!r} now" for key in differing[:4])
            raise ValueError(f"--resume: the run in {str(self.directory.parent)!r} was started with other settings "
                             f"({changes}{', ...' if len(differing) > 4 else ''}); resume with the same command, or "
                             "start a new run in another --output-dir")

    def latest(self, run: str) -> Path | None:
        """The newest complete checkpoint folder of ``run`` ("folora" / "adamw"), or None."""
        if not (self.directory / run / "latest").is_file():
            return None
        return resolve_tag(self.directory / run, None)

    def progress(self, folder: Path) -> dict[str, Any]:
        """What ``save`` recorded beside the checkpoint in ``folder`` (``step``, ``losses`` and the extras)."""
        return read_json_file(folder / _PROGRESS_FILE, what="checkpoint progress")

    def save(self, run: str, step: int, losses: list[float], extra: Mapping[str, Any],
             save_engine: Callable[[Path, str], Any]) -> Path:
        """Collective: checkpoint ``run`` after optimizer step ``step``: this rank's random state, the progress
        (rank 0), then ``save_engine(directory, tag)`` (DeepSpeed writes ``latest`` last); older checkpoints of
        ``run`` are deleted afterwards. Returns the checkpoint folder."""
        tag = f"global_step{step}"
        folder = self.directory / run / tag
        error = None
        try:
            rng = folder / "rng" / f"rank_{comm.rank():05d}.pt"
            rng.parent.mkdir(parents=True, exist_ok=True)
            with replace_atomically(rng) as scratch:
                torch.save(_random_state(), scratch)
            if comm.rank() == 0:
                write_json(folder / _PROGRESS_FILE, {"step": step, "losses": losses, **extra})
        except OSError as problem:
            error = f"cannot write checkpoint {str(folder)!r}: {problem}"
        raise_if_any(error)
        save_engine(self.directory / run, tag)
        if comm.rank() == 0:
            for older in (self.directory / run).iterdir():
                match = _TAG.match(older.name)
                if match and older.is_dir() and int(match.group(1)) != step:
                    remove_path(older)
        return folder

    def restore_random_state(self, folder: Path) -> None:
        """Put back this rank's random state saved in ``folder`` (dropout then draws as if never stopped)."""
        path = folder / "rng" / f"rank_{comm.rank():05d}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(folder)!r} has no random state for rank {comm.rank()} "
                                    f"({str(path)!r}); was it written with another number of ranks?")
        state = torch.load(path, weights_only=False)
        torch.set_rng_state(state["cpu"])
        if state.get("accelerator") is not None:
            from deepspeed.accelerator import get_accelerator

            get_accelerator().set_rng_state(state["accelerator"])

    def finish_folora(self, result: Mapping[str, Any]) -> None:
        """Record the finished FoLoRA run's results (rank 0): a resume then goes straight to the comparison run."""
        write_json(self.directory / _FOLORA_RESULT_FILE, dict(result))

    def folora_result(self) -> dict[str, Any] | None:
        path = self.directory / _FOLORA_RESULT_FILE
        return read_json_file(path, what="checkpointed FoLoRA result") if path.is_file() else None

    def remove(self) -> None:
        """Delete the checkpoints once the run's outputs are complete (rank 0)."""
        remove_path(self.directory)


def _random_state() -> dict[str, Any]:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    on_device = accelerator.device_name() != "cpu"
    return {"cpu": torch.get_rng_state(), "accelerator": accelerator.get_rng_state() if on_device else None}


def _json_round_trip(value: Any) -> Any:
    return json.loads(json.dumps(value))

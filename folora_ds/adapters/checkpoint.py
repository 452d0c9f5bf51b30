"""Resuming a DeepSpeed engine from a FoLoRA checkpoint: DeepSpeed's files checked and loaded, and the
conversion to DeepSpeed's universal format for a resume on another number of ranks.

The FoLoRA state parts of the same folder are written and read by ``folora_ds.controller.checkpoint``; this module
holds what depends on DeepSpeed's own files and loaders.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from folora_ds.controller.checkpoint import FOLORA_STATE_DIR, check_readable, resolve_tag


def check_deepspeed_files(folder: Path) -> None:
    """Every ``*.pt`` of a checkpoint folder is a complete torch archive (cheap: reads each zip directory).

    Raises:
        ValueError: a truncated or corrupt file, named.
    """
    for path in sorted(folder.rglob("*.pt")):
        check_readable(path)


def refuse_world_size_change(folder: Path, stage: int, world_size: int, universal: bool) -> None:
    """Before loading: a ZeRO 1/2/3 checkpoint saved with another data-parallel world size cannot be loaded
    directly (DeepSpeed fails with a bare assertion); say how to convert it. A checkpoint of ZeRO-0 resumed at
    ZeRO 1/2/3 (or the reverse) is refused: DeepSpeed would restart the Adam moments with only a log line."""
    if universal:
        return
    # zero_pp_rank_<dp>_mp_rank_<tp>_optim_states.pt: one file per data-parallel rank and tensor-parallel rank
    saved_ranks = len({re.search(r"zero_pp_rank_(\d+)", path.name).group(1)
                       for path in folder.glob("*zero_pp_rank_*optim_states.pt")})
    if (stage == 0) != (saved_ranks == 0):  # DeepSpeed would silently start the optimizer state from scratch
        saved = "stage 0" if saved_ranks == 0 else "a ZeRO stage 1-3"
        raise ValueError(f"checkpoint {str(folder)!r} was written at {saved}, this run uses ZeRO stage {stage}: "
                         "DeepSpeed would drop the Adam moments; resume with the stage it was written with")
    if stage == 0:
        return
    if saved_ranks != world_size:
        raise ValueError(
            f"checkpoint {str(folder)!r} holds ZeRO stage-{stage} optimizer state of {saved_ranks} data-parallel "
            f"ranks, this run has {world_size}: DeepSpeed cannot re-partition it directly. Convert it once "
            "with folora_ds.convert_to_universal_checkpoint(directory) (DeepSpeed's ds_to_universal) and "
            'resume with "checkpoint": {"load_universal": true} in the DeepSpeed config; FoLoRA\'s own state is '
            "world-size independent")


def load_engine_checkpoint(engine, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Collective: load DeepSpeed's part of ``folder`` into ``engine``, keeping the gate markers of the
    optimizer's param groups (DeepSpeed's ZeRO-3 universal loader copies group 0's entries into every group).

    Raises:
        ValueError: DeepSpeed could not load it (the folder and DeepSpeed's reason are named).
    """
    markers = [{key: group[key] for key in ("gated", "param_names") if key in group}
               for group in optimizer.param_groups]
    try:
        loaded, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    except (OSError, RuntimeError, AssertionError, EOFError, KeyError) as error:
        raise ValueError(f"DeepSpeed could not load checkpoint {str(folder)!r} ({type(error).__name__}: "
                         f"{error})") from error
    if loaded is None:
        raise ValueError(f"DeepSpeed found no checkpoint in {str(folder)!r}")
    for group, saved in zip(optimizer.param_groups, markers):
        group.update(saved)


def convert_to_universal_checkpoint(directory: str | Path, tag: str | None = None) -> Path:
    """Convert a checkpoint written by ``controller.save_checkpoint`` into DeepSpeed's universal format, so a run
    can resume on another number of ranks at ZeRO 1/2/3 (set ``"checkpoint": {"load_universal": true}``).

    Runs DeepSpeed's ``ds_to_universal`` on ``directory/<tag>`` (``latest`` when None), writing
    ``directory/<tag>_universal`` (with FoLoRA's state copied in) and ``directory/latest_universal``. Not a
    collective: run it once, on one process.

    Returns:
        The universal checkpoint folder.

    Raises:
        FileNotFoundError: no such checkpoint. ValueError: a damaged file. RuntimeError: the conversion failed
        (its output is included).
    """
    source = resolve_tag(directory, tag)
    directory = source.parent
    check_deepspeed_files(source)
    target = directory / f"{source.name}_universal"
    (directory / "latest_universal").unlink(missing_ok=True)  # a stale one must not pass for this conversion
    result = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                             str(source), "--output_folder", str(target), "--inject_missing_state"],
                            capture_output=True, text=True)
    if result.returncode != 0 or not (directory / "latest_universal").is_file():
        raise RuntimeError(f"ds_to_universal failed on {str(source)!r}:\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-3000:]}")
    shutil.rmtree(target / FOLORA_STATE_DIR, ignore_errors=True)
    shutil.copytree(source / FOLORA_STATE_DIR, target / FOLORA_STATE_DIR)
    return target

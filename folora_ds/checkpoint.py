"""Checkpoints: DeepSpeed's own files plus ``folora_state.pt``, checked before anything is loaded.

    ckpt/
      latest                      ← the newest tag (DeepSpeed writes it last)
      global_step40/
        folora_state.pt           ← FoLoRA's state (world-size independent; written by rank 0 first)
        mp_rank_00_model_states.pt, *zero_pp_rank_*_optim_states.pt    ← DeepSpeed's

FoLoRA's state is a file of its own, not DeepSpeed's ``client_state``: a resume reads it (a few MB, no model
weights) and checks the FoLoRA config before DeepSpeed loads anything, so a changed ``lora_rank`` is reported
as such instead of as torch's wall of size mismatches. A missing tag, a truncated file and a checkpoint of
another world size are each reported with the path and what to do.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from folora_ds.distributed import comm

FOLORA_STATE_FILE = "folora_state.pt"


def save_checkpoint(engine, folora_state: dict[str, Any], directory: str | Path, tag: str | None = None) -> Path:
    """Collective: write ``folora_state`` (rank 0) and then the engine's checkpoint into ``directory/tag``.

    ``tag`` defaults to DeepSpeed's ``global_step<N>``. Returns the tag folder.
    """
    from folora_ds.distributed.statistics import raise_if_any
    from folora_ds.outputs import replace_atomically

    tag = tag or f"global_step{engine.global_steps}"
    folder = Path(directory) / tag
    error = None
    if comm.rank() == 0:
        try:
            with replace_atomically(folder / FOLORA_STATE_FILE) as scratch:
                torch.save(folora_state, scratch)
        except OSError as problem:
            error = f"cannot write {str(folder / FOLORA_STATE_FILE)!r}: {problem}"
    raise_if_any(error)  # also the barrier before DeepSpeed writes its files and 'latest'
    engine.save_checkpoint(str(directory), tag=tag)
    return folder


def resolve_tag(directory: str | Path, tag: str | None, *, universal: bool = False) -> Path:
    """The checkpoint folder ``directory/tag``; with ``tag=None`` the one ``latest`` (``latest_universal`` for a
    universal resume) names.

    Raises:
        FileNotFoundError: no such directory, no ``latest`` file, or the named tag folder is missing.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    if tag is None:
        latest = directory / ("latest_universal" if universal else "latest")
        if not latest.is_file():
            raise FileNotFoundError(f"checkpoint directory {str(directory)!r} has no {latest.name!r} file; pass the "
                                    "checkpoint tag")
        tag = latest.read_text().strip()
        if not (directory / tag).is_dir():
            raise FileNotFoundError(f"{str(latest)!r} names tag {tag!r}, but {str(directory / tag)!r} does not "
                                    "exist (deleted or not yet written); pass an existing tag")
    if not (directory / tag).is_dir():
        raise FileNotFoundError(f"checkpoint {str(directory / tag)!r} does not exist")
    return directory / tag


def read_folora_state(folder: Path) -> dict[str, Any]:
    """FoLoRA's state from a checkpoint folder.

    Raises:
        ValueError: the folder holds no FoLoRA state, or the file is truncated or corrupt (named).
    """
    path = folder / FOLORA_STATE_FILE
    if not path.is_file():
        raise ValueError(f"{str(folder)!r} holds no FoLoRA checkpoint ({FOLORA_STATE_FILE} is missing); was it "
                         "written by controller.save_checkpoint?")
    _check_readable(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch.load raises many types for a damaged file; the path is what matters
        raise ValueError(f"checkpoint file {str(path)!r} cannot be read ({type(error).__name__}: {error})") from error


def check_deepspeed_files(folder: Path) -> None:
    """Every ``*.pt`` of a checkpoint folder is a complete torch archive (cheap: reads each zip directory).

    Raises:
        ValueError: a truncated or corrupt file, named.
    """
    for path in sorted(folder.rglob("*.pt")):
        _check_readable(path)


def _check_readable(path: Path) -> None:
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"checkpoint file {str(path)!r} is truncated or corrupt ({error}); restore it or resume "
                         "from an earlier tag") from error


def refuse_world_size_change(folder: Path, stage: int, world_size: int, universal: bool) -> None:
    """Before loading: a ZeRO 1/2/3 checkpoint saved with another data-parallel world size cannot be loaded
    directly (DeepSpeed fails with a bare assertion); say how to convert it. A checkpoint of ZeRO-0 resumed at
    ZeRO 1/2/3 (or the reverse) is refused: DeepSpeed would restart the Adam moments with only a log line."""
    if universal:
        return
    saved_ranks = len(list(folder.glob("*zero_pp_rank_*optim_states.pt")))
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
    shutil.copy2(source / FOLORA_STATE_FILE, target / FOLORA_STATE_FILE)
    return target

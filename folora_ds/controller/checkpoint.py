"""Checkpoints: DeepSpeed's own files plus FoLoRA's state, one file per rank, checked before anything is loaded.

    ckpt/
      latest                      ← the newest tag (DeepSpeed writes it last)
      global_step40/
        folora_state/rank_00000_of_00003.pt …   ← each rank's part (its owned inputs' statistics and solver
                                                  state, plus the small common part), written before DeepSpeed's
        mp_rank_00_model_states.pt, *zero_pp_rank_*_optim_states.pt    ← DeepSpeed's

FoLoRA's state is not DeepSpeed's ``client_state``: a resume reads it and checks the FoLoRA config before
DeepSpeed loads anything, so a changed ``lora_rank`` is reported as such instead of as torch's wall of size
mismatches. Each rank writes only the (d, d) statistics it owns, so no rank ever holds all of them (at 70B they
are ~1 TB together); a resume on any world size memory-maps every part and copies in only the inputs it owns
now. A missing tag or part and a truncated part are reported here with the path and what to do; DeepSpeed's own
files, the world-size check and the universal conversion are ``folora_ds.adapters.checkpoint``.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from folora_ds.common.files import replace_atomically
from folora_ds.distributed import comm
from folora_ds.distributed.statistics import raise_if_any
from folora_ds.method.state import merge_state_parts

FOLORA_STATE_DIR = "folora_state"


def _part_name(rank: int, world: int) -> str:
    return f"rank_{rank:05d}_of_{world:05d}.pt"


def save_checkpoint(engine, folora_state: dict[str, Any], directory: str | Path, tag: str | None = None) -> Path:
    """Collective: write this rank's part of FoLoRA's state (``controller.state_dict()``) and then the engine's
    checkpoint into ``directory/tag``.

    ``tag`` defaults to DeepSpeed's ``global_step<N>``. Returns the tag folder.
    """
    tag = tag or f"global_step{engine.global_steps}"
    folder = Path(directory) / tag
    path = folder / FOLORA_STATE_DIR / _part_name(*folora_state["part"])
    error = None
    if comm.rank() == 0 and path.parent.is_dir():  # parts of an earlier save of this tag (maybe another world)
        shutil.rmtree(path.parent, ignore_errors=True)
    comm.barrier()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replace_atomically(path) as scratch:
            torch.save(folora_state, scratch)
    except OSError as problem:
        error = f"cannot write {str(path)!r}: {problem}"
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
    """FoLoRA's whole state from a checkpoint folder: every rank's part, memory-mapped (only the tensors a rank
    then copies are read from disk) and merged.

    Raises:
        ValueError: the folder holds no FoLoRA state, a part is missing, truncated or corrupt (named).
    """
    parts_dir = folder / FOLORA_STATE_DIR
    paths = sorted(parts_dir.glob("rank_*_of_*.pt")) if parts_dir.is_dir() else []
    if not paths:
        raise ValueError(f"{str(folder)!r} holds no FoLoRA checkpoint ({FOLORA_STATE_DIR}/ is missing or empty); "
                         "was it written by controller.save_checkpoint?")
    worlds = {int(path.stem.rsplit("_of_", 1)[1]) for path in paths}
    if len(worlds) > 1:
        raise ValueError(f"{str(parts_dir)!r} mixes FoLoRA state parts of runs with {sorted(worlds)} ranks; keep only "
                         "the parts of the save you resume from")
    world = worlds.pop()
    missing = [_part_name(rank, world) for rank in range(world) if not (parts_dir / _part_name(rank, world)).is_file()]
    if missing:
        raise ValueError(f"FoLoRA state part {str(parts_dir / missing[0])!r} is missing ({len(missing)} of {world}); "
                         "restore it or resume from an earlier tag")
    parts = []
    for path in paths:
        check_readable(path)
        try:
            parts.append(torch.load(path, map_location="cpu", weights_only=False, mmap=True))
        except Exception as error:  # torch.load raises many types for a damaged file; the path is what matters
            raise ValueError(f"checkpoint file {str(path)!r} cannot be read ({type(error).__name__}: {error})"
                             ) from error
    return merge_state_parts(parts)


def check_readable(path: Path) -> None:
    """Raise ValueError naming ``path`` unless it is a complete torch archive (cheap: reads the zip directory)."""
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"checkpoint file {str(path)!r} is truncated or corrupt ({error}); restore it or resume "
                         "from an earlier tag") from error

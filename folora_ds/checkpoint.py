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
now. A missing tag or part, a truncated file and a checkpoint of another world size are each reported with the
path and what to do.
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

FOLORA_STATE_DIR = "folora_state"


def _part_name(rank: int, world: int) -> str:
    return f"rank_{rank:05d}_of_{world:05d}.pt"


def save_checkpoint(engine, folora_state: dict[str, Any], directory: str | Path, tag: str | None = None) -> Path:
    """Collective: write this rank's part of FoLoRA's state (``controller.state_dict()``) and then the engine's
    checkpoint into ``directory/tag``.

    ``tag`` defaults to DeepSpeed's ``global_step<N>``. Returns the tag folder.
    """
    from folora_ds.distributed.statistics import raise_if_any
    from folora_ds.outputs import replace_atomically

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
    from folora_ds.controller import merge_state_parts

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
        _check_readable(path)
        try:
            parts.append(torch.load(path, map_location="cpu", weights_only=False, mmap=True))
        except Exception as error:  # torch.load raises many types for a damaged file; the path is what matters
            raise ValueError(f"checkpoint file {str(path)!r} cannot be read ({type(error).__name__}: {error})"
                             ) from error
    return merge_state_parts(parts)


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
    shutil.rmtree(target / FOLORA_STATE_DIR, ignore_errors=True)
    shutil.copytree(source / FOLORA_STATE_DIR, target / FOLORA_STATE_DIR)
    return target

"""Run outputs that appear only when complete, and output directories that never mix two runs.

Every file or folder a run leaves (``proxy.jsonl``, adapters, ``summary.json``) is written beside its final name
and renamed into place when complete, so an interrupted run never leaves a half-written file under a real name.
A non-empty output directory is refused unless the user asks to overwrite it: a new run's ``proxy.jsonl`` beside
an earlier run's adapters and summary would pass for one run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_PARTIAL_PREFIX = ".partial-"


class OutputDirectoryError(ValueError):
    """The output directory holds another run's files."""


def refuse_other_runs(directory: Path, *, overwrite: bool, inputs: tuple[str | Path | None, ...] = ()) -> None:
    """Refuse a non-empty output directory unless ``overwrite`` (read-only: every rank may call it), and one that
    holds one of the run's ``inputs`` (overwriting would delete it).

    Raises:
        OutputDirectoryError: the path is a file, a non-empty directory without ``overwrite``, or holds an input.
    """
    if directory.exists() and not directory.is_dir():
        raise OutputDirectoryError(f"output directory {str(directory)!r} is a file")
    for path in (Path(p).resolve() for p in inputs if p is not None):
        if path == directory.resolve() or directory.resolve() in path.parents:
            raise OutputDirectoryError(f"output directory {str(directory)!r} holds the run's input {str(path)!r}; "
                                       "choose another --output-dir")
    if directory.is_dir() and not overwrite:
        found = sorted(entry.name for entry in directory.iterdir())
        if found:
            raise OutputDirectoryError(
                f"output directory {str(directory)!r} is not empty ({', '.join(found[:4])}"
                f"{', ...' if len(found) > 4 else ''}); pass --overwrite to replace it or choose another --output-dir")


def clear_output_directory(directory: Path) -> None:
    """Create ``directory`` empty (its earlier content removed). Call on one rank only."""
    if directory.is_dir():
        for entry in directory.iterdir():
            _remove(entry)
    directory.mkdir(parents=True, exist_ok=True)


def save_adapter(model, directory: Path) -> None:
    """Collective: rank 0 writes ``model``'s peft adapter to ``directory`` (ZeRO-3-partitioned adapter weights
    gathered for it; the frozen base is not); the folder appears complete or not at all."""
    from folora_ds.distributed import comm
    from folora_ds.distributed.statistics import raise_if_any

    trainable = [param for param in model.parameters() if param.requires_grad]
    error = None
    with comm.gathered(trainable):
        if comm.rank() == 0:
            try:
                with replace_atomically(Path(directory)) as scratch:
                    model.save_pretrained(str(scratch))
            except OSError as problem:
                error = f"cannot write the adapter to {str(directory)!r}: {problem}"
    raise_if_any(error)  # also the barrier: every rank waits for the write


@contextlib.contextmanager
def replace_atomically(target: Path) -> Iterator[Path]:
    """Yield a scratch path beside ``target`` (file or folder) to write; on success it replaces ``target``.

    On an error the scratch is removed and ``target`` is left as it was. The scratch name is unique to this
    writer (process id and a random tag before the name, so the suffix that picks a file format stays), so two
    processes writing the same target — two grid workers sharing an output folder — never remove each other's
    scratch; the last to finish wins. A file is replaced with ``os.replace``, so a reader always finds either the
    old or the new file, never none; a folder is removed first and renamed in (POSIX cannot swap folders whole).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_scratches(target)
    scratch = target.with_name(f"{_PARTIAL_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{target.name}")
    try:
        yield scratch
        if scratch.is_dir() and not scratch.is_symlink():
            _remove(target)
            scratch.rename(target)
        else:
            os.replace(scratch, target)
    except BaseException:
        _remove(scratch)
        raise


def _remove_abandoned_scratches(target: Path) -> None:
    """Remove the scratches of ``target`` that writers killed mid-write left behind (their process is gone; same
    host only: a live process's scratch, or one whose name does not parse, is left alone)."""
    for scratch in target.parent.glob(f"{_PARTIAL_PREFIX}*-*-{target.name}"):
        pid = scratch.name[len(_PARTIAL_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _remove(scratch)
        except PermissionError:  # alive, another user's
            pass


@contextlib.contextmanager
def claimed(lock: Path, *, wait: bool = False) -> Iterator[bool]:
    """Yield whether this process holds the exclusive claim ``lock`` (a file; created if missing) for the body;
    with ``wait``, block until it does (then always True).

    The claim is an advisory ``flock`` on the open file: the kernel drops it when the holder exits, however it
    exits, so a killed worker never leaves a claim behind and no liveness check is needed. Two grid workers sharing
    an output folder claim a run before training it; the one that finds it held moves on. The file stays (removing
    it while another process has it open would let a third claim a different inode). Claims hold between the
    processes of one host, and across hosts only on a file system with working ``flock`` (NFSv4, Lustre mounted with
    ``-o flock``); where the file system refuses ``flock`` a warning says so and the body runs unclaimed.
    """
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    locked = False
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            held = locked = True
        except BlockingIOError:
            held = False
        except OSError as problem:  # ENOSYS/EOPNOTSUPP/ENOLCK: no flock on this file system
            warnings.warn(f"cannot claim {str(lock)!r} ({problem}); running unclaimed: do not share this folder "
                          "between workers", stacklevel=3)
            held = True
        yield held
    finally:
        if locked:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def write_json(target: Path, value: Any) -> None:
    """Write ``value`` as indented JSON to ``target``, atomically."""
    with replace_atomically(target) as scratch:
        scratch.write_text(json.dumps(value, indent=2))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()

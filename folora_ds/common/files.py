"""Files the package reads and writes: JSON and JSONL with errors naming the file (and line), outputs that appear
only when complete (written beside their name, renamed in), and per-file claims between processes.

Every file or folder a run leaves (``proxy.jsonl``, adapters, ``summary.json``, checkpoint parts) is written beside
its final name and renamed into place when complete, so an interrupted run never leaves a half-written file under a
real name. Pure Python: imports nothing of folora_ds, so every room may use it.
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


def read_json_file(path: str | Path, *, what: str) -> Any:
    """The JSON value in ``path``.

    Raises:
        FileNotFoundError: ``"{what} '{path}' does not exist"``.
        ValueError: ``"{what} '{path}': not valid JSON (line L, column C: ...)"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {str(path)!r}: not valid JSON (line {error.lineno}, column {error.colno}: "
                         f"{error.msg})") from error


def read_jsonl_objects(path: Path, *, what: str) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for every non-blank line of ``path``.

    Raises:
        ValueError: ``"{what} '{path}' line N: ..."`` for a line that is not UTF-8, not valid JSON or not a JSON
            object.
    """
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{what} {str(path)!r} line {number}: not UTF-8 text (byte {raw[error.start]:#04x} "
                                 f"at column {error.start + 1}); save the file as UTF-8") from error
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{what} {str(path)!r} line {number}: not valid JSON ({error.msg}, column "
                                 f"{error.colno})") from error
            if not isinstance(row, dict):
                raise ValueError(f"{what} {str(path)!r} line {number}: expected a JSON object, got "
                                 f"{type(row).__name__}")
            yield number, row


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
            remove_path(target)
            scratch.rename(target)
        else:
            os.replace(scratch, target)
    except BaseException:
        remove_path(scratch)
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
            remove_path(scratch)
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


def remove_path(path: Path) -> None:
    """Remove a file, a link or a folder tree; nothing if absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_safetensors(path: Path, *, what: str) -> None:
    """Raise ValueError naming ``path`` when it is not a complete safetensors file: its header must parse and
    every tensor's bytes must lie inside the file (a copy cut short fails here, in milliseconds, not minutes later
    inside the loader)."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            header_bytes = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_bytes <= 0 or 8 + header_bytes > size:
                raise ValueError("the header runs past the end of the file")
            header = json.loads(handle.read(header_bytes))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {str(path)!r} is not a safetensors file (its header is not JSON); the file is "
                         "damaged") from error
    except ValueError as error:
        raise ValueError(f"{what} {str(path)!r} is damaged or truncated ({error}; {size} bytes)") from error
    data = size - 8 - header_bytes
    for name, entry in header.items():
        if name != "__metadata__" and int(entry["data_offsets"][1]) > data:
            raise ValueError(f"{what} {str(path)!r} is truncated: tensor {name!r} ends at byte "
                             f"{int(entry['data_offsets'][1])} of its data, the file holds {data}")

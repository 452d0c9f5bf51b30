"""Output directories that never mix two runs, and never lose the previous one to a run that fails.

A non-empty output directory is refused unless the user asks to overwrite it: a new run's ``proxy.jsonl`` beside
an earlier run's adapters and summary would pass for one run. With ``--overwrite`` the previous run is moved aside
(``previous_run_kept``) and deleted only once the new run has finished; a run that fails puts it back::

    out/a (previous run) ──move──► out/.a.previous-<pid> ──(new run succeeds, or checkpoints)──► deleted
                                                        └─(new run fails before that)────────► moved back to out/a

(Files appear complete or not at all: ``folora_ds.common.files.replace_atomically``.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from folora_ds.common.files import remove_path


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


class KeptRun:
    """What ``previous_run_kept`` yields: ``commit()`` once the new run has something worth keeping (its first
    checkpoint) deletes the previous run at once, and from then on a failure leaves the directory as it is, so
    ``--resume`` can continue from the checkpoint."""

    def __init__(self, aside: Path | None) -> None:
        self.aside = aside
        self.committed = False

    def commit(self) -> None:
        if not self.committed and self.aside is not None:
            remove_path(self.aside)
        self.committed = True


@contextlib.contextmanager
def previous_run_kept(directory: Path, *, active: bool = True) -> Iterator[KeptRun]:
    """Run the body in an empty ``directory``: a previous run's files are moved aside to a hidden sibling first,
    deleted when the body finishes (or commits), and moved back when it raises before committing — an exception,
    Ctrl-C or SIGTERM turned into one. The new run's partial files are removed then too: a failed run leaves no
    half-written output (a directory it created is removed, one that was empty stays empty). Only the rank with
    ``active`` moves files (call it on every rank; the others just run the body and commit nothing). A
    ``kill -9`` leaves the previous run in the sibling, named in no message but ``.<name>.previous-<pid>``.
    """
    if not active:
        yield KeptRun(None)
        return
    aside = directory.with_name(f".{directory.name}.previous-{os.getpid()}")
    existed = directory.is_dir()
    moved = existed and any(directory.iterdir())
    if moved:
        remove_path(aside)
        directory.rename(aside)
    directory.mkdir(parents=True, exist_ok=True)
    kept = KeptRun(aside if moved else None)
    try:
        yield kept
    except BaseException:
        if not kept.committed:
            remove_path(directory)
            if moved:
                aside.rename(directory)
            elif existed:
                directory.mkdir()
        raise
    kept.commit()

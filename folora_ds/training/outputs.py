"""Output directories that never mix two runs, and never lose the previous one to a run that fails.

A non-empty output directory is refused unless the user asks to overwrite it: a new run's ``proxy.jsonl`` beside
an earlier run's adapters and summary would pass for one run. With ``--overwrite`` the previous run is moved aside
(``previous_run_kept``) and deleted only once the new run has finished; a run that fails puts it back::

    out/a (previous run) ──move──► out/.a.previous-<pid> ──(new run succeeds)──► deleted
                                                        └─(new run fails)────► moved back to out/a

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


@contextlib.contextmanager
def previous_run_kept(directory: Path, *, active: bool = True) -> Iterator[None]:
    """Run the body in an empty ``directory``: a previous run's files are moved aside to a hidden sibling first,
    deleted when the body finishes, and moved back (the new run's partial files removed) when it raises — an
    exception, Ctrl-C or SIGTERM turned into one. Only the rank with ``active`` moves files (call it on every
    rank; the others just run the body). A ``kill -9`` leaves the previous run in the sibling, named in no
    message but ``.<name>.previous-<pid>``.
    """
    if not active:
        yield
        return
    aside = directory.with_name(f".{directory.name}.previous-{os.getpid()}")
    moved = directory.is_dir() and any(directory.iterdir())
    if moved:
        remove_path(aside)
        directory.rename(aside)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if moved:
            remove_path(directory)
            aside.rename(directory)
        raise
    if moved:
        remove_path(aside)

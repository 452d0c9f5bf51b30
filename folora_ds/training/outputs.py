"""Output directories that never mix two runs.

A non-empty output directory is refused unless the user asks to overwrite it: a new run's ``proxy.jsonl`` beside
an earlier run's adapters and summary would pass for one run. (Files appear complete or not at all:
``folora_ds.common.files.replace_atomically``.)
"""

from __future__ import annotations

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


def clear_output_directory(directory: Path) -> None:
    """Create ``directory`` empty (its earlier content removed). Call on one rank only."""
    if directory.is_dir():
        for entry in directory.iterdir():
            remove_path(entry)
    directory.mkdir(parents=True, exist_ok=True)

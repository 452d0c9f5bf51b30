"""Reading JSONL files line by line, with errors that name the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def read_jsonl_objects(path: Path, *, what: str) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for every non-blank line of ``path``.

    Raises:
        ValueError: ``"{what} '{path}' line N: ..."`` for a line that is not valid JSON or not a JSON object.
    """
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
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

"""A grid's run records kept apart from its folder: what a finished run measured, without its adapters.

A grid folder (``<output>/runs/<slug>/``) holds each run's adapters (megabytes per step) beside its record: the
``train.json`` that says what it was made with and how training went, and one ``step<N>/evaluation.json`` per
measured step (kilobytes). The records alone are what the report reads (``rows.collect_rows``) and what decides
that a run is finished (``rows.is_complete``), so a folder of records can be committed next to the results it
produced: a fresh clone rebuilds the tables, CSV and plots with ``--report-only``, and a grid too long for one
machine's session resumes on the next one without redoing its finished runs (``folora-ds grid SPEC --output DIR
--records DIR``).

A records folder is ``<records>/<slug>/train.json`` and ``<records>/<slug>/step<N>/evaluation.json``: the grid
folder's layout less the adapters. Runs brought in from records have no adapters, so what reloads adapters
(``--lost-questions``, ``--directions``, ``--probe-kl``) names them before loading any model
(``rows.saved_adapters``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from folora_ds.common.files import replace_atomically
from folora_ds.toolkit.grid.rows import is_complete
from folora_ds.toolkit.grid.spec import GridRun, GridSpec

_log = logging.getLogger(__name__)


def known_runs(spec: GridSpec) -> dict[str, GridRun]:
    """Every run ``spec`` can make, by slug: its concrete runs, and each ``"lrs": "best"`` entry at every rate
    its sweep can choose (the rates of the concrete runs with its label and method)."""
    runs = {run.slug(spec.settings): run for run in spec.runs}
    for entry in spec.best:
        rates = {run.lr for run in spec.runs if run.label == entry.label and run.method == entry.method}
        runs |= {run.slug(spec.settings): run for lr in sorted(rates) for run in entry.runs(lr)}
    return runs


def import_records(spec: GridSpec, records_dir: str | Path, output_dir: str | Path) -> list[str]:
    """Copy into ``output_dir/runs`` every record in ``records_dir`` that is a finished run of ``spec`` made with
    today's settings and not already finished there; returns their slugs.

    Records of other runs (another grid, other settings, a changed default) are left out and counted in a
    warning, never mixed in.

    Raises:
        FileNotFoundError: ``records_dir`` is not a folder.
    """
    records_dir, runs_dir = Path(records_dir), Path(output_dir) / "runs"
    if not records_dir.is_dir():
        raise FileNotFoundError(f"--records {str(records_dir)!r} is not a folder of grid run records")
    runs = known_runs(spec)
    imported, foreign = [], []
    for record in sorted(path for path in records_dir.iterdir() if path.is_dir()):
        run = runs.get(record.name)
        if run is None or not is_complete(run, record, spec.settings):
            foreign.append(record.name)
            continue
        if is_complete(run, runs_dir / record.name, spec.settings):
            continue
        runs_dir.mkdir(parents=True, exist_ok=True)
        with replace_atomically(runs_dir / record.name) as scratch:
            _copy_record(run, record, scratch)
        imported.append(record.name)
    if foreign:
        _log.warning("%d record(s) in %s are no finished run of this grid with today's settings (first: %s); "
                     "left out", len(foreign), records_dir, foreign[0])
    _log.info("%d finished run(s) brought in from %s", len(imported), records_dir)
    return imported


def export_records(spec: GridSpec, output_dir: str | Path, records_dir: str | Path) -> list[str]:
    """Write the record of every finished run of ``spec`` in ``output_dir`` to ``records_dir`` (replacing an
    older record of the same run); returns their slugs."""
    runs_dir, records_dir = Path(output_dir) / "runs", Path(records_dir)
    exported = []
    for slug, run in sorted(known_runs(spec).items()):
        if not is_complete(run, runs_dir / slug, spec.settings):
            continue
        if _same_record(run, runs_dir / slug, records_dir / slug):  # kept as is: workers finishing together
            exported.append(slug)                                   # do not race to replace it
            continue
        records_dir.mkdir(parents=True, exist_ok=True)
        with replace_atomically(records_dir / slug) as scratch:
            _copy_record(run, runs_dir / slug, scratch)
        exported.append(slug)
    _log.info("%d run record(s) written to %s", len(exported), records_dir)
    return exported


def _record_files(run: GridRun) -> list[str]:
    return ["train.json"] + [f"step{steps}/evaluation.json" for steps in run.steps]


def _same_record(run: GridRun, source: Path, target: Path) -> bool:
    """Whether ``target`` already holds ``source``'s record byte for byte."""
    return all((target / name).is_file() and (target / name).read_bytes() == (source / name).read_bytes()
               for name in _record_files(run))


def _copy_record(run: GridRun, source: Path, target: Path) -> None:
    """``source``'s ``train.json`` and ``step<N>/evaluation.json`` (every step of ``run``) into a new ``target``."""
    for name in _record_files(run):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, target / name)

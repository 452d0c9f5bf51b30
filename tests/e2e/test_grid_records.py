"""``folora-ds grid --records``: a grid's run records kept apart from its folder (committed beside the results)
bring its finished runs into a fresh folder, so the report is rebuilt and the grid resumes without training them
again; records of other runs are left out; what needs adapters names the runs that came without."""

from __future__ import annotations

import json
import logging

import pytest

from folora_ds.cli import main
from folora_ds.toolkit.grid import collect_rows, export_records, import_records, load_spec, run_grid
from folora_ds.toolkit.grid import runner as grid_runner  # where run_grid looks up train_run, evaluate_checkpoint

SETTINGS = {"model": "tiny-llama", "batch_size": 4, "calibration_steps": 2, "target_modules": ["q_proj"],
            "proxy": {"num_sequences": 8, "seq_len": 12, "batch_size": 4},
            "evaluation": {"test_records": 3, "question_records": 4, "heldout_passages": 2, "max_length": 32,
                           "max_new_tokens": 3}}
RUNS = [{"label": "plain LoRA", "method": "lora", "lrs": [1e-4, 2e-2], "seeds": [0], "steps": [1, 2]},
        {"label": "plain LoRA", "method": "lora", "lrs": "best", "seeds": [1], "steps": [1, 2]}]


def _spec_file(tmp_path, runs=RUNS):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"settings": SETTINGS, "runs": runs}))
    return path


def test_records_rebuild_the_report_and_resume_a_grid_in_a_fresh_folder(tmp_path, monkeypatch, caplog, capsys):
    spec_file = _spec_file(tmp_path)
    records = tmp_path / "records"
    assert main(["grid", str(spec_file), "--output", str(tmp_path / "first"), "--records", str(records),
                 "--no-progress"]) == 0
    spec = load_spec(spec_file)
    rows = collect_rows(spec, tmp_path / "first")
    assert len(rows) == 6  # two sweep rates and the best-rate seed, two steps each
    written = sorted(path.relative_to(records).as_posix() for path in records.rglob("*") if path.is_file())
    slugs = sorted({row["slug"] for row in rows})
    assert written == sorted(f"{slug}/{name}" for slug in slugs
                             for name in ("train.json", "step1/evaluation.json", "step2/evaluation.json"))

    stamps = {path: path.stat().st_ino for path in records.rglob("*.json")}  # a replaced file is a new inode
    assert export_records(spec, tmp_path / "first", records) == slugs  # an unchanged record is left as it is
    assert {path: path.stat().st_ino for path in records.rglob("*.json")} == stamps

    def refuse(*args, **kwargs):
        raise AssertionError("a run with a record was trained again")

    monkeypatch.setattr(grid_runner, "train_run", refuse)
    monkeypatch.setattr(grid_runner, "evaluate_checkpoint", refuse)
    fresh = tmp_path / "fresh"
    assert main(["grid", str(spec_file), "--output", str(fresh), "--records", str(records), "--report-only"]) == 0
    assert collect_rows(spec, fresh) == rows
    assert "| plain LoRA |" in (fresh / "results.md").read_text()
    assert run_grid(spec, fresh, progress=False) == rows  # resumes: nothing left to train

    # what reloads adapters names the runs whose record came without them, before any model is loaded
    monkeypatch.setattr(grid_runner.SharedArtifacts, "__init__", refuse)
    for command in ("--lost-questions", "--directions", "--probe-kl"):
        capsys.readouterr()
        assert main(["grid", str(spec_file), "--output", str(fresh), command, "--no-progress"]) == 2
        assert f"run {slugs[0]} has no adapter at step " in capsys.readouterr().err

    # records of another grid's runs (here: other steps) are left out, with a warning, not mixed in
    other = load_spec(_spec_file(tmp_path, [{**RUNS[0], "steps": [2]}]))
    monkeypatch.setattr(logging.getLogger("folora_ds"), "propagate", True)  # the CLI above kept it to itself
    with caplog.at_level(logging.WARNING):
        assert import_records(other, records, tmp_path / "other") == []
    assert "3 record(s)" in caplog.text and collect_rows(other, tmp_path / "other") == []
    assert export_records(other, tmp_path / "other", tmp_path / "none") == []

    # an already finished run in the folder is kept; only the missing ones are brought in
    partial = tmp_path / "partial"
    (partial / "runs").mkdir(parents=True)
    (fresh / "runs" / slugs[0]).rename(partial / "runs" / slugs[0])
    assert import_records(spec, records, partial) == slugs[1:]


def test_a_records_path_that_is_a_file_is_named(tmp_path):
    spec = load_spec(_spec_file(tmp_path))
    (tmp_path / "records").write_text("not a folder")
    with pytest.raises(FileNotFoundError, match="is not a folder of grid run records"):
        import_records(spec, tmp_path / "records", tmp_path / "grid")

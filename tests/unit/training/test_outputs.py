"""An output directory never mixes two runs."""

from __future__ import annotations

import pytest

from folora_ds.training.outputs import OutputDirectoryError, clear_output_directory, refuse_other_runs


def test_non_empty_output_directories_are_refused_unless_overwritten(tmp_path):
    refuse_other_runs(tmp_path / "new", overwrite=False)  # missing is fine
    (tmp_path / "run").mkdir()
    refuse_other_runs(tmp_path / "run", overwrite=False)  # empty is fine
    (tmp_path / "run" / "summary.json").write_text("{}")
    with pytest.raises(OutputDirectoryError, match="not empty \\(summary.json\\).*--overwrite"):
        refuse_other_runs(tmp_path / "run", overwrite=False)
    refuse_other_runs(tmp_path / "run", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirectoryError, match="is a file"):
        refuse_other_runs(tmp_path / "file", overwrite=True)


def test_clearing_removes_every_earlier_output(tmp_path):
    (tmp_path / "run" / "folora_adapter").mkdir(parents=True)
    (tmp_path / "run" / "folora_adapter" / "adapter_model.safetensors").write_text("x")
    (tmp_path / "run" / "summary.json").write_text("{}")
    clear_output_directory(tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []

"""An output directory never mixes two runs."""

from __future__ import annotations

import pytest

from folora_ds.training.outputs import OutputDirectoryError, previous_run_kept, refuse_other_runs


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


def _previous_run(directory):
    (directory / "folora_adapter").mkdir(parents=True)
    (directory / "folora_adapter" / "adapter_model.safetensors").write_text("x")
    (directory / "summary.json").write_text("{}")


def test_the_previous_run_is_deleted_only_once_the_new_run_finished(tmp_path):
    _previous_run(tmp_path / "run")
    with previous_run_kept(tmp_path / "run"):
        assert list((tmp_path / "run").iterdir()) == []  # the new run writes into an empty directory
        assert any(entry.name.startswith(".run.previous-") for entry in tmp_path.iterdir())  # the old one aside
        (tmp_path / "run" / "summary.json").write_text('{"new": 1}')
    assert [entry.name for entry in tmp_path.iterdir()] == ["run"]
    assert (tmp_path / "run" / "summary.json").read_text() == '{"new": 1}'


@pytest.mark.parametrize("failure", [ValueError("bad data"), KeyboardInterrupt()])
def test_a_failed_run_puts_the_previous_run_back(tmp_path, failure):
    _previous_run(tmp_path / "run")
    with pytest.raises(type(failure)), previous_run_kept(tmp_path / "run"):
        (tmp_path / "run" / "proxy.jsonl").write_text("partial")
        raise failure
    assert [entry.name for entry in tmp_path.iterdir()] == ["run"]
    assert sorted(entry.name for entry in (tmp_path / "run").iterdir()) == ["folora_adapter", "summary.json"]


def test_other_ranks_and_fresh_directories_move_nothing(tmp_path):
    _previous_run(tmp_path / "run")
    with previous_run_kept(tmp_path / "run", active=False):
        assert (tmp_path / "run" / "summary.json").exists()
    with previous_run_kept(tmp_path / "new"):
        assert (tmp_path / "new").is_dir()
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["new", "run"]


@pytest.mark.parametrize("existed", [True, False])
def test_a_failed_fresh_run_leaves_no_partial_output(tmp_path, existed):
    if existed:
        (tmp_path / "run").mkdir()
    with pytest.raises(KeyboardInterrupt), previous_run_kept(tmp_path / "run"):
        (tmp_path / "run" / "proxy.jsonl").write_text("partial")
        raise KeyboardInterrupt
    assert [entry.name for entry in tmp_path.iterdir()] == (["run"] if existed else [])
    assert not existed or list((tmp_path / "run").iterdir()) == []


def test_a_committed_run_deletes_the_previous_one_and_survives_a_later_failure(tmp_path):
    """After its first checkpoint the new run is the one worth keeping: a failure leaves it for --resume."""
    _previous_run(tmp_path / "run")
    with pytest.raises(ValueError), previous_run_kept(tmp_path / "run") as kept:
        (tmp_path / "run" / "checkpoints").mkdir()
        kept.commit()
        assert [entry.name for entry in tmp_path.iterdir()] == ["run"]  # the previous run is gone at once
        raise ValueError("a later failure")
    assert [entry.name for entry in (tmp_path / "run").iterdir()] == ["checkpoints"]

"""Files appear only when complete; claims are held by one process at a time and freed when it dies."""

from __future__ import annotations

import pytest

from folora_ds.common.files import (
    check_safetensors,
    claimed,
    read_json_file,
    read_jsonl_objects,
    replace_atomically,
    write_json,
)


def test_a_failed_write_leaves_the_previous_file_and_no_scratch(tmp_path):
    target = tmp_path / "summary.json"
    write_json(target, {"run": 1})
    with pytest.raises(RuntimeError, match="interrupted"), replace_atomically(target) as scratch:
        scratch.write_text('{"run": 2, "trunc')
        raise RuntimeError("interrupted")
    assert target.read_text() == '{\n  "run": 1\n}'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["summary.json"]


def test_a_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with replace_atomically(target) as scratch:
        scratch.mkdir()
        (scratch / "new.bin").write_text("new")
        assert not (target / "new.bin").exists(), "nothing appears under the real name before completion"
    assert sorted(path.name for path in target.iterdir()) == ["new.bin"]


def test_two_writers_of_one_file_never_collide(tmp_path):
    """Two grid workers write ``spec.json`` at the same moment (this once failed with "No such file"): each has
    its own scratch, and the last writer to finish wins."""
    target = tmp_path / "spec.json"
    write_json(target, {"writer": 0})
    with replace_atomically(target) as first, replace_atomically(target) as second:
        assert first != second
        first.write_text('{"writer": 1}')
        second.write_text('{"writer": 2}')
    # the inner context (second) finished first, then the outer (first)
    assert target.read_text() == '{"writer": 1}'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["spec.json"]


def test_a_scratch_keeps_the_suffix_that_picks_the_file_format(tmp_path):
    with replace_atomically(tmp_path / "frontier.png") as scratch:
        assert scratch.suffix == ".png" and scratch.parent == tmp_path
        scratch.write_bytes(b"png")
    assert (tmp_path / "frontier.png").read_bytes() == b"png"


def test_a_scratch_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = int(finished.stdout)
    abandoned = tmp_path / f".partial-{dead}-0badc0de-summary.json"
    abandoned.write_text('{"half": ')
    alive = tmp_path / ".partial-1-0badc0de-summary.json"  # pid 1 is always alive: never touched
    alive.write_text("{}")
    write_json(tmp_path / "summary.json", {"run": 1})
    assert sorted(path.name for path in tmp_path.iterdir()) == [alive.name, "summary.json"]


def test_a_failed_swap_leaves_no_scratch(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()  # a folder where a file is written: os.replace refuses
    (target / "weights.bin").write_text("old")
    with pytest.raises(OSError), replace_atomically(target) as scratch:
        scratch.write_text("a file, not a folder")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]


def test_a_claim_is_held_by_one_holder_at_a_time_and_released_on_exit(tmp_path):
    lock = tmp_path / "locks" / "run.lock"
    with claimed(lock) as first:
        with claimed(lock) as second:  # a second open file: flock refuses it even in the same process
            assert (first, second) == (True, False)
    with claimed(lock) as again:
        assert again


def test_a_claim_of_a_killed_holder_is_free_at_once(tmp_path):
    import subprocess
    import sys

    lock = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom folora_ds.common.files import claimed\n"
        f"with claimed({str(lock)!r}) as held:\n    print(held, flush=True)\n    time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        with claimed(lock) as held:
            assert not held
    finally:
        holder.kill()
        holder.wait()
    with claimed(lock) as held:
        assert held


def test_a_waiting_claim_blocks_until_the_holder_releases(tmp_path):
    import threading
    import time

    lock, order = tmp_path / "shared.lock", []

    def waiter():
        with claimed(lock, wait=True) as held:
            order.append(("waiter", held))

    with claimed(lock) as first:
        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.3)
        order.append(("holder done", first))
    thread.join(timeout=10)
    assert order == [("holder done", True), ("waiter", True)]


def test_a_file_system_without_flock_warns_and_runs_unclaimed(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="running unclaimed"):
        with claimed(tmp_path / "run.lock") as held:
            assert held


def test_read_json_file_names_the_file_and_where_the_json_breaks(tmp_path):
    good = tmp_path / "spec.json"
    write_json(good, {"runs": [1, 2]})
    assert read_json_file(good, what="grid spec") == {"runs": [1, 2]}
    with pytest.raises(FileNotFoundError, match=r"^grid spec '.*missing\.json' does not exist$"):
        read_json_file(tmp_path / "missing.json", what="grid spec")
    broken = tmp_path / "broken.json"
    broken.write_text('{"runs":\n  [1, 2,]}')
    with pytest.raises(ValueError, match=r"^DeepSpeed config '.*broken\.json': not valid JSON \(line 2, column 9: "):
        read_json_file(broken, what="DeepSpeed config")


def test_read_jsonl_objects_skips_blank_lines_and_names_the_bad_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n[3]\n')
    rows = read_jsonl_objects(path, what="task data")
    assert next(rows) == (1, {"a": 1}) and next(rows) == (3, {"a": 2})
    with pytest.raises(ValueError, match=r"^task data '.*data\.jsonl' line 4: expected a JSON object, got list$"):
        next(rows)


def test_a_truncated_or_damaged_safetensors_file_is_named(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(16, 16), "b": torch.ones(8)}, str(path))
    check_safetensors(path, what="model weights")  # whole: fine
    whole = path.read_bytes()
    path.write_bytes(whole[:-40])
    with pytest.raises(ValueError, match=r"model weights '.*model\.safetensors' is truncated: tensor '.*' ends at"):
        check_safetensors(path, what="model weights")
    path.write_bytes(whole[:20])
    with pytest.raises(ValueError, match=r"is damaged or truncated \(the header runs past the end"):
        check_safetensors(path, what="model weights")
    path.write_bytes((8).to_bytes(8, "little") + b"not json")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        check_safetensors(path, what="model weights")

"""``folora-ds grid`` end to end on the tiny Llama: every method trains through the product's path, every
checkpoint is measured on the untouched base, finished runs are never redone, changed settings are new runs, and
bad specs are named before any work."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from folora_ds.cli import main
from folora_ds.method.config import FoLoRAConfig
from folora_ds.toolkit.grid import collect_rows, load_spec, run_grid
from folora_ds.toolkit.grid import runner as grid_runner  # where run_grid looks up train_run, evaluate_checkpoint
from folora_ds.toolkit.grid.spec import GridRun, GridSettings

SETTINGS = {"model": "tiny-llama", "batch_size": 4, "calibration_steps": 2, "target_modules": ["q_proj", "down_proj"],
            "proxy": {"num_sequences": 8, "seq_len": 12, "batch_size": 4},
            "evaluation": {"test_records": 3, "question_records": 4, "heldout_passages": 2, "max_length": 32,
                           "max_new_tokens": 3}}


def _spec(runs, **settings):
    return {"settings": {**SETTINGS, **settings}, "runs": runs}


def test_every_method_runs_and_a_finished_grid_is_not_redone(tmp_path, monkeypatch):
    methods = ["lora", "folora", "pissa", "corda", "milora", "lora-null", "sc-lora"]
    spec = load_spec(_spec([{"label": m, "method": m, "lrs": [2e-3], "seeds": [0], "steps": [2, 3]}
                            for m in methods] + [{"label": "hard projection", "method": "folora", "lrs": [2e-3],
                                                  "seeds": [1], "steps": [3], "knobs": {"gate": "hard"}}]))
    rows = run_grid(spec, tmp_path, progress=False)
    assert [(r["label"], r["steps"]) for r in rows] == [(m, s) for m in methods for s in (2, 3)] + [
        ("hard projection", 3)]
    for row in rows:
        assert 0.0 <= row["target_accuracy"] <= 1.0 and 0.0 <= row["retention"] <= 1.0
        assert row["kl_per_token"] > 0 and row["penalty_total"] > 0  # every adapter moved the model
    by = {(r["label"], r["steps"]): r for r in rows}
    assert by[("lora", 3)]["kl_per_token"] > by[("lora", 2)]["kl_per_token"]  # more steps, further from the base
    folora = json.loads((tmp_path / "runs" / by[("folora", 3)]["slug"] / "train.json").read_text())
    assert set(folora["gated_steps"]) == {3} and folora["optimizer_steps"] == 3 and folora["layers"]
    # the shared artefacts exist once
    shared = tmp_path / "shared"
    assert {"proxy.jsonl", "base_evaluation.json", "statistics_pre.pt", "statistics_seed0.pt"} <= {
        p.name for p in shared.iterdir()}

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(grid_runner, "train_run", refuse)
    monkeypatch.setattr(grid_runner, "evaluate_checkpoint", refuse)
    assert run_grid(spec, tmp_path, progress=False) == rows

    # the report: tables, CSVs and both plots
    assert main(["grid", str(_write(tmp_path / "spec.json", _spec(
        [{"label": m, "method": m, "lrs": [2e-3], "seeds": [0], "steps": [2, 3]} for m in methods]
        + [{"label": "hard projection", "method": "folora", "lrs": [2e-3], "seeds": [1], "steps": [3],
            "knobs": {"gate": "hard"}, "figure": "knobs"}]))), "--output", str(tmp_path), "--report-only"]) == 0
    for name in ("results.md", "results.csv", "results_runs.csv", "frontier.png", "frontier_knobs.png",
                 "gates.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| sc-lora | 0.002 | 3 | 1 |" in (tmp_path / "results.md").read_text()

    # which base-correct questions each run lost, answered again at the run's last step
    assert main(["grid", str(tmp_path / "spec.json"), "--output", str(tmp_path), "--only", "lora",
                 "--only", "folora", "--lost-questions", "--no-progress"]) == 0
    lost = (tmp_path / "lost_questions.md").read_text()
    assert "| lora | 0.002 | 0 | 3 |" in lost and "| folora | 0.002 | 0 | 3 |" in lost and "| pissa |" not in lost

    # where each adapter moved along FoLoRA's passed and attenuated directions, every (run, step)
    assert main(["grid", str(tmp_path / "spec.json"), "--output", str(tmp_path), "--only", "lora",
                 "--only", "folora", "--directions", "--no-progress"]) == 0
    with open(tmp_path / "directions.csv", newline="") as handle:
        moved = list(csv.DictReader(handle))
    assert sorted((row["label"], int(row["steps"])) for row in moved) == [(m, s) for m in ("folora", "lora")
                                                                          for s in (2, 3)]
    assert all(float(row["passed_size"]) > 0 and int(row["passed_directions"]) > 0 for row in moved)
    assert "| folora | 0.002 | 3 | 1 |" in (tmp_path / "directions.md").read_text()


def test_a_changed_setting_is_a_new_run_and_other_shared_settings_are_refused(tmp_path):
    entry = [{"label": "plain LoRA", "method": "lora", "lrs": [2e-3], "seeds": [0], "steps": [2]}]
    first = load_spec(_spec(entry))
    run_grid(first, tmp_path, progress=False)
    longer = load_spec(_spec([{**entry[0], "steps": [3]}]))
    assert longer.runs[0].slug(longer.settings) != first.runs[0].slug(first.settings)
    assert collect_rows(longer, tmp_path) == []  # not finished: no row
    other = load_spec(_spec(entry, batch_size=2))
    with pytest.raises(ValueError, match="batch_size differ"):
        run_grid(other, tmp_path, progress=False)


def _write(path, value):
    path.write_text(json.dumps(value))
    return path


@pytest.mark.parametrize("name", ["smollm2", "demo", "quick"])
def test_the_shipped_specs_load(name):
    """Every shipped spec passes the checks a user's spec passes (knobs are valid FoLoRA config fields)."""
    spec = load_spec(name)
    assert spec.runs and len({run.slug(spec.settings) for run in spec.runs}) == len(spec.runs)


@pytest.mark.parametrize("spec, match", [
    ({"runs": [{"method": "dora", "lrs": [1e-3], "seeds": [0], "steps": [2]}]}, "unknown method 'dora'"),
    ({"runs": [{"method": "lora", "lrs": [-1.0], "seeds": [0], "steps": [2]}]}, "lr=-1.0"),
    ({"runs": [{"method": "lora", "lrs": [1e-3], "seeds": [0], "steps": [0]}]}, "steps"),
    ({"runs": [{"method": "lora", "lrs": [1e-3], "seeds": [0], "steps": [2], "knobs": {"tau": 2}}]}, "knobs are"),
    ({"runs": [{"method": "folora", "lrs": [1e-3], "seeds": [0], "steps": [2], "knobs": {"taus": 2}}]}, "taus"),
    ({"runs": [{"method": "lora", "lrs": [1e-3], "seed": [0], "steps": [2]}]}, r"runs\[0\]"),
    ({"settings": {"batch_sise": 4}, "runs": []}, "unknown key 'batch_sise'"),
    ({"settings": {"proxy": {"path": "x.jsonl"}}, "runs": []}, "proxy.path is set by the grid"),
    ({"runs": [{"method": "lora", "lrs": [1e-3, 1e-3], "seeds": [0], "steps": [2]}]}, "appears twice"),
    ({"runs": [{"method": "lora", "lrs": [1e-3], "seeds": [0], "steps": [2], "figure": "my knobs"}]},
     "figure='my knobs'"),
    ({"runs": [{"label": "a", "method": "folora", "lrs": [1e-3], "seeds": [0], "steps": [2]},
               {"label": "a", "method": "folora", "lrs": [2e-3], "seeds": [0], "steps": [2], "figure": "knobs"}]},
     "drawn in figure 'frontier' by an earlier entry"),
    ({"runs": [{"method": "lora", "lrs": [1e-3], "seeds": [0], "steps": [2], "proxy_sequences": 4}]},
     "proxy_sequences is a FoLoRA setting"),
    ({"runs": [{"method": "folora", "lrs": [1e-3], "seeds": [0], "steps": [2], "proxy_sequences": 0}]},
     "proxy_sequences=0"),
    ({"settings": {"proxy": {"num_sequences": 8}},
      "runs": [{"method": "folora", "lrs": [1e-3], "seeds": [0], "steps": [2], "proxy_sequences": 8}]},
     "not fewer than the shared proxy set's 8"),
    ({"runs": [{"method": "folora", "lrs": [1e-3], "seeds": [0], "steps": [2], "proxy_sequences": True}]},
     "proxy_sequences=True is invalid; allowed: an integer >= 1"),
    ({"runs": [{"method": "folora", "lrs": [1e-3], "seeds": [0], "steps": [2], "proxy_sequences": 16.0}]},
     "proxy_sequences=16.0 is invalid; allowed: an integer >= 1"),
    ({"runs": [{"label": "F", "method": "folora", "lrs": [1e-3], "seeds": [0], "steps": [2]},
               {"label": "F", "method": "folora", "lrs": [2e-3], "seeds": [0], "steps": [2], "knobs": {"tau": 2.0}}]},
     "label 'F' is used by an earlier entry with another method, knobs or proxy_sequences"),
    ({"runs": [{"label": "plain", "method": "lora", "lrs": [1e-3], "seeds": [0], "steps": [2], "figure": "knobs"}]},
     "reference drawn in every figure"),
    ({"runs": [{"method": "lora", "lrs": [1e-3], "seeds": [0], "steps": [2], "figure": "Knobs"}]},
     "lower-case"),
])
def test_bad_specs_are_named(spec, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        load_spec(spec)


def test_cli_names_a_missing_spec_and_an_unknown_only_label(tmp_path, capsys):
    assert main(["grid", str(tmp_path / "none.json"), "--output", str(tmp_path)]) == 2
    assert "shipped grids" in capsys.readouterr().err
    spec = _write(tmp_path / "spec.json", _spec([{"label": "a", "method": "lora", "lrs": [1e-3], "seeds": [0],
                                                   "steps": [2]}]))
    assert main(["grid", str(spec), "--output", str(tmp_path), "--only", "b"]) == 2
    assert "--only 'b' names no entry" in capsys.readouterr().err


def test_a_run_made_with_a_since_changed_default_is_trained_again(tmp_path, monkeypatch):
    spec = load_spec(_spec([{"label": "plain LoRA", "method": "lora", "lrs": [2e-3], "seeds": [0], "steps": [2]},
                            {"label": "FoLoRA", "method": "folora", "lrs": [2e-3], "seeds": [0], "steps": [2]}]))
    run_grid(spec, tmp_path, progress=False)
    folora = tmp_path / "runs" / spec.runs[1].slug(spec.settings) / "train.json"
    record = json.loads(folora.read_text())
    record["resolved"]["folora"]["tau"] = 7.0  # as if FoLoRA's default τ had been 7 when this run was made
    folora.write_text(json.dumps(record))
    trained = []
    real_train = grid_runner.train_run
    monkeypatch.setattr(grid_runner, "train_run", lambda run, *a, **k: trained.append(run.label) or real_train(
        run, *a, **k))
    rows = run_grid(spec, tmp_path, progress=False)
    assert trained == ["FoLoRA"] and len(rows) == 2  # only the stale run, and it is complete again
    assert json.loads(folora.read_text())["resolved"]["folora"]["tau"] == 1.0


def test_edited_data_files_are_not_served_from_the_cache(tmp_path):
    """Data files are named by path in the settings; their content is fingerprinted."""
    from folora_ds.training.data import DEFAULT_TASK_FILE

    data = tmp_path / "task.jsonl"
    data.write_text(DEFAULT_TASK_FILE.read_text())
    entry = [{"label": "plain LoRA", "method": "lora", "lrs": [2e-3], "seeds": [0], "steps": [2]}]
    spec = load_spec(_spec(entry, data=str(data)))
    run_grid(spec, tmp_path / "grid", progress=False)
    data.write_text("\n".join(DEFAULT_TASK_FILE.read_text().splitlines()[:-5]) + "\n")  # five records fewer
    with pytest.raises(ValueError, match="other shared settings or data \\(files differ\\)"):
        run_grid(spec, tmp_path / "grid", progress=False)


def test_best_learning_rate_entries_run_at_the_winner_of_the_finished_seeds(tmp_path):
    spec = load_spec(_spec([
        {"label": "plain LoRA", "method": "lora", "lrs": [1e-4, 2e-2], "seeds": [0], "steps": [2]},
        {"label": "plain LoRA", "method": "lora", "lrs": "best", "seeds": [1], "steps": [2]}]))
    assert len(spec.runs) == 2 and len(spec.best) == 1
    rows = run_grid(spec, tmp_path, progress=False)
    winner = spec.best[0].resolve([row for row in rows if row["seed"] == 0])
    assert [(row["seed"], row["lr"]) for row in rows if row["seed"] == 1] == [(1, winner)]
    assert collect_rows(spec, tmp_path) == rows  # the report sees the resolved entry too
    with pytest.raises(ValueError, match="needs entries with the same label"):
        load_spec(_spec([{"label": "x", "method": "lora", "lrs": "best", "seeds": [1], "steps": [2]}]))
    with pytest.raises(ValueError, match="lrs must be a list"):
        load_spec(_spec([{"label": "x", "method": "lora", "lrs": "fast", "seeds": [1], "steps": [2]}]))


def _finished(lr, seed, accuracy, kl, steps=60):
    return {"label": "M", "method": "lora", "lr": lr, "seed": seed, "steps": steps, "target_accuracy": accuracy,
            "kl_per_token": kl}


def test_the_best_learning_rate_is_the_least_forgetting_one_within_95_percent_of_the_top_accuracy():
    entry = load_spec(_spec([{"label": "M", "method": "lora", "lrs": [1e-4], "seeds": [0], "steps": [60]},
                             {"label": "M", "method": "lora", "lrs": "best", "seeds": [1, 2], "steps": [60]}])).best[0]
    assert entry.resolve([]) is None
    # 33% is within 95% of 34% and forgets a third as much: it wins over the one-point-more-accurate rate
    rows = [_finished(2e-4, 0, 0.33, 0.019), _finished(8e-4, 0, 0.34, 0.062), _finished(1e-4, 0, 0.20, 0.005)]
    assert entry.resolve(rows) == 2e-4
    # beyond 95% the accuracy decides
    assert entry.resolve([_finished(2e-4, 0, 0.30, 0.019), _finished(8e-4, 0, 0.34, 0.062)]) == 8e-4
    # only the last step counts, and other labels never do
    assert entry.resolve(rows + [_finished(1e-4, 0, 0.9, 0.001, steps=30), {**_finished(4e-4, 0, 0.9, 0.0),
                                                                             "label": "other"}]) == 2e-4
    # the entry's own seeds do not move the choice once they have run
    assert entry.resolve(rows + [_finished(2e-4, 1, 0.10, 0.5), _finished(2e-4, 2, 0.10, 0.5)]) == 2e-4


def test_proxy_size_knob_calibrates_on_the_first_sequences_of_the_shared_set(tmp_path):
    """``proxy_sequences`` (the knob study's proxy size) is its own run, calibrated on fewer sequences, and leaves
    the key of a run without it unchanged."""
    entry = {"label": "FoLoRA", "method": "folora", "lrs": [2e-3], "seeds": [0], "steps": [2]}
    spec = load_spec(_spec([entry, {**entry, "label": "FoLoRA 4 proxy sequences", "proxy_sequences": 4}]))
    assert "proxy_sequences" not in spec.runs[0].identity(spec.settings)  # keys made before it existed still hold
    assert spec.runs[0].slug(spec.settings) != spec.runs[1].slug(spec.settings)
    rows = run_grid(spec, tmp_path, progress=False)
    used = {row["label"]: json.loads((tmp_path / "runs" / row["slug"] / "train.json").read_text())
            for row in rows}
    whole, part = used["FoLoRA"], used["FoLoRA 4 proxy sequences"]
    assert whole["proxy_sequences"] == 8 and part["proxy_sequences"] == 4
    assert part["resolved"]["proxy_sequences"] == 4 and set(part["gated_steps"]) == {2}
    # fewer proxy sequences, another C_pre: the gates FoLoRA solved differ
    assert [layer["effective_rank"] for layer in whole["layers"]] != [layer["effective_rank"]
                                                                       for layer in part["layers"]]


def test_a_run_another_worker_holds_is_left_to_it_and_trained_once_free(tmp_path):
    """Two workers may share one grid folder: each claims a run before training it (``<output>/claims``)."""
    from folora_ds.common.files import claimed

    spec = load_spec(_spec([{"label": "plain LoRA", "method": "lora", "lrs": [2e-3, 3e-3], "seeds": [0],
                             "steps": [2]}]))
    held = spec.runs[0].slug(spec.settings)
    with claimed(tmp_path / "claims" / f"{held}.lock") as mine:
        assert mine
        rows = run_grid(spec, tmp_path, progress=False)
    assert [row["lr"] for row in rows] == [3e-3] and not (tmp_path / "runs" / held).exists()
    assert [row["lr"] for row in run_grid(spec, tmp_path, progress=False)] == [2e-3, 3e-3]


def test_a_folora_run_is_keyed_by_its_resolved_config_not_by_how_its_knobs_spell_it():
    settings = GridSettings.from_dict(SETTINGS)
    default_tau = FoLoRAConfig().tau

    def digest(**knobs):
        return GridRun(label="FoLoRA", method="folora", lr=1e-3, seed=0, steps=(2,), knobs=knobs).slug(settings)

    assert digest() == digest(tau=default_tau)  # a knob at its default value is the default run
    assert digest() != digest(tau=default_tau * 2)


def test_a_best_rate_entry_waits_until_its_sweep_is_finished(tmp_path, monkeypatch):
    """A worker that left part of the sweep to another worker does not choose the best rate from the rest."""
    from folora_ds.common.files import claimed

    spec = load_spec(_spec([{"label": "plain LoRA", "method": "lora", "lrs": [2e-3, 3e-3], "seeds": [0],
                             "steps": [2]},
                            {"label": "plain LoRA", "method": "lora", "lrs": "best", "seeds": [1], "steps": [2]}]))
    with claimed(tmp_path / "claims" / f"{spec.runs[1].slug(spec.settings)}.lock"):
        rows = run_grid(spec, tmp_path, progress=False)
    assert [(row["lr"], row["seed"]) for row in rows] == [(2e-3, 0)]  # no seed-1 run at a half-known best rate
    rows = run_grid(spec, tmp_path, progress=False)
    assert sorted(row["lr"] for row in rows if row["seed"] == 0) == [2e-3, 3e-3]
    assert [row["seed"] for row in rows].count(1) == 1  # now chosen from the whole sweep


def test_a_best_rate_entry_runs_as_soon_as_its_sweep_is_finished(tmp_path, monkeypatch):
    spec = load_spec(_spec([{"label": "plain LoRA", "method": "lora", "lrs": [2e-3, 3e-3], "seeds": [0],
                             "steps": [2]},
                            {"label": "late", "method": "lora", "lrs": [1e-3], "seeds": [0], "steps": [2]},
                            {"label": "plain LoRA", "method": "lora", "lrs": "best", "seeds": [1], "steps": [2]}]))
    order = []
    real_train = grid_runner.train_run
    monkeypatch.setattr(grid_runner, "train_run", lambda run, *a, **k: order.append((run.label, run.seed)) or
                        real_train(run, *a, **k))
    run_grid(spec, tmp_path, progress=False)
    assert order == [("plain LoRA", 0), ("plain LoRA", 0), ("plain LoRA", 1), ("late", 0)]


@pytest.mark.parametrize("bad", ["data", "test_data", "questions", "proxy_prompts"])
def test_bad_input_files_stop_the_grid_before_any_work_and_leave_no_fingerprint(tmp_path, monkeypatch, bad):
    """Once the task data was checked after sampling the proxy set and measuring the base model, and the bad file's
    fingerprint then refused the folder after the fix. Now nothing is sampled, measured or recorded first."""
    from folora_ds.toolkit.evaluation import TEST_FILE
    from folora_ds.toolkit.grid.artifacts import SharedArtifacts
    from folora_ds.toolkit.measures import QUESTIONS_FILE
    from folora_ds.training.data import DEFAULT_TASK_FILE

    def never(*args, **kwargs):
        raise AssertionError("the grid started work before its inputs were checked")

    monkeypatch.setattr(SharedArtifacts, "ensure_proxy", never)
    broken = tmp_path / f"{bad}.jsonl"
    first = {"questions": '{"prompt": "a", "answers": ["b"], "kind": "fact"}',
             "proxy_prompts": '{"prompt": "a"}'}.get(bad, '{"prompt": "a", "response": "b"}')
    second = '{"prompt": 7, "response": "b"}' if bad == "data" else '{"prompt": "c"'
    broken.write_text(f"{first}\n{second}\n")
    entry = [{"label": "plain LoRA", "method": "lora", "lrs": [2e-3], "seeds": [0], "steps": [2]}]
    settings = {"data": {"data": str(broken)},
                "proxy_prompts": {"proxy": {**SETTINGS["proxy"], "prompt": "chat_prompts", "prompts_path": str(broken)}}
                }.get(bad, {"evaluation": {**SETTINGS["evaluation"], bad: str(broken)}})
    with pytest.raises(ValueError, match=f"{bad}.jsonl' line 2"):
        run_grid(load_spec(_spec(entry, **settings)), tmp_path / "grid", progress=False)
    assert not (tmp_path / "grid" / "shared" / "settings.json").exists()
    fixed = {"data": DEFAULT_TASK_FILE, "test_data": TEST_FILE, "questions": QUESTIONS_FILE,
             "proxy_prompts": DEFAULT_TASK_FILE.parent / "chat_prompts.jsonl"}[bad]
    broken.write_text(Path(fixed).read_text())

    def reached(self):
        raise StopIteration("past the checks and the fingerprint")

    monkeypatch.setattr(SharedArtifacts, "ensure_proxy", reached)
    with pytest.raises(StopIteration):  # the fixed file in the same folder is accepted
        run_grid(load_spec(_spec(entry, **settings)), tmp_path / "grid", progress=False)

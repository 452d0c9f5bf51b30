"""The grid's spec and cache keys (``folora_ds.toolkit.grid.spec``), with no model and no training: a spec is
checked whole before any work, a run's key changes exactly when what determines the run changes, and data files
are keyed by content."""

from __future__ import annotations

import json

import pytest

from folora_ds.method.config import FoLoRAConfig
from folora_ds.toolkit.grid.rows import is_complete
from folora_ds.toolkit.grid.spec import (
    GRIDS_DIR,
    GridRun,
    GridSettings,
    changed_settings,
    data_fingerprints,
    load_spec,
    resolved_settings,
)

SETTINGS = {"model": "tiny-llama", "batch_size": 4, "calibration_steps": 2, "proxy": {"num_sequences": 8}}


def _entry(**values):
    return {"method": "lora", "lrs": [1e-3], "seeds": [0], "steps": [2], **values}


def _spec(*entries, **settings):
    return {"settings": {**SETTINGS, **settings}, "runs": list(entries)}


def _slug(entry, **settings):
    spec = load_spec(_spec(entry, **settings))
    (run,) = spec.runs
    return run.slug(spec.settings)


# ------------------------------------------------------------------------------------------------ parsing


def test_a_valid_spec_expands_to_one_run_per_lr_and_seed_with_sorted_steps():
    spec = load_spec({"description": "two entries", "settings": SETTINGS, "runs": [
        {"label": "plain LoRA", "method": "lora", "lrs": [1e-4, 2e-4], "seeds": [0, 1], "steps": [60, 30]},
        {"method": "folora", "lrs": [4e-4], "seeds": [2], "steps": [60], "knobs": {"tau": 2.0}, "figure": "knobs"}]})
    assert [(run.label, run.method, run.lr, run.seed) for run in spec.runs] == [
        ("plain LoRA", "lora", 1e-4, 0), ("plain LoRA", "lora", 1e-4, 1), ("plain LoRA", "lora", 2e-4, 0),
        ("plain LoRA", "lora", 2e-4, 1), ("folora", "folora", 4e-4, 2)]  # the label defaults to the method
    assert spec.runs[0].steps == (30, 60)
    assert dict(spec.runs[-1].knobs) == {"tau": 2.0} and spec.best == ()
    assert dict(spec.figures) == {"plain LoRA": "frontier", "folora": "knobs"}
    assert spec.settings.batch_size == 4 and spec.settings.proxy.num_sequences == 8
    assert spec.settings.lora_rank == GridSettings().lora_rank  # unset settings keep their defaults


def test_a_spec_file_and_a_shipped_grid_name_load(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(_spec(_entry(label="a"))))
    assert [run.label for run in load_spec(path).runs] == ["a"]
    assert load_spec("quick") == load_spec(GRIDS_DIR / "quick.json")


def test_a_missing_spec_is_named_with_the_shipped_grids(tmp_path):
    with pytest.raises(FileNotFoundError, match="shipped grids: ") as raised:
        load_spec(tmp_path / "nowhere.json")
    assert "nowhere.json" in str(raised.value)
    for shipped in GRIDS_DIR.glob("*.json"):
        assert shipped.stem in str(raised.value)


def test_a_spec_file_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"runs": [')
    with pytest.raises(ValueError, match="grid spec .*broken.json.*not valid JSON"):
        load_spec(path)


@pytest.mark.parametrize("name", ["smollm2", "demo", "quick"])
def test_the_shipped_specs_load_with_distinct_runs(name):
    spec = load_spec(name)
    assert spec.runs and len({run.slug(spec.settings) for run in spec.runs}) == len(spec.runs)


@pytest.mark.parametrize("raw, match", [
    ({"runs": [], "setting": {}}, "expected keys settings, runs"),
    ({"settings": {}}, "expected keys settings, runs"),
    ({"settings": {"batch_sise": 4}, "runs": []}, "unknown key 'batch_sise'; known: batch_size"),
    ({"settings": {"batch_size": 0}, "runs": []}, r"grid settings: batch_size=0 is invalid; allowed: an integer >= 1"),
    ({"settings": {"lora_rank": True}, "runs": []}, r"grid settings: lora_rank=True is invalid"),
    ({"settings": {"max_seq_len": 2.0}, "runs": []}, r"grid settings: max_seq_len=2.0 is invalid"),
    ({"settings": {"sc_lora_beta": 1.5}, "runs": []}, r"sc_lora_beta=1.5 must be in \[0, 1\]"),
    ({"settings": {"proxy": {"path": "x.jsonl"}}, "runs": []}, "proxy.path is set by the grid"),
    ({"runs": [_entry(seed=[0])]}, r"runs\[0\]: expected method, lrs, seeds, steps"),
    ({"runs": [_entry(lr=[1e-3])]}, r"runs\[0\]: expected method, lrs, seeds, steps"),
])
def test_bad_keys_and_settings_are_named(raw, match):
    with pytest.raises(ValueError, match=match):
        load_spec(raw)


@pytest.mark.parametrize("entry, match", [
    (_entry(method="dora"), "unknown method 'dora'"),
    (_entry(lrs=[-1e-3]), r"lr=-0.001 is invalid"),
    (_entry(lrs=[0.0]), r"lr=0.0 is invalid"),
    (_entry(lrs=[float("nan")]), r"lr=nan is invalid"),
    (_entry(lrs=[True]), r"lr=True is invalid"),
    (_entry(lrs="fast"), "lrs must be a list of learning rates or \"best\""),
    (_entry(lrs=[]), "lrs must be a list"),
    (_entry(lrs=1e-3), "lrs must be a list"),
    (_entry(seeds=[-1]), r"seed=-1 is invalid; allowed: an integer >= 0"),
    (_entry(seeds=[0.5]), r"seed=0.5 is invalid"),
    (_entry(seeds=["0"]), r"seed='0' is invalid"),
    (_entry(seeds=[]), r"seeds=\[\] must be a list of seeds"),
    (_entry(seeds=0), r"seeds=0 must be a list of seeds"),
    (_entry(steps=[0]), r"steps=\(0,\) must be distinct integers >= 1"),
    (_entry(steps=[2, 2]), "must be distinct integers"),
    (_entry(steps=[]), "must be distinct integers"),
    (_entry(steps=[1.5]), "must be distinct integers"),
    (_entry(steps=[True]), "must be distinct integers"),
    (_entry(seeds=[0, 0]), "appears twice"),
    (_entry(knobs={"tau": 2.0}), "knobs are FoLoRA settings; method 'lora' takes none"),
    (_entry(method="folora", knobs={"taus": 2.0}), "taus"),
    (_entry(proxy_sequences=4), "proxy_sequences is a FoLoRA setting"),
    (_entry(method="folora", proxy_sequences=True), r"proxy_sequences=True is invalid; allowed: an integer >= 1"),
    (_entry(method="folora", proxy_sequences=8), "not fewer than the shared proxy set's 8"),
    (_entry(figure="My Knobs"), "figure='My Knobs' must be a name of lower-case letters"),
    (_entry(label="plain", figure="knobs"), "reference drawn in every figure"),
])
def test_a_bad_entry_is_named_before_any_work(entry, match):
    with pytest.raises(ValueError, match=match):
        load_spec(_spec(entry))


def test_a_label_is_one_setup_drawn_in_one_figure():
    with pytest.raises(ValueError, match="label 'F' is used by an earlier entry with another method, knobs"):
        load_spec(_spec(_entry(label="F", method="folora"),
                        _entry(label="F", method="folora", lrs=[2e-3], knobs={"tau": 2.0})))
    with pytest.raises(ValueError, match="drawn in figure 'frontier' by an earlier entry, not 'knobs'"):
        load_spec(_spec(_entry(label="F", method="folora"), _entry(label="F", method="folora", lrs=[2e-3],
                                                                    figure="knobs")))
    spec = load_spec(_spec(_entry(label="F", method="folora"), _entry(label="F", method="folora", lrs=[2e-3])))
    assert [run.lr for run in spec.runs] == [1e-3, 2e-3]  # the same setup at another rate is fine


# ------------------------------------------------------------------------------------------------ "lrs": "best"


def test_a_best_rate_entry_runs_nothing_until_resolved_and_needs_a_sweep_of_its_label():
    spec = load_spec(_spec(_entry(label="M", lrs=[1e-4, 2e-4]), _entry(label="M", lrs="best", seeds=[1, 2],
                                                                       steps=[4, 2])))
    assert [run.seed for run in spec.runs] == [0, 0]  # only the sweep is concrete
    (entry,) = spec.best
    assert (entry.label, entry.method, entry.seeds) == ("M", "lora", (1, 2))
    assert [(run.lr, run.seed, run.steps) for run in entry.runs(2e-4)] == [(2e-4, 1, (2, 4)), (2e-4, 2, (2, 4))]
    with pytest.raises(ValueError, match="needs entries with the same label and method"):
        load_spec(_spec(_entry(label="M", lrs="best")))
    with pytest.raises(ValueError, match="needs entries with the same label and method"):
        load_spec(_spec(_entry(label="N"), _entry(label="M", lrs="best")))


@pytest.mark.parametrize("best, match", [
    (_entry(label="M", method="folora", lrs="best", knobs={"taus": 1.0}), "taus"),
    (_entry(label="M", lrs="best", seeds=[-1]), "seed=-1 is invalid"),
    (_entry(label="M", lrs="best", steps=[0]), "must be distinct integers"),
])
def test_a_best_rate_entry_is_checked_like_a_concrete_one(best, match):
    with pytest.raises(ValueError, match=match):
        load_spec(_spec(best))


def test_the_best_rate_breaks_a_kl_tie_by_accuracy():
    entry = load_spec(_spec(_entry(label="M"), _entry(label="M", lrs="best", seeds=[1]))).best[0]
    rows = [{"label": "M", "method": "lora", "lr": lr, "seed": 0, "steps": 2, "target_accuracy": accuracy,
             "kl_per_token": 0.01} for lr, accuracy in ((1e-4, 0.30), (2e-4, 0.31))]
    assert entry.resolve(rows) == 2e-4
    assert entry.resolve([{**row, "method": "folora"} for row in rows]) is None  # another method's rows never count


# ------------------------------------------------------------------------------------------------ cache keys


def test_the_slug_names_label_rate_and_seed_and_is_stable_for_an_equal_config():
    slug = _slug(_entry(label="Plain LoRA!", lrs=[2e-4], seeds=[3]))
    label, lr, seed, digest = slug.split("_")
    assert (label, lr, seed) == ("plain-lora", "lr0.0002", "seed3")
    assert len(digest) == 10 and int(digest, 16) >= 0
    assert _slug(_entry(label="Plain LoRA!", lrs=[2e-4], seeds=[3])) == slug  # loaded again: the same key


@pytest.mark.parametrize("changed, settings", [
    ({"lrs": [2e-3]}, {}),
    ({"seeds": [1]}, {}),
    ({"steps": [3]}, {}),
    ({"steps": [2, 3]}, {}),
    ({"method": "pissa"}, {}),
    ({}, {"batch_size": 2}),
    ({}, {"lora_rank": 4}),
    ({}, {"target_modules": ["q_proj"]}),
    ({}, {"proxy": {"num_sequences": 16}}),
    ({}, {"evaluation": {"test_records": 3}}),
    ({}, {"model": "smollm2-135m-instruct"}),
])
def test_the_key_changes_with_what_determines_the_run(changed, settings):
    base = _entry(label="run")
    assert _slug({**base, **changed}, **settings).rsplit("_", 1)[1] != _slug(base).rsplit("_", 1)[1]


@pytest.mark.parametrize("knobs, other", [
    ({"tau": 2.0}, {"tau": 3.0}),
    ({"gate": "hard"}, {}),
    ({"tau": 2.0}, {"tau": 2.0, "gate": "hard"}),
])
def test_the_key_of_a_folora_run_changes_with_its_knobs(knobs, other):
    entry = _entry(label="F", method="folora")
    assert _slug({**entry, "knobs": knobs}) != _slug({**entry, "knobs": other})


def test_the_key_changes_with_proxy_sequences_and_holds_none_without_it():
    entry = _entry(label="F", method="folora")
    spec = load_spec(_spec(entry))
    assert "proxy_sequences" not in spec.runs[0].identity(spec.settings)  # keys made before it existed still hold
    assert _slug({**entry, "proxy_sequences": 4}) != _slug(entry) != _slug({**entry, "proxy_sequences": 6})


@pytest.mark.parametrize("spelling, settings", [
    ({"lrs": [1]}, {}),  # lr 1 and 1.0
    ({}, {"batch_size": 4, "lora_rank": GridSettings().lora_rank}),  # a setting spelled out at its default
    ({}, {"target_modules": list(GridSettings().target_modules)}),  # the default module list as a JSON list
    ({}, {"proxy": {"num_sequences": 8, "seq_len": GridSettings().proxy.seq_len}}),
    ({"label": "another name"}, {}),  # the label names the group, not the run's content
    ({"steps": [3, 2]}, {}),  # steps in another order
])
def test_the_key_holds_for_spellings_of_the_same_config(spelling, settings):
    entry = _entry(label="run", lrs=[1.0], steps=[2, 3])
    assert _slug({**entry, **spelling}, **settings).rsplit("_", 1)[1] == _slug(entry).rsplit("_", 1)[1]


@pytest.mark.parametrize("spelling", [
    {"tau": FoLoRAConfig().tau},  # a knob at its default value is the default run
    {"lora_rank": GridSettings().lora_rank},  # a knob equal to what the grid's settings give
])
def test_a_folora_run_is_keyed_by_its_resolved_config_not_its_knobs(spelling):
    entry = _entry(label="F", method="folora")
    assert _slug({**entry, "knobs": spelling}) == _slug(entry)
    knobs = {"tau": 2.0, "gate": "hard"}
    assert _slug({**entry, "knobs": knobs}) == _slug({**entry, "knobs": dict(reversed(knobs.items()))})


def test_the_key_holds_only_non_default_settings_and_the_whole_folora_config():
    settings = GridSettings.from_dict({"batch_size": 4, "proxy": {"num_sequences": 8}})
    assert GridSettings().identity() == {}  # a setting added later with a default leaves finished runs' keys alone
    assert settings.identity() == {"batch_size": 4, "proxy": {"num_sequences": 8}}
    run = GridRun(label="F", method="folora", lr=1e-3, seed=0, steps=(2,))
    identity = run.identity(settings)
    assert identity["folora"]["tau"] == FoLoRAConfig().tau  # the resolved config, not the (empty) knobs
    assert identity["folora"]["lora_rank"] == settings.lora_rank and "proxy" not in identity["folora"]
    assert "folora" not in GridRun(label="L", method="lora", lr=1e-3, seed=0, steps=(2,)).identity(settings)


# ------------------------------------------------------------------------------------------------ resolved settings


def _data_settings(path):
    return GridSettings.from_dict({"data": str(path)})


def test_data_fingerprints_follow_the_content_of_the_data_file(tmp_path):
    data = tmp_path / "task.jsonl"
    data.write_text('{"prompt": "1 + 1", "response": "2"}\n')
    before = data_fingerprints(_data_settings(data))
    assert set(before) == {"data", "test_data", "questions"}
    data.write_text('{"prompt": "1 + 1", "response": "2"}\n')
    assert data_fingerprints(_data_settings(data)) == before  # rewritten with the same content: the same
    data.write_text('{"prompt": "1 + 1", "response": "3"}\n')
    after = data_fingerprints(_data_settings(data))
    assert after["data"] != before["data"]
    assert (after["test_data"], after["questions"]) == (before["test_data"], before["questions"])


def test_a_proxy_prompts_file_is_fingerprinted_and_resolved_from_the_shipped_files(tmp_path):
    from folora_ds.toolkit.grid.spec import DATA_FILES_DIR, shipped_paths

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Explain rain."}\n')
    settings = GridSettings.from_dict({"proxy": {"prompt": "chat_prompts", "prompts_path": str(prompts)}})
    before = data_fingerprints(settings)
    assert set(before) == {"data", "test_data", "questions", "proxy_prompts"}
    prompts.write_text('{"prompt": "Explain snow."}\n')
    assert data_fingerprints(settings)["proxy_prompts"] != before["proxy_prompts"]
    resolved = shipped_paths({"proxy": {"prompt": "chat_prompts", "prompts_path": "shipped:chat_prompts.jsonl"}})
    assert resolved["proxy"]["prompts_path"] == str(DATA_FILES_DIR / "chat_prompts.jsonl")


def test_data_fingerprints_of_a_dataset_folder_follow_every_file(tmp_path):
    folder = tmp_path / "saved"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "part-0.arrow").write_bytes(b"abc")
    before = data_fingerprints(_data_settings(folder))["data"]
    (folder / "train" / "part-1.arrow").write_bytes(b"def")
    assert data_fingerprints(_data_settings(folder))["data"] != before


def test_resolved_settings_record_defaults_files_and_the_folora_config(tmp_path):
    data = tmp_path / "task.jsonl"
    data.write_text("{}\n")
    settings = _data_settings(data)
    lora = resolved_settings(GridRun(label="L", method="lora", lr=1e-3, seed=0, steps=(2,)), settings)
    assert lora["settings"]["lora_rank"] == settings.lora_rank  # defaults included
    assert lora["settings"]["target_modules"] == list(settings.target_modules)  # as JSON reads it back
    assert lora["files"] == data_fingerprints(settings) and "folora" not in lora
    folora = resolved_settings(GridRun(label="F", method="folora", lr=1e-3, seed=0, steps=(2,), knobs={"tau": 2.0},
                                       proxy_sequences=4), settings)
    assert folora["folora"]["tau"] == 2.0 and folora["proxy_sequences"] == 4
    assert json.loads(json.dumps(folora)) == folora


def test_changed_settings_name_what_differs_and_ignore_what_was_added_since():
    recorded = {"settings": {"batch_size": 8, "proxy": {"seq_len": 128}}, "files": {"data": "aa"}, "gone": 1}
    current = {"settings": {"batch_size": 4, "proxy": {"seq_len": 128}, "new": 0}, "files": {"data": "bb"}}
    assert changed_settings(recorded, current) == ["settings.batch_size", "files.data", "gone"]
    assert changed_settings(recorded, {**recorded, "settings": {**recorded["settings"], "added": 1}}) == []


def test_a_finished_run_is_complete_only_with_todays_resolved_settings(tmp_path):
    settings = GridSettings.from_dict(SETTINGS)
    run = GridRun(label="F", method="folora", lr=1e-3, seed=0, steps=(2, 4))
    directory = tmp_path / run.slug(settings)
    (directory / "step2").mkdir(parents=True)
    (directory / "step2" / "evaluation.json").write_text("{}")
    assert not is_complete(run, directory, settings)  # step 4 is not measured yet
    (directory / "step4").mkdir()
    (directory / "step4" / "evaluation.json").write_text("{}")
    resolved = resolved_settings(run, settings)
    (directory / "train.json").write_text(json.dumps({"resolved": resolved}))
    assert is_complete(run, directory, settings)
    resolved["folora"]["tau"] = 7.0  # as if FoLoRA's default τ had been 7 when this run was made
    (directory / "train.json").write_text(json.dumps({"resolved": resolved}))
    assert not is_complete(run, directory, settings)
    assert is_complete(run, directory)  # without settings, only the evaluations count


def test_the_shipped_quick_grid_keeps_its_run_keys():
    """Finished runs are found by these keys: a change to what enters them would retrain every grid. These are the
    keys of the run folders the demo wrote before the package moved into rooms (and still writes)."""
    spec = load_spec("quick")
    assert [run.slug(spec.settings) for run in spec.runs] == ["plain-lora_lr0.001_seed0_e39cbfe4da",
                                                              "folora_lr0.001_seed0_dbb76decf8"]


def test_shipped_data_paths_resolve_to_the_package_files():
    from folora_ds.toolkit.grid.spec import DATA_FILES_DIR, shipped_paths

    resolved = shipped_paths({"data": "shipped:word_order.jsonl", "batch_size": 8,
                              "evaluation": {"test_data": "shipped:word_order_test.jsonl", "test_records": 5}})
    assert resolved["data"] == str(DATA_FILES_DIR / "word_order.jsonl")
    assert resolved["evaluation"] == {"test_data": str(DATA_FILES_DIR / "word_order_test.jsonl"), "test_records": 5}
    with pytest.raises(FileNotFoundError, match="names no shipped data file"):
        shipped_paths({"evaluation": {"questions": "shipped:nope.jsonl"}})


def test_a_folora_field_added_later_keeps_the_keys_of_runs_made_before_it():
    from folora_ds.toolkit.grid.spec import FOLORA_FIELDS_ADDED, GridRun, GridSettings

    settings = GridSettings(model="tiny-llama")
    run = GridRun(label="FoLoRA", method="folora", lr=4e-4, seed=0, steps=(60,))
    assert all(name not in run.identity(settings)["folora"] for name in FOLORA_FIELDS_ADDED)
    other = GridRun(label="FoLoRA", method="folora", lr=4e-4, seed=0, steps=(60,),
                    knobs={"eigensolver": "auto", "k": 64})
    assert other.identity(settings)["folora"]["eigensolver"] == "auto"
    assert other.slug(settings) != GridRun(label="FoLoRA", method="folora", lr=4e-4, seed=0, steps=(60,),
                                           knobs={"k": 64}).slug(settings)


def test_run_keys_and_records_name_shipped_data_files_not_the_install_path():
    """A clone in another folder must find the same finished runs (and committed run records): the key and the
    record say ``shipped:<name>``, never where the package happens to be installed."""
    from folora_ds.toolkit.grid.spec import DATA_FILES_DIR

    spec = load_spec("converged_words")
    run = spec.runs[0]
    identity, record = json.dumps(run.identity(spec.settings)), json.dumps(resolved_settings(run, spec.settings))
    assert spec.settings.data == str(DATA_FILES_DIR / "word_order.jsonl")  # the run itself reads the real file
    for text in (identity, record):
        assert str(DATA_FILES_DIR) not in text
        assert '"shipped:word_order.jsonl"' in text and '"shipped:word_order_test.jsonl"' in text

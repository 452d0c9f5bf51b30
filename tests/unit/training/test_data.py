"""Task data: loading local formats, record shapes, prompt-masked labels, padding and splitting."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from folora_ds.training.data import (
    DEFAULT_TASK_FILE,
    TaskCollator,
    build_task_dataset,
    load_task_dataset,
    record_to_messages,
    split_train_eval,
    tokenize_record,
)
from folora_ds.training.models import build_byte_tokenizer

RECORDS = [
    {"prompt": "Write 12 in words.", "response": "twelve"},
    {"prompt": "Write 4721 in words.", "response": "four thousand seven hundred twenty-one"},
    {"prompt": "Convert 5 to words.", "response": "five"},
]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture
def plain_tokenizer():
    """The byte tokenizer with its chat template removed: exercises the plain-concatenation format."""
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


def _label_text(tokenizer, example: dict[str, list[int]]) -> str:
    return tokenizer.decode([label for label in example["labels"] if label != -100])


# --- loading ---------------------------------------------------------------------------------------------------


def test_default_task_file_is_shipped() -> None:
    assert DEFAULT_TASK_FILE.is_file()
    assert len(load_task_dataset(DEFAULT_TASK_FILE)) == 400


def test_load_jsonl(tmp_path) -> None:
    loaded = load_task_dataset(_write_jsonl(tmp_path / "task.jsonl", RECORDS))
    assert loaded.to_list() == RECORDS


def test_load_json_array(tmp_path) -> None:
    path = tmp_path / "task.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    assert load_task_dataset(str(path)).to_list() == RECORDS


def test_load_parquet(tmp_path) -> None:
    path = tmp_path / "task.parquet"
    datasets.Dataset.from_list(RECORDS).to_parquet(str(path))
    assert load_task_dataset(path).to_list() == RECORDS


def test_load_saved_dataset_dir(tmp_path) -> None:
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    assert load_task_dataset(tmp_path / "saved").to_list() == RECORDS


def test_load_saved_dataset_dict_picks_split(tmp_path) -> None:
    saved = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(RECORDS), "validation": datasets.Dataset.from_list(RECORDS[:1])}
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    assert load_task_dataset(tmp_path / "saved").to_list() == RECORDS
    assert load_task_dataset(tmp_path / "saved", split="validation").to_list() == RECORDS[:1]


def test_load_saved_dataset_dict_missing_split_lists_available(tmp_path) -> None:
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"\['train'\].*'test'"):
        load_task_dataset(tmp_path / "saved", split="test")


def test_load_missing_path_names_it(tmp_path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_task_dataset(missing)


def test_load_unsupported_suffix_names_it_and_the_supported(tmp_path) -> None:
    path = tmp_path / "task.csv"
    path.write_text("prompt,response\na,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"task\.csv.*'\.csv'.*\.json.*\.jsonl.*\.parquet"):
        load_task_dataset(path)


@pytest.mark.parametrize(("name", "text"), [("empty.jsonl", ""), ("blank.jsonl", "  \n\n"), ("empty.json", "[]")])
def test_load_empty_json_has_no_records(tmp_path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=f"{name}.* has no records"):
        load_task_dataset(path)


def test_load_empty_parquet_has_no_records(tmp_path) -> None:
    path = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"prompt": [], "response": []}).to_parquet(str(path))
    with pytest.raises(ValueError, match="empty.parquet.* has no records"):
        load_task_dataset(path)


@pytest.mark.parametrize("first", [0, 300], ids=["dates-first", "text-first"])
def test_date_like_text_stays_text(tmp_path, first: int) -> None:
    """ISO dates once became a pyarrow timestamp column: refused with a self-contradicting message when they filled
    the file, a raw ArrowInvalid when text followed them."""
    dates = [{"prompt": f"When was release {i}?", "response": f"2019-02-{i % 28 + 1:02d}"} for i in range(400)]
    records = dates[:first] + [{"prompt": "Spell 7.", "response": "seven"}] + dates[first:]
    path = _write_jsonl(tmp_path / "dates.jsonl", records)
    loaded = load_task_dataset(path)
    assert loaded[0]["response"] == records[0]["response"] and isinstance(loaded[len(records) - 1]["response"], str)
    assert loaded.features["response"].dtype == "string"
    array = tmp_path / "dates.json"
    array.write_text(json.dumps(records), encoding="utf-8")
    assert load_task_dataset(array)["response"] == [record["response"] for record in records]


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "a", "response": 2019}, r"line 2: 'response' is a JSON number \(2019\), expected a string"),
    ({"prompt": ["a"], "response": "b"}, r"line 2: 'prompt' is a JSON array"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": True}]},
     r"line 2: 'messages\[1\]\.content' is a JSON boolean"),
])
def test_a_value_that_is_not_text_is_named_with_its_record_field_and_type(tmp_path, record, message) -> None:
    path = _write_jsonl(tmp_path / "task.jsonl", [{"prompt": "x", "response": "y"}, record])
    with pytest.raises(ValueError, match=message):
        load_task_dataset(path)


def test_non_utf8_bytes_are_named_with_file_and_line(tmp_path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl' line 2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_task_dataset(path)


def test_a_parquet_text_column_of_another_type_is_named(tmp_path) -> None:
    path = tmp_path / "numbers.parquet"
    datasets.Dataset.from_dict({"prompt": ["a", "b"], "response": [1, 2]}).to_parquet(str(path))
    with pytest.raises(ValueError, match="numbers.parquet': column 'response' has type"):
        load_task_dataset(path)


# --- record shapes ---------------------------------------------------------------------------------------------


def test_prompt_response_record_becomes_messages() -> None:
    assert record_to_messages({"prompt": "p", "response": "r", "system": "s"}) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "r"},
    ]
    assert record_to_messages({"prompt": "p", "response": "r"}) == [
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "r"},
    ]


def test_chat_record_passes_through() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert record_to_messages({"messages": messages}) == messages


def test_bad_record_shape_names_index_and_keys() -> None:
    with pytest.raises(ValueError, match=r"record 7: expected .*'prompt'.*'messages'.*found keys \['question'\]"):
        record_to_messages({"question": "q"}, index=7)


def test_chat_record_not_ending_with_assistant_names_index() -> None:
    messages = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]
    with pytest.raises(ValueError, match=r"record 3: 'messages'.*assistant.*\['assistant', 'user'\]"):
        record_to_messages({"messages": messages}, index=3)


# --- tokenization and label masking ----------------------------------------------------------------------------


def test_labels_mask_exactly_the_prompt_with_chat_template(tokenizer) -> None:
    record = RECORDS[1]
    example = tokenize_record(record, tokenizer, max_length=256)
    full = tokenizer.apply_chat_template(record_to_messages(record), tokenize=True, return_dict=False)
    assert example["input_ids"] == list(full)
    assert example["attention_mask"] == [1] * len(full)
    assert _label_text(tokenizer, example) == record["response"] + tokenizer.eos_token
    first = next(i for i, label in enumerate(example["labels"]) if label != -100)
    assert example["labels"][:first] == [-100] * first
    assert example["labels"][first:] == example["input_ids"][first:]
    assert tokenizer.decode(example["input_ids"][:first]).endswith("<|assistant|>")


def test_labels_mask_exactly_the_prompt_without_chat_template(plain_tokenizer) -> None:
    record = {"prompt": "Write 12 in words.", "response": "twelve", "system": "Be terse."}
    example = tokenize_record(record, plain_tokenizer, max_length=256)
    eos = plain_tokenizer.eos_token
    assert plain_tokenizer.decode(example["input_ids"]) == (
        f"{plain_tokenizer.bos_token}Be terse.\nWrite 12 in words.\ntwelve{eos}"
    )
    assert _label_text(plain_tokenizer, example) == "twelve" + eos
    first = example["labels"].index(next(label for label in example["labels"] if label != -100))
    assert example["labels"][first:] == example["input_ids"][first:]


def test_multi_turn_chat_record_labels_only_the_last_answer(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Write 1 in words."},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "Write 2 in words."},
        {"role": "assistant", "content": "two"},
    ]
    example = tokenize_record({"messages": messages}, tokenizer, max_length=256)
    assert _label_text(tokenizer, example) == "two" + tokenizer.eos_token


def test_truncation_keeps_a_partial_response(tokenizer) -> None:
    record = RECORDS[1]
    prompt_length = len(
        tokenizer.apply_chat_template(
            record_to_messages(record)[:-1], tokenize=True, add_generation_prompt=True, return_dict=False
        )
    )
    example = tokenize_record(record, tokenizer, max_length=prompt_length + 4)
    assert len(example["input_ids"]) == len(example["labels"]) == prompt_length + 4
    assert _label_text(tokenizer, example) == record["response"][:4]


def test_truncation_leaving_no_label_names_index_and_max_length(tokenizer) -> None:
    with pytest.raises(ValueError, match=r"record 5: .*max_length=10"):
        tokenize_record(RECORDS[1], tokenizer, max_length=10, index=5)


def test_template_that_is_not_prefix_stable_is_refused() -> None:
    tokenizer = build_byte_tokenizer()
    # The generation prompt differs from how the assistant turn is rendered, so the prompt is not a prefix.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ':' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT>' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="record 2: .*not prefix-stable"):
        tokenize_record(RECORDS[0], tokenizer, max_length=64, index=2)


def test_build_task_dataset_columns_and_labels(tmp_path, tokenizer) -> None:
    built = build_task_dataset(_write_jsonl(tmp_path / "task.jsonl", RECORDS), tokenizer, max_length=128)
    assert built.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(built) == len(RECORDS)
    for example, record in zip(built, RECORDS):
        assert _label_text(tokenizer, example) == record["response"] + tokenizer.eos_token


def test_build_task_dataset_reports_bad_record_index(tmp_path, tokenizer) -> None:
    records = [*RECORDS[:2], {"prompt": "only a prompt"}]
    with pytest.raises(ValueError, match=r"record 2: .*found keys \['prompt'\]"):
        build_task_dataset(_write_jsonl(tmp_path / "task.jsonl", records), tokenizer)


# --- collation and splitting -----------------------------------------------------------------------------------


def test_collator_right_pads_a_ragged_batch(tokenizer) -> None:
    features = [tokenize_record(record, tokenizer, max_length=256) for record in RECORDS]
    lengths = [len(feature["input_ids"]) for feature in features]
    assert len(set(lengths)) > 1
    batch = TaskCollator(pad_token_id=tokenizer.pad_token_id)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for tensor in batch.values():
        assert tensor.dtype == torch.int64
        assert tensor.shape == (len(features), max(lengths))
    for row, (feature, length) in enumerate(zip(features, lengths)):
        assert batch["input_ids"][row, :length].tolist() == feature["input_ids"]
        assert batch["labels"][row, :length].tolist() == feature["labels"]
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, length:] == -100).all()
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)


def test_collator_rejects_empty_batch() -> None:
    with pytest.raises(ValueError, match="empty"):
        TaskCollator(pad_token_id=0)([])


def test_split_train_eval_is_deterministic_and_disjoint() -> None:
    dataset = datasets.Dataset.from_dict({"x": list(range(20))})
    train, evaluation = split_train_eval(dataset, eval_fraction=0.2, seed=0)
    train_again, eval_again = split_train_eval(dataset, eval_fraction=0.2, seed=0)
    assert list(train["x"]) == list(train_again["x"]) and list(evaluation["x"]) == list(eval_again["x"])
    assert len(evaluation) == 4
    assert sorted(list(train["x"]) + list(evaluation["x"])) == list(range(20))
    assert list(split_train_eval(dataset, eval_fraction=0.2, seed=1)[1]["x"]) != list(evaluation["x"])


def test_split_train_eval_keeps_at_least_one_eval_record() -> None:
    train, evaluation = split_train_eval(datasets.Dataset.from_dict({"x": [1, 2, 3]}), eval_fraction=0.01, seed=0)
    assert (len(train), len(evaluation)) == (2, 1)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.5])
def test_split_train_eval_validates_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="eval_fraction"):
        split_train_eval(datasets.Dataset.from_dict({"x": [1, 2, 3]}), eval_fraction=fraction, seed=0)

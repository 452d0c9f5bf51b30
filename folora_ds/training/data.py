"""Task data: local files or saved ``datasets`` directories → tokenized examples with prompt-masked labels.

Records are ``{"prompt", "response"}`` (optional ``"system"``) or ``{"messages": [{"role", "content"}, ...]}``
ending with an assistant message. With a chat template the conversation is rendered by the tokenizer; the
labels are -100 on every token before the final assistant response, so the loss (and, with
``task_token_mask="labels"``, C_task) covers the response only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from folora_ds.common.files import read_jsonl_objects

DEFAULT_TASK_FILE = Path(__file__).resolve().parents[1] / "data_files" / "number_words.jsonl"
"""The shipped number-words task (400 records)."""

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_task_dataset(path: str | Path, *, split: str = "train") -> datasets.Dataset:
    """Load task records from a local ``.json``/``.jsonl``/``.parquet`` file or a ``save_to_disk`` directory.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unsupported suffix, a missing split of a saved DatasetDict, or no records.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"task data {str(path)!r} does not exist")
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"task data {str(path)!r} has splits {sorted(loaded)}, not {split!r}")
            loaded = loaded[split]
    else:
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"task data {str(path)!r}: unsupported file type {path.suffix!r}; "
                f"use {', '.join(sorted(_BUILDERS))} or a datasets.save_to_disk directory"
            )
        if path.stat().st_size == 0:  # the json builder fails on a zero-byte file with a bare StopIteration
            raise ValueError(f"task data {str(path)!r} has no records")
        if builder == "json":  # our reader: text stays text (pyarrow would read "2019-02-01" as a timestamp)
            records = _json_records(path)
            if not records:
                raise ValueError(f"task data {str(path)!r} has no records")
            loaded = datasets.Dataset.from_list(records)
        else:
            try:
                loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
            except ValueError as error:
                # datasets reports a file that yields no rows (a zero-row parquet) as an empty split.
                if "corresponds to no data" not in str(error):
                    raise
                raise ValueError(f"task data {str(path)!r} has no records") from error
            _check_text_columns(loaded, path)
    if len(loaded) == 0:
        raise ValueError(f"task data {str(path)!r} has no records")
    return loaded


def record_to_messages(record: Mapping, *, index: int | None = None) -> list[dict[str, str]]:
    """Normalise a record to chat messages ending with the assistant's response.

    Raises:
        ValueError: naming the record index, when the record has neither shape.
    """
    where = f"record {index}" if index is not None else "record"
    messages = record.get("messages")
    if messages is not None:
        if (
            not isinstance(messages, list)
            or len(messages) < 2
            or not all(
                isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
            or messages[-1]["role"] != "assistant"
        ):
            found = (
                f"roles {[m.get('role') if isinstance(m, Mapping) else type(m).__name__ for m in messages]}"
                if isinstance(messages, list)
                else f"a {type(messages).__name__}"
            )
            raise ValueError(
                f"{where}: 'messages' must be a list of >= 2 {{'role': str, 'content': str}} dicts "
                f"ending with an assistant message; found {found}"
            )
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt, response = record.get("prompt"), record.get("response")
    if isinstance(prompt, str) and isinstance(response, str):
        system = record.get("system")
        head = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
        return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    present = sorted(k for k, v in record.items() if v is not None)
    raise ValueError(
        f"{where}: expected {{'prompt': str, 'response': str}} or {{'messages': [...]}}; found keys {present}"
    )


def _template_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, add_generation_prompt: bool
) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    return list(ids)


def tokenize_record(
    record: Mapping, tokenizer: PreTrainedTokenizerBase, *, max_length: int, index: int | None = None
) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 on the prompt) of one record, truncated on the right.

    With a chat template, the prompt is the conversation up to the final assistant turn rendered with
    ``add_generation_prompt=True``, and it must be a prefix of the full rendering. Without one, the format is
    ``bos + earlier contents joined by newlines + newline + response + eos`` (roles dropped; BOS/EOS where
    the tokenizer has them). The response tokens, EOS included, are the only labels:

        input_ids: [ prompt ......... | response ... eos ]   length <= max_length
        labels:    [ -100 ... -100    | response ... eos ]

    Raises:
        ValueError: the chat template is not prefix-stable, or truncation leaves no response token.
    """
    where = f"record {index}" if index is not None else "record"
    messages = record_to_messages(record, index=index)
    if tokenizer.chat_template:
        prompt_ids = _template_ids(tokenizer, messages[:-1], add_generation_prompt=True)
        full_ids = _template_ids(tokenizer, messages, add_generation_prompt=False)
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                f"{where}: the tokenizer's chat template renders the prompt differently with and "
                "without the response (not prefix-stable); labels cannot be masked reliably"
            )
    else:
        prompt_text = "\n".join(m["content"] for m in messages[:-1]) + "\n"
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        prompt_ids = bos + tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        full_ids = prompt_ids + tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"] + eos
    full_ids = full_ids[:max_length]
    labels = [-100] * min(len(prompt_ids), len(full_ids)) + full_ids[len(prompt_ids) :]
    if all(label == -100 for label in labels):
        raise ValueError(f"{where}: no response token is left after truncation to max_length={max_length}")
    return {"input_ids": full_ids, "attention_mask": [1] * len(full_ids), "labels": labels}


def build_task_dataset(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, *, max_length: int = 256, split: str = "train"
) -> datasets.Dataset:
    """Load and tokenize task data (see ``tokenize_record``); columns ``input_ids``, ``attention_mask``, ``labels``.

    The map runs in memory with no cache files, so the result depends only on the file and the tokenizer.
    """
    raw = load_task_dataset(path, split=split)
    return raw.map(
        lambda record, index: tokenize_record(record, tokenizer, max_length=max_length, index=index),
        with_indices=True,
        remove_columns=raw.column_names,
        load_from_cache_file=False,
        keep_in_memory=True,
    )


def split_train_eval(
    dataset: datasets.Dataset, *, eval_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Deterministic train/eval split with at least one record on each side."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction!r} must be in (0, 1)")
    if len(dataset) < 2:
        raise ValueError(f"cannot split {len(dataset)} record(s) into train and eval")
    eval_size = min(max(1, round(len(dataset) * eval_fraction)), len(dataset) - 1)
    parts = dataset.train_test_split(test_size=eval_size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


@dataclass(frozen=True)
class TaskCollator:
    """Right-pads tokenized examples into int64 tensors of shape (batch, seq).

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0, ``labels`` with -100.
    """

    pad_token_id: int

    def __call__(self, features: list[Mapping]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("TaskCollator got an empty batch")
        length = max(len(feature["input_ids"]) for feature in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for feature in features:
            pad = length - len(feature["input_ids"])
            batch["input_ids"].append(list(feature["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append(list(feature["attention_mask"]) + [0] * pad)
            batch["labels"].append(list(feature["labels"]) + [-100] * pad)
        return {name: torch.tensor(rows, dtype=torch.long) for name, rows in batch.items()}


TEXT_FIELDS = ("prompt", "response", "system")
_JSON_TYPES = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}


def _json_records(path: Path) -> list[dict]:
    """The records of a JSON Lines file, or of a ``.json`` file holding one array of objects (else JSON Lines),
    each checked by ``_check_text_fields``."""
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(path.read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            whole = None  # JSON Lines under a .json name: read line by line below, errors with line numbers
        if isinstance(whole, list):
            for index, record in enumerate(whole):
                if not isinstance(record, dict):
                    raise ValueError(f"task data {str(path)!r} record {index}: expected a JSON object, got "
                                     f"{_JSON_TYPES.get(type(record), type(record).__name__)}")
                _check_text_fields(record, f"task data {str(path)!r} record {index}")
            return whole
    records = []
    for number, record in read_jsonl_objects(path, what="task data"):
        _check_text_fields(record, f"task data {str(path)!r} line {number}")
        records.append(record)
    return records


def _check_text_fields(record: Mapping, where: str) -> None:
    """Raise ValueError naming the field and its JSON type when a text field of ``record`` is not a string."""
    fields = [(name, record[name]) for name in TEXT_FIELDS if record.get(name) is not None]
    messages = record.get("messages")
    if isinstance(messages, list):
        fields += [(f"messages[{i}].{key}", message[key]) for i, message in enumerate(messages)
                   if isinstance(message, Mapping) for key in ("role", "content") if message.get(key) is not None]
    for name, value in fields:
        if not isinstance(value, str):
            kind = _JSON_TYPES.get(type(value), type(value).__name__)
            raise ValueError(f"{where}: '{name}' is a JSON {kind} ({json.dumps(value)[:40]}), expected a string; "
                             "quote it")


def _check_text_columns(dataset: datasets.Dataset, path: Path) -> None:
    """Raise ValueError naming the column and its type when a text column of a typed file (parquet) is not text."""
    for name in TEXT_FIELDS:
        feature = dataset.features.get(name)
        if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string", "null"):
            raise ValueError(f"task data {str(path)!r}: column {name!r} has type {feature!r}, expected strings")

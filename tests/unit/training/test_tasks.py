"""The built-in number-words task: spelling rules, generator determinism, and the shipped data file."""

from __future__ import annotations

import json
import re

import pytest

from folora_ds.training.data import DEFAULT_TASK_FILE
from folora_ds.training.tasks import generate_number_words_records, number_to_words, write_jsonl


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (20, "twenty"),
        (21, "twenty-one"),
        (99, "ninety-nine"),
        (100, "one hundred"),
        (101, "one hundred one"),
        (110, "one hundred ten"),
        (1000, "one thousand"),
        (4721, "four thousand seven hundred twenty-one"),
        (100_000, "one hundred thousand"),
        (1_000_001, "one million one"),
        (20_000_019, "twenty million nineteen"),
        (
            999_999_999,
            "nine hundred ninety-nine million nine hundred ninety-nine thousand nine hundred ninety-nine",
        ),
    ],
)
def test_number_to_words_american_style(n: int, words: str) -> None:
    assert number_to_words(n) == words


@pytest.mark.parametrize("bad", [-1, 10**9, 1.5, True])
def test_number_to_words_rejects_out_of_range(bad: object) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        number_to_words(bad)  # type: ignore[arg-type]


def test_generator_is_deterministic_for_a_seed() -> None:
    assert generate_number_words_records(50, seed=3) == generate_number_words_records(50, seed=3)
    assert generate_number_words_records(50, seed=3) != generate_number_words_records(50, seed=4)


def test_generator_varies_prompts_and_magnitudes_and_answers_correctly() -> None:
    records = generate_number_words_records(300, seed=0)
    numbers = []
    for record in records:
        assert set(record) == {"prompt", "response"}
        (digits,) = re.findall(r"\d+", record["prompt"])
        numbers.append(int(digits))
        assert record["response"] == number_to_words(int(digits))
    assert {len(str(n)) for n in numbers} == {1, 2, 3, 4, 5, 6}
    templates = {re.sub(r"\d+", "{n}", record["prompt"]) for record in records}
    assert len(templates) >= 3


def test_generator_rejects_negative_count() -> None:
    with pytest.raises(ValueError, match="num_records"):
        generate_number_words_records(-1, seed=0)


def test_write_jsonl_round_trips(tmp_path) -> None:
    records = generate_number_words_records(5, seed=1)
    path = tmp_path / "nested" / "out.jsonl"
    write_jsonl(records, path)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == records


def test_shipped_file_is_generator_output_for_seed_0() -> None:
    lines = DEFAULT_TASK_FILE.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 400
    assert [json.loads(line) for line in lines] == generate_number_words_records(400, seed=0)


def test_shipped_test_split_is_disjoint_from_training_and_reproducible():
    from folora_ds.training.tasks import number_words_test_records

    lines = (DEFAULT_TASK_FILE.parent / "number_words_test.jsonl").read_text()
    shipped = [json.loads(line) for line in lines.splitlines()]
    assert shipped == number_words_test_records(100)
    numbers = [int(re.search(r"\d+", record["prompt"]).group()) for record in shipped]
    training = {int(re.search(r"\d+", record["prompt"]).group()) for record in generate_number_words_records(400, 0)}
    assert len(set(numbers)) == 100 and not set(numbers) & training
    assert all(record["response"] == number_to_words(n) for record, n in zip(shipped, numbers))


def _shipped(name: str) -> list[dict]:
    path = DEFAULT_TASK_FILE.parent / name
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_convergence_training_set_is_the_generator_output_and_avoids_the_test_numbers() -> None:
    from folora_ds.training.tasks import number_words_training_records

    records = _shipped("number_words_4k.jsonl")
    assert records == number_words_training_records(4000)
    test_numbers = {int(re.search(r"\d+", record["prompt"]).group()) for record in _shipped("number_words_test.jsonl")}
    assert not test_numbers & {int(re.search(r"\d+", record["prompt"]).group()) for record in records}
    assert len({record["prompt"] for record in records}) > 2800  # one-digit draws repeat; the rest hardly


def test_word_order_answers_reverse_the_prompts_list() -> None:
    from folora_ds.training.tasks import WORDS, word_order_records

    for record in word_order_records(200, seed=5):
        words = record["prompt"].split(": ", 1)[1].split(", ")
        assert record["response"].split(", ") == words[::-1]
        assert 3 <= len(words) <= 5 and len(set(words)) == len(words) and set(words) <= set(WORDS)
    assert len(WORDS) == len(set(WORDS))


def test_the_word_order_files_are_the_generator_output_with_a_disjoint_test_split() -> None:
    from folora_ds.training.tasks import word_order_records, word_order_test_records

    train, test = _shipped("word_order.jsonl"), _shipped("word_order_test.jsonl")
    assert train == word_order_records(4000) and test == word_order_test_records(100)
    test_sets = {frozenset(record["response"].split(", ")) for record in test}
    assert len(test_sets) == 100  # no test list twice, in any order
    assert not test_sets & {frozenset(record["response"].split(", ")) for record in train}

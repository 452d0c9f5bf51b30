"""The built-in target tasks, both with exact-match answers and a test split disjoint from the training data.

- **Number words**: write a number in English words ("4721" → "four thousand seven hundred twenty-one"). A task a
  pretrained model is bad at and learns in minutes. ``data_files/number_words.jsonl`` is
  ``generate_number_words_records(400, seed=0)`` (the 60-step grid's training set);
  ``data_files/number_words_test.jsonl`` is ``number_words_test_records(100)``: numbers that never occur in it;
  ``data_files/number_words_4k.jsonl`` is ``number_words_training_records(4000)`` (training to convergence: 400
  records are memorised long before a few hundred steps), none of whose numbers is in the test split.
- **Word order**: say a list of words in reverse order ("river, apple, green" → "green, apple, river"). Not
  numbers and not a format the first task teaches; the answer is made of the prompt's own words, so a model
  learns a rule (attention back over the list), not facts. ``data_files/word_order.jsonl`` /
  ``word_order_test.jsonl`` are ``word_order_records(4000, seed=0)`` / ``word_order_test_records(100)``: no
  test list occurs in training, in any order.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

_ONES = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ((1_000_000, "million"), (1_000, "thousand"))
_PROMPTS = (
    "Write {n} in words.",
    "Spell out the number {n}.",
    "How do you write {n} in English words?",
    "Convert {n} to words.",
)


def _below_thousand(n: int) -> str:
    words = []
    if n >= 100:
        words.append(f"{_ONES[n // 100]} hundred")
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else ""))
    elif n > 0:
        words.append(_ONES[n])
    return " ".join(words)


def number_to_words(n: int) -> str:
    """American English words for 0 ≤ n < 10⁹, hyphens for 21–99, no "and" (e.g. 101 → "one hundred one")."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 10**9:
        raise ValueError(f"number_to_words supports integers in [0, 10**9), got {n!r}")
    if n == 0:
        return "zero"
    words = []
    for scale, name in _SCALES:
        if n >= scale:
            words.append(f"{_below_thousand(n // scale)} {name}")
            n %= scale
    if n:
        words.append(_below_thousand(n))
    return " ".join(words)


def generate_number_words_records(num_records: int, seed: int) -> list[dict[str, str]]:
    """``num_records`` prompt/response records, deterministic for ``seed``.

    Each record draws a digit count uniformly from 1 to 6, then a number with exactly that many digits
    (0 included for one digit), so small and large magnitudes are equally common; the prompt phrasing is
    one of a few templates.

    Raises:
        ValueError: ``num_records`` is negative.
    """
    if num_records < 0:
        raise ValueError(f"num_records must be >= 0, got {num_records}")
    rng = random.Random(seed)
    records = []
    for _ in range(num_records):
        digits = rng.randint(1, 6)
        n = rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)
        records.append({"prompt": rng.choice(_PROMPTS).format(n=n), "response": number_to_words(n)})
    return records


def _number_of(record: dict[str, str]) -> int:
    return int(re.search(r"\d+", record["prompt"]).group())


def number_words_test_records(num_records: int, *, seed: int = 1,
                              exclude: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
    """``num_records`` records drawn like ``generate_number_words_records(…, seed)`` whose numbers occur neither in
    ``exclude`` (default: the shipped training set, ``generate_number_words_records(400, seed=0)``) nor twice."""
    seen = {_number_of(record) for record in (generate_number_words_records(400, seed=0) if exclude is None
                                               else exclude)}
    records: list[dict[str, str]] = []
    batch = 0
    while len(records) < num_records:
        for record in generate_number_words_records(4 * num_records + 16, seed=seed * 1_000 + batch):
            number = _number_of(record)
            if number not in seen and len(records) < num_records:
                seen.add(number)
                records.append(record)
        batch += 1
    return records


def number_words_training_records(num_records: int, *, seed: int = 2) -> list[dict[str, str]]:
    """``num_records`` records drawn like ``generate_number_words_records`` whose numbers are not in the shipped
    test split (``number_words_test_records(100)``), for training far past 400 records."""
    test_numbers = {_number_of(record) for record in number_words_test_records(100)}
    records: list[dict[str, str]] = []
    batch = 0
    while len(records) < num_records:
        for record in generate_number_words_records(2 * num_records, seed=seed * 1_000 + batch):
            if _number_of(record) not in test_numbers and len(records) < num_records:
                records.append(record)
        batch += 1
    return records


WORDS = tuple("""
apple river green stone cloud window garden silver tiger pencil orange castle candle forest yellow rabbit
bottle summer winter mountain ocean pepper carpet basket button camera rocket violin planet butter ladder
mirror pillow shadow spider thunder tomato wallet hammer jacket kettle lemon marble needle parrot pocket
saddle tunnel velvet wagon zebra anchor barrel blanket bucket cabbage cactus canyon cherry copper cotton
desert dragon engine falcon feather fiddle flower garlic ginger glove harbor helmet island jungle kitchen
lantern lizard meadow monkey muffin napkin noodle onion oyster paddle palace peanut pebble pickle pirate
puzzle quilt radish ribbon saucer scarf shovel sponge squirrel statue sugar sweater teapot ticket tulip
turtle umbrella valley vessel walnut whistle willow wizard blue purple brown silent gentle rapid quiet
bright frozen golden hollow humble lucky narrow polite rusty sandy shiny smooth sticky sunny tiny wooden
coffee dinner lobster pumpkin puppet rainbow sailor shell snow spoon storm sunset table tower train
violet wheel wolf acorn badger beetle bridge cliff crystal daisy dolphin eagle fox goat honey iron
lamp maple mouse nest owl pearl pine pond robin rose salmon seed sheep silk swan thorn toad trumpet vine
""".split())
"""The word-order task's vocabulary: common English words, none a number or a date."""

_WORD_ORDER_PROMPTS = (
    "Reverse the order of these words: {words}",
    "Write these words in reverse order: {words}",
    "List these words from last to first: {words}",
)


def _word_list(rng: random.Random) -> tuple[str, ...]:
    return tuple(rng.sample(sorted(set(WORDS)), rng.randint(3, 5)))


def _word_order_record(words: tuple[str, ...], rng: random.Random) -> dict[str, str]:
    return {"prompt": rng.choice(_WORD_ORDER_PROMPTS).format(words=", ".join(words)),
            "response": ", ".join(reversed(words))}


def word_order_test_records(num_records: int, *, seed: int = 1) -> list[dict[str, str]]:
    """``num_records`` word-order items (3 to 5 distinct words), no two with the same set of words."""
    rng = random.Random(seed)
    records: list[dict[str, str]] = []
    seen: set[frozenset[str]] = set()
    while len(records) < num_records:
        words = _word_list(rng)
        if frozenset(words) not in seen:
            seen.add(frozenset(words))
            records.append(_word_order_record(words, rng))
    return records


def word_order_records(num_records: int, *, seed: int = 0) -> list[dict[str, str]]:
    """``num_records`` training items drawn like ``word_order_test_records``, none of whose word sets is in the
    shipped test split (``word_order_test_records(100)``), in any order."""
    test_sets = {frozenset(record["response"].split(", ")) for record in word_order_test_records(100)}
    rng = random.Random(seed)
    records: list[dict[str, str]] = []
    while len(records) < num_records:
        words = _word_list(rng)
        if frozenset(words) not in test_sets:
            records.append(_word_order_record(words, rng))
    return records


def write_jsonl(records: list[dict], path: str | Path) -> None:
    """Write one JSON object per line (UTF-8), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")

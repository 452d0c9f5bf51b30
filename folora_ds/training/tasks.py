"""The built-in target task: write a number in English words ("4721" → "four thousand seven hundred twenty-one").

A task a pretrained model is bad at and learns in minutes, with exact-match answers. The shipped file
``data_files/number_words.jsonl`` is ``generate_number_words_records(400, seed=0)`` (training);
``data_files/number_words_test.jsonl`` is ``number_words_test_records(100)``: numbers that never occur in it.
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


def write_jsonl(records: list[dict], path: str | Path) -> None:
    """Write one JSON object per line (UTF-8), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")

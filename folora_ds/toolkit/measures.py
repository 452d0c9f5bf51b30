"""The measures of what an adapted model kept and what it learned, each against its base model.

- **KL on held-out real text**: mean per-token KL(base ‖ adapted) and the perplexity of both on text that is
  neither task data nor the proxy set (``heldout_texts``: docstrings of the Python standard library, present on
  every machine). For a peft model the base is the same model with its adapter disabled, so no second copy is
  held.
- **Retention**: of the shipped questions (``data_files/retention_questions.jsonl``: facts and simple instructions,
  each with accepted answers) that the base model answers correctly, the fraction the adapted model still answers
  correctly. Answers are greedy, through the tokenizer's chat template, in fixed batches with left padding
  (``greedy_answers``; padding can flip a near-tied greedy token, so every model is measured this one way).
- **Target accuracy**: exact match of the greedy answer with the reference after ``normalize_answer``.

The math (``token_kl``, ``normalize_answer``, ``answer_is_correct``) is pure; the model-running functions take a
model and a tokenizer and never change them.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from folora_ds.common.checks import require_int
from folora_ds.common.files import read_jsonl_objects

QUESTIONS_FILE = Path(__file__).parent.parent / "data_files" / "retention_questions.jsonl"
HELDOUT_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email.message", "fractions", "functools",
                   "heapq", "http.client", "inspect", "io", "itertools", "json", "logging", "pathlib", "pickle",
                   "random", "re", "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap",
                   "threading", "unittest", "urllib.parse", "zipfile")


# ---------------------------------------------------------------------------------------------- pure measures
def token_kl(base_logits: torch.Tensor, adapted_logits: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Σ over counted positions of KL(p_base ‖ p_adapted) = Σ_v p_b (log p_b − log p_a), and the count.

    Args:
        base_logits, adapted_logits: (batch, seq, vocab) next-token logits of the same inputs.
        mask: (batch, seq), 1 where the position's prediction counts.
    """
    if base_logits.shape != adapted_logits.shape or base_logits.shape[:2] != mask.shape:
        raise ValueError(f"logits {tuple(base_logits.shape)} / {tuple(adapted_logits.shape)} and mask "
                         f"{tuple(mask.shape)} do not match")
    base = torch.log_softmax(base_logits.double(), dim=-1)
    adapted = torch.log_softmax(adapted_logits.double(), dim=-1)
    per_position = (base.exp() * (base - adapted)).sum(-1)
    counted = mask.bool()
    return float(per_position[counted].sum()), int(counted.sum())


def normalize_answer(text: str) -> str:
    """Lower case, words only: punctuation other than hyphens and digits' separators dropped, whitespace collapsed
    ("Twenty-One." → "twenty-one")."""
    text = text.lower().replace("’", "'")
    text = re.sub(r"[^\w\s\-,']", " ", text)
    text = re.sub(r"(?<!\d),|,(?!\d)", " ", text)
    return " ".join(text.split())


def exact_match(generated: str, reference: str) -> bool:
    """The generated answer equals the reference after ``normalize_answer``."""
    return normalize_answer(generated) == normalize_answer(reference)


def answer_is_correct(generated: str, accepted: Sequence[str]) -> bool:
    """Any accepted answer appears in the generated text as whole words (after ``normalize_answer``)."""
    text = f" {normalize_answer(generated)} "
    return any(f" {normalize_answer(answer)} " in text for answer in accepted)


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Question:
    """A retention probe: ``prompt`` and the ``answers`` accepted (any one, as whole words); ``kind`` is "fact"
    or "instruction"."""

    prompt: str
    answers: tuple[str, ...]
    kind: str


def load_questions(path: str | Path = QUESTIONS_FILE) -> list[Question]:
    """The retention questions of a JSONL file of ``{"prompt", "answers", "kind"}`` (the shipped set by default).

    Raises:
        ValueError: a line is not valid JSON or lacks a field (the line is named).
    """
    questions = []
    for line, record in read_jsonl_objects(Path(path), what="retention questions"):
        if not isinstance(record.get("prompt"), str) or not record.get("answers") or record.get("kind") not in (
                "fact", "instruction"):
            raise ValueError(f"{path} line {line}: expected prompt (text), answers (non-empty list) and kind "
                             "('fact' or 'instruction')")
        questions.append(Question(record["prompt"], tuple(str(a) for a in record["answers"]), record["kind"]))
    return questions


def heldout_texts(count: int = 48, *, min_chars: int = 400, max_chars: int = 1200, seed: int = 0) -> list[str]:
    """``count`` passages of real English technical prose: docstrings of public functions and classes of the
    Python standard library modules in ``HELDOUT_MODULES`` (the same on every machine with the same Python;
    doctest sessions left out), cut to at most ``max_chars`` at a sentence end, deterministic for ``seed``.

    Raises:
        ValueError: fewer than ``count`` passages are long enough.
    """
    passages = set()
    for module_name in HELDOUT_MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(dir(module)):
            if name.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, name, None))
            text = " ".join((doc or "").split())
            if len(text) >= min_chars and ">>>" not in text:  # prose, not doctest sessions
                if len(text) > max_chars:
                    cut = text.rfind(". ", 0, max_chars)
                    text = text[:cut + 1] if cut > min_chars else text[:max_chars]
                passages.add(text)
    ordered = sorted(passages)
    if len(ordered) < count:
        raise ValueError(f"only {len(ordered)} held-out passages of at least {min_chars} characters; ask for fewer")
    random.Random(seed).shuffle(ordered)
    return ordered[:count]


# ---------------------------------------------------------------------------------------------- model runs
def _base_of(model):
    """A context in which ``model`` computes its base model's outputs: peft's ``disable_adapter`` when it has
    adapters, else nothing to do."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


class BaseLogitsCache:
    """The base model's logits on the held-out batches, kept after the first ``kl_on_text`` call and reused by the
    next ones: every adapter of a grid (or of one ``folora-ds evaluate``) is measured against the same base, so
    its forward pass — half of the KL's cost — runs once. Holds batch × length × vocab float32 logits per batch
    (~2.4 GB for SmolLM2's 48 passages of 256 tokens); the results are bit-identical to recomputing them."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.batches: list[torch.Tensor] = []

    def bind(self, key: tuple) -> None:
        """Use the cache for the batches of ``key`` (texts, max_length, batch_size, device); another key is an
        error rather than a silently wrong KL."""
        if self.key is None:
            self.key = key
        elif self.key != key:
            raise ValueError("BaseLogitsCache: filled for other texts, max_length, batch size or device; use one "
                             "cache per evaluation setting")


@torch.no_grad()
def kl_on_text(model, tokenizer, texts: Iterable[str], *, base_model=None, max_length: int = 256,
               batch_size: int = 4, base_cache: BaseLogitsCache | None = None) -> dict[str, float]:
    """Mean per-token KL(base ‖ adapted) and both perplexities on ``texts``.

    ``model`` is the adapted model; the base is ``base_model`` when given, else ``model`` with its peft adapter
    disabled; with ``base_cache`` the base's logits are computed once and reused by later calls. Every token after
    the first of each text counts (right padding masked).

    Returns:
        ``{"kl_per_token", "base_perplexity", "adapted_perplexity", "tokens"}``.
    """
    device = next(model.parameters()).device
    texts = list(texts)
    if base_cache is not None:
        base_cache.bind((tuple(texts), max_length, batch_size, str(device)))
    kl_sum, nll_base, nll_adapted, tokens = 0.0, 0.0, 0.0, 0
    was_training = model.training
    model.eval()
    for index, start in enumerate(range(0, len(texts), batch_size)):
        encoded = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length).to(device)
        inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        adapted_logits = model(**inputs).logits[:, :-1]
        if base_cache is not None and index < len(base_cache.batches):
            base_logits = base_cache.batches[index]
        elif base_model is None:
            with _base_of(model):
                base_logits = model(**inputs).logits[:, :-1]
        else:
            base_logits = base_model(**inputs).logits[:, :-1]
        if base_cache is not None and index == len(base_cache.batches):
            base_cache.batches.append(base_logits)
        mask = encoded["attention_mask"][:, 1:] * encoded["attention_mask"][:, :-1]
        targets = encoded["input_ids"][:, 1:]
        kl, count = token_kl(base_logits, adapted_logits, mask)
        kl_sum, tokens = kl_sum + kl, tokens + count
        for logits, into in ((base_logits, "base"), (adapted_logits, "adapted")):
            nll = torch.nn.functional.cross_entropy(logits.double().transpose(1, 2), targets, reduction="none")
            value = float(nll[mask.bool()].sum())
            if into == "base":
                nll_base += value
            else:
                nll_adapted += value
    model.train(was_training)
    if tokens == 0:
        raise ValueError("kl_on_text: the texts gave no token to score")
    return {"kl_per_token": kl_sum / tokens, "base_perplexity": math.exp(nll_base / tokens),
            "adapted_perplexity": math.exp(nll_adapted / tokens), "tokens": tokens}


@torch.no_grad()
def answer_kl(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *, batch_size: int = 8
              ) -> dict[str, float]:
    """KL(base ‖ adapted) per token on given answers to user prompts, teacher-forced: each prompt as a user turn
    of the chat template (as ``greedy_answers`` asks it) followed by its answer, and only the predictions of the
    answer's tokens counted. With the base model's own greedy answers this measures how far the adapted model
    moved where a chat answer is made, beside ``kl_on_text``'s plain passages. The base is ``model`` with its
    peft adapter disabled.

    Returns:
        ``{"kl_per_token", "first_token_kl" (the mean at each answer's first token, where an answer's style is
        chosen), "tokens", "answers"}``.

    Raises:
        ValueError: ``prompts`` and ``answers`` differ in length, or no answer has a token.
    """
    require_int("batch_size", batch_size)
    if len(prompts) != len(answers):
        raise ValueError(f"answer_kl: {len(prompts)} prompts but {len(answers)} answers")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pairs = []
    for prompt, answer in zip(prompts, answers):
        prompt_ids = tokenizer(_chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if answer_ids:
            pairs.append((prompt_ids, answer_ids))
    if not pairs:
        raise ValueError("answer_kl: no answer has a token to score")
    kl_sum, tokens, first_sum = 0.0, 0, 0.0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        length = max(len(p) + len(a) for p, a in batch)
        input_ids = torch.full((len(batch), length), pad, dtype=torch.long)
        attention = torch.zeros(len(batch), length, dtype=torch.long)
        counted = torch.zeros(len(batch), length - 1, dtype=torch.long)  # predictions of answer tokens
        first = torch.zeros_like(counted)
        for row, (prompt_ids, answer_ids) in enumerate(batch):
            ids = prompt_ids + answer_ids
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention[row, :len(ids)] = 1
            counted[row, len(prompt_ids) - 1:len(ids) - 1] = 1
            first[row, len(prompt_ids) - 1] = 1
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
        adapted_logits = model(**inputs).logits[:, :-1]
        with _base_of(model):
            base_logits = model(**inputs).logits[:, :-1]
        kl, count = token_kl(base_logits, adapted_logits, counted.to(device))
        kl_sum, tokens = kl_sum + kl, tokens + count
        first_sum += token_kl(base_logits, adapted_logits, first.to(device))[0]
    model.train(was_training)
    return {"kl_per_token": kl_sum / tokens, "first_token_kl": first_sum / len(pairs), "tokens": tokens,
            "answers": len(pairs)}


def _chat_prompt(tokenizer, prompt: str) -> str:
    """``prompt`` as one user turn of the tokenizer's chat template (ready for the answer), or as is without one."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    return prompt


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 16,
                   progress: bool = False, description: str = "generating") -> list[str]:
    """The model's greedy answer to each user prompt (chat template when the tokenizer has one).

    Prompts go in batches of ``batch_size`` with left padding, in the given order, so the same prompts give the
    same batches for every model compared (padding can change a greedy answer in the last float bit's way; every
    model is measured this one way). A batch stops when every row has ended or ``max_new_tokens`` were made.
    """
    require_int("batch_size", batch_size)
    device = next(model.parameters()).device
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=description, disable=not progress, leave=False):
            texts = [_chat_prompt(tokenizer, prompt) for prompt in prompts[start:start + batch_size]]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = output[:, encoded["input_ids"].shape[1]:]
            answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return answers


def greedy_answer(model, tokenizer, prompt: str, *, max_new_tokens: int = 32) -> str:
    """The model's greedy answer to one user ``prompt`` (``greedy_answers`` of a batch of one)."""
    return greedy_answers(model, tokenizer, [prompt], max_new_tokens=max_new_tokens)[0]


def answers_correct(model, tokenizer, questions: Sequence[Question], *, max_new_tokens: int = 32,
                    batch_size: int = 16, progress: bool = False) -> list[bool]:
    """Whether the model answers each question correctly (``answer_is_correct`` of its greedy answer)."""
    answers = greedy_answers(model, tokenizer, [question.prompt for question in questions],
                             max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                             description="retention questions")
    return [answer_is_correct(answer, question.answers) for answer, question in zip(answers, questions)]


def retention(base_correct: Sequence[bool], adapted_correct: Sequence[bool]) -> float:
    """The fraction of the questions the base model answered correctly that the adapted model still answers
    correctly (1.0 when the base answered none)."""
    if len(base_correct) != len(adapted_correct):
        raise ValueError(f"{len(base_correct)} base answers but {len(adapted_correct)} adapted answers")
    kept = [adapted for base, adapted in zip(base_correct, adapted_correct) if base]
    return 1.0 if not kept else sum(kept) / len(kept)


def has_number_answer(question: Question) -> bool:
    """Whether an accepted answer of ``question`` is written in digits ("12", "-3", "3.14", "1, 2, 3"; not "H2O"):
    the questions a task about numbers can collide with head-on, reported apart from the rest."""
    return any(re.fullmatch(r"[\d\s,.\-]+", answer.strip()) and any(c.isdigit() for c in answer)
               for answer in question.answers)


def retention_by_group(questions: Sequence[Question], base_correct: Sequence[bool],
                       adapted_correct: Sequence[bool]) -> dict[str, tuple[int, int]]:
    """``{"number answers": (kept, base_correct), "other": (kept, base_correct)}``: ``retention`` split by
    ``has_number_answer``, as counts.

    Raises:
        ValueError: the three sequences differ in length.
    """
    if not len(questions) == len(base_correct) == len(adapted_correct):
        raise ValueError(f"{len(questions)} questions, {len(base_correct)} base answers, {len(adapted_correct)} "
                         "adapted answers")
    groups = {"number answers": [0, 0], "other": [0, 0]}
    for question, base, adapted in zip(questions, base_correct, adapted_correct):
        if base:
            counts = groups["number answers" if has_number_answer(question) else "other"]
            counts[0] += bool(adapted)
            counts[1] += 1
    return {name: (kept, total) for name, (kept, total) in groups.items()}


def target_accuracy(model, tokenizer, records: Sequence[dict], *, max_new_tokens: int = 48, batch_size: int = 16,
                    progress: bool = False) -> float:
    """Exact-match accuracy on ``{"prompt", "response"}`` records (the target task's test split)."""
    if not records:
        raise ValueError("target_accuracy: no test records")
    answers = greedy_answers(model, tokenizer, [record["prompt"] for record in records],
                             max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                             description="target task")
    return sum(exact_match(answer, record["response"]) for answer, record in zip(answers, records)) / len(records)


# ---------------------------------------------------------------------------------------------- adapters

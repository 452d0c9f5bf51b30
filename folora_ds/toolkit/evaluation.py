"""``folora-ds evaluate``: the evaluation suite (held-out text, retention questions, target test records) run on a
base model and its adapters, with one summary per adapter. The measures themselves are ``measures.py``."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from folora_ds.common.checks import require_int
from folora_ds.common.files import check_safetensors, read_json_file, read_jsonl_objects
from folora_ds.toolkit.measures import (
    QUESTIONS_FILE,
    BaseLogitsCache,
    Question,
    answers_correct,
    heldout_texts,
    kl_on_text,
    load_questions,
    retention,
    target_accuracy,
)
from folora_ds.training.models import load_model

_log = logging.getLogger(__name__)

TEST_FILE = Path(__file__).parent.parent / "data_files" / "number_words_test.jsonl"


@dataclass(frozen=True)
class EvaluationSettings:
    """What ``evaluate_adapters`` measures (validated on construction).

    Attributes:
        test_data: target-task test records (``{"prompt", "response"}`` JSONL; default: the number-words test split,
            disjoint from the shipped training set). test_records: how many of them (None: all).
        questions: retention questions JSONL. question_records: how many of them (None: all).
        legacy_questions: a second retention probe, scored the same way and reported beside the first
            (``legacy_retention``): a grid that moves to a new probe keeps the old one's numbers comparable.
        heldout_passages: held-out text passages for KL and perplexity.
        max_length: tokens per held-out passage. max_new_tokens: tokens per answer to a retention question;
        target_max_new_tokens: per answer to a target-task item.
        batch_size: prompts generated together (fixed, so every model sees the same batches).
    """

    test_data: str = str(TEST_FILE)
    test_records: int | None = 100
    questions: str = str(QUESTIONS_FILE)
    question_records: int | None = None
    legacy_questions: str | None = None
    heldout_passages: int = 48
    max_length: int = 256
    max_new_tokens: int = 32
    target_max_new_tokens: int = 48
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("heldout_passages", "max_length", "max_new_tokens", "target_max_new_tokens", "batch_size"):
            require_int(name, getattr(self, name))
        for name in ("test_records", "question_records"):
            require_int(name, getattr(self, name), optional=True)
        for name in ("test_data", "questions", "legacy_questions"):
            if getattr(self, name) is not None and not Path(getattr(self, name)).is_file():
                raise FileNotFoundError(f"{name} {getattr(self, name)!r} does not exist")


def _test_records(settings: EvaluationSettings) -> list[dict]:
    records = []
    for line, record in read_jsonl_objects(Path(settings.test_data), what="test data"):
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
            raise ValueError(f"test data {settings.test_data!r} line {line}: expected prompt and response text")
        records.append(record)
    return records if settings.test_records is None else records[:settings.test_records]


@dataclass(frozen=True)
class EvaluationSuite:
    """The loaded probes of one ``EvaluationSettings``: test records, retention questions (and the legacy probe's,
    empty without one), held-out passages."""

    settings: EvaluationSettings
    records: tuple[dict, ...]
    questions: tuple[Question, ...]
    texts: tuple[str, ...]
    legacy_questions: tuple[Question, ...] = ()

    @classmethod
    def load(cls, settings: EvaluationSettings) -> EvaluationSuite:
        questions = load_questions(settings.questions)
        if settings.question_records is not None:
            questions = questions[:settings.question_records]
        legacy = () if settings.legacy_questions is None else tuple(load_questions(settings.legacy_questions))
        return cls(settings, tuple(_test_records(settings)), tuple(questions),
                   tuple(heldout_texts(settings.heldout_passages)), legacy)


def _answers(model, tokenizer, suite: EvaluationSuite, progress: bool) -> tuple[list[bool], list[bool], float]:
    """Which retention questions ``model`` answers correctly (each probe in its own fixed batches, so a probe's
    answers do not depend on the other's presence), and its target accuracy."""
    settings = suite.settings
    correct, legacy = (answers_correct(model, tokenizer, questions, max_new_tokens=settings.max_new_tokens,
                                       batch_size=settings.batch_size, progress=progress) if questions else []
                       for questions in (suite.questions, suite.legacy_questions))
    accuracy = target_accuracy(model, tokenizer, suite.records, max_new_tokens=settings.target_max_new_tokens,
                               batch_size=settings.batch_size, progress=progress)
    return correct, legacy, accuracy


def measure_base(model, tokenizer, suite: EvaluationSuite, *, progress: bool = False) -> dict:
    """The base model's target accuracy and questions answered; ``"correct"`` (and ``"legacy_correct"`` with a
    legacy probe) lists which (for ``retention``)."""
    started = time.perf_counter()
    correct, legacy, accuracy = _answers(model, tokenizer, suite, progress)
    result = {"target_accuracy": accuracy, "questions_correct": sum(correct) / len(correct), "correct": correct}
    if legacy:
        result.update(legacy_questions_correct=sum(legacy) / len(legacy), legacy_correct=legacy)
    return {**result, "seconds": time.perf_counter() - started}


def measure_adapted(model, tokenizer, suite: EvaluationSuite, base_correct: Sequence[bool], *,
                    progress: bool = False, base_cache: BaseLogitsCache | None = None,
                    base_legacy_correct: Sequence[bool] | None = None) -> dict:
    """An adapted peft model against its base (the same model with the adapter disabled): target accuracy,
    questions answered, retention of ``base_correct`` (and ``legacy_retention`` of ``base_legacy_correct``, needed
    with a legacy probe) and KL / perplexities on the held-out passages (the base's logits kept in ``base_cache``
    when given, for the next adapter)."""
    if bool(suite.legacy_questions) != (base_legacy_correct is not None):
        raise ValueError("measure_adapted: pass base_legacy_correct exactly when the suite has a legacy probe")
    started = time.perf_counter()
    correct, legacy, accuracy = _answers(model, tokenizer, suite, progress)
    result = {"target_accuracy": accuracy, "questions_correct": sum(correct) / len(correct),
              "retention": retention(base_correct, correct),
              **kl_on_text(model, tokenizer, suite.texts, max_length=suite.settings.max_length,
                           base_cache=base_cache)}
    if legacy:
        result.update(legacy_questions_correct=sum(legacy) / len(legacy),
                      legacy_retention=retention(base_legacy_correct, legacy))
    result["seconds"] = time.perf_counter() - started
    return result


def evaluate_adapters(model_name: str, adapters: dict[str, str | Path], settings: EvaluationSettings, *,
                      progress: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32
                      ) -> dict[str, dict]:
    """The base model and each peft adapter (name → directory) on the target task, held-out text and retention.

    The base model is loaded once; each adapter is attached with ``PeftModel.from_pretrained`` (as a user would
    load it) and removed again; everything runs on ``device`` in ``dtype`` (e.g. "cuda", torch.bfloat16 for an 8B
    model; KL and perplexities are computed in float64 from the logits).

    Returns ``{"base": {...}, name: {...}}`` with ``target_accuracy``, ``questions_correct`` (fraction), and for
    adapters ``kl_per_token``, ``base_perplexity``,
    ``adapted_perplexity``, ``retention`` and ``seconds``.

    Raises:
        FileNotFoundError: a missing adapter directory (before the model is loaded).
    """
    from peft import PeftModel

    for name, path in adapters.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter {name!r}: {str(path)!r} has no adapter_config.json")
        read_json_file(Path(path) / "adapter_config.json", what=f"adapter {name!r} config")
        for weights in Path(path).glob("*.safetensors"):
            check_safetensors(weights, what=f"adapter {name!r} weights")
    suite = EvaluationSuite.load(settings)
    base, tokenizer = load_model(model_name, dtype=dtype)
    base.to(device)
    for name, path in adapters.items():  # every adapter opened on the model (names, shapes) before any forward
        try:
            base = PeftModel.from_pretrained(base, str(path)).unload()
        except (RuntimeError, ValueError, KeyError, OSError) as error:
            raise ValueError(f"adapter {name!r} ({str(path)!r}) does not load on {model_name!r}: {error}") from error
    base_result = measure_base(base, tokenizer, suite, progress=progress)
    results = {"base": {key: value for key, value in base_result.items()
                        if key not in ("correct", "legacy_correct")}}  # the per-question lists stay internal
    base_cache = BaseLogitsCache() if len(adapters) > 1 else None
    for name, path in adapters.items():
        _log.info("evaluating %s: %s", name, path)
        model = PeftModel.from_pretrained(base, str(path)).eval()
        results[name] = measure_adapted(model, tokenizer, suite, base_result["correct"], progress=progress,
                                        base_cache=base_cache, base_legacy_correct=base_result.get("legacy_correct"))
        base = model.unload()
    return results


def format_evaluation(results: dict[str, dict]) -> str:
    """A markdown table of ``evaluate_adapters``' results."""
    lines = ["| model | target accuracy | questions correct | retention of base-correct | KL(base‖adapted) per "
             "token | perplexity base → adapted |", "|---|---|---|---|---|---|"]
    for name, row in results.items():
        kl = f"{row['kl_per_token']:.4f}" if "kl_per_token" in row else "—"
        perplexity = (f"{row['base_perplexity']:.2f} → {row['adapted_perplexity']:.2f}"
                      if "base_perplexity" in row else "—")
        kept = f"{row['retention']:.1%}" if "retention" in row else "—"
        lines.append(f"| {name} | {row['target_accuracy']:.1%} | {row['questions_correct']:.1%} | {kept} | {kl} | "
                     f"{perplexity} |")
    return "\n".join(lines)

"""folora_ds.toolkit.measures: KL against the base (the disabled adapter, or a cached base), answers, retention, the
shipped questions and held-out text."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from folora_ds.method.peft_layers import lora_b_weight, lora_layers
from folora_ds.toolkit import measures
from folora_ds.toolkit.measures import (
    BaseLogitsCache,
    Question,
    answer_is_correct,
    answer_kl,
    exact_match,
    greedy_answer,
    greedy_answers,
    has_number_answer,
    heldout_texts,
    kl_on_text,
    load_questions,
    normalize_answer,
    retention,
    retention_by_group,
    token_kl,
)
from folora_ds.training.models import load_model


def test_token_kl_is_zero_for_equal_logits_and_matches_the_definition():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, 5, generator=generator)
    adapted = torch.randn(2, 3, 5, generator=generator)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert token_kl(base, base, mask) == (0.0, 3)
    p, q = torch.softmax(base.double(), -1), torch.softmax(adapted.double(), -1)
    expected = sum(float((p[b, s] * (p[b, s].log() - q[b, s].log())).sum()) for b, s in ((0, 0), (0, 1), (1, 0)))
    total, count = token_kl(base, adapted, mask)
    assert count == 3 and total == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="do not match"):
        token_kl(base, adapted, mask[:, :2])


@pytest.mark.parametrize(("generated", "reference", "equal"), [
    ("Twenty-one.", "twenty-one", True),
    ("  four thousand seven hundred twenty-one ", "four thousand seven hundred twenty-one", True),
    ("four thousand seven hundred twenty one", "four thousand seven hundred twenty-one", False),
    ("1,234", "1,234", True),
    ("one hundred and one", "one hundred one", False),
])
def test_exact_match_normalizes_case_and_punctuation_only(generated, reference, equal):
    assert exact_match(generated, reference) is equal


def test_answer_is_correct_needs_whole_words():
    assert answer_is_correct("The capital of France is Paris.", ["Paris"])
    assert answer_is_correct("It is H2O!", ["H2O"])
    assert not answer_is_correct("Parisian food", ["Paris"])
    assert answer_is_correct("1, 2, 3, 4, 5", ["1, 2, 3, 4, 5"])
    assert not answer_is_correct("The answer is 15.", ["5"])
    assert normalize_answer("Leonardo  da Vinci’s") == "leonardo da vinci's"


def test_retention_counts_only_what_the_base_got_right():
    assert retention([True, True, False, True], [True, False, True, True]) == pytest.approx(2 / 3)
    assert retention([False, False], [True, True]) == 1.0
    with pytest.raises(ValueError, match="2 base answers but 1"):
        retention([True, False], [True])


def test_retention_by_group_splits_number_answers_from_the_rest():
    questions = [Question("How many days are in a week?", ("7", "seven"), "fact"),
                 Question("What is the capital of Peru?", ("Lima",), "fact"),
                 Question("What is 2 + 3?", ("5",), "fact"),
                 Question("Chemical symbol of water?", ("H2O",), "fact")]
    assert [has_number_answer(q) for q in questions] == [True, False, True, False]
    assert all(has_number_answer(Question("q", (answer,), "fact")) for answer in ("1, 2, 3", "-3", "3.14"))
    assert not any(has_number_answer(Question("q", (answer,), "fact")) for answer in ("CO2", "-", ", ."))
    groups = retention_by_group(questions, [True, True, True, False], [False, True, True, True])
    assert groups == {"number answers": (1, 2), "other": (1, 1)}  # the base's wrong answer counts nowhere
    with pytest.raises(ValueError, match="4 questions, 3 base answers"):
        retention_by_group(questions, [True] * 3, [True] * 4)


def test_shipped_questions_and_heldout_text():
    questions = load_questions()
    assert len(questions) >= 60 and len({q.prompt for q in questions}) == len(questions)
    assert {q.kind for q in questions} == {"fact", "instruction"}
    texts = heldout_texts(16, seed=1)
    assert len(texts) == 16 and all(400 <= len(text) <= 1200 for text in texts)
    assert texts == heldout_texts(16, seed=1) and texts != heldout_texts(16, seed=2)
    with pytest.raises(ValueError, match="held-out passages"):
        heldout_texts(10**6)


def test_bad_question_file_names_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"prompt": "a?", "answers": ["b"], "kind": "fact"}\n{"prompt": "c?", "answers": []}\n')
    with pytest.raises(ValueError, match="line 2"):
        load_questions(path)


def test_kl_against_the_disabled_adapter_is_zero_until_the_adapter_moves():
    base, tokenizer = load_model("tiny-llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    texts = heldout_texts(3)
    untouched = kl_on_text(model, tokenizer, texts, max_length=64, batch_size=2)
    assert untouched["kl_per_token"] == pytest.approx(0.0, abs=1e-12)
    assert untouched["base_perplexity"] == pytest.approx(untouched["adapted_perplexity"], rel=1e-12)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            lora_b_weight(layer).normal_(std=0.5)
    moved = kl_on_text(model, tokenizer, texts, max_length=64, batch_size=2)
    assert moved["kl_per_token"] > 1e-4
    assert moved["base_perplexity"] == pytest.approx(untouched["base_perplexity"], rel=1e-9)
    # the base perplexity is exp(mean NLL) of the model with the adapter disabled, counted over the same tokens
    encoded = tokenizer(texts[:1], return_tensors="pt", truncation=True, max_length=64)
    with torch.no_grad(), model.disable_adapter():
        loss = model(**encoded, labels=encoded["input_ids"]).loss
    single = kl_on_text(model, tokenizer, texts[:1], max_length=64)
    assert single["base_perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    separate = kl_on_text(model, tokenizer, texts, base_model=load_model("tiny-llama")[0], max_length=64)
    assert separate["kl_per_token"] == pytest.approx(moved["kl_per_token"], rel=1e-9)


def test_answer_kl_counts_only_the_answer_tokens_in_chat_format():
    base, tokenizer = load_model("tiny-llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    prompts, answers = ["What is the capital of Peru?", "Name a colour.", "Two plus two?"], ["Lima", "red", "four"]
    assert answer_kl(model, tokenizer, prompts, answers)["kl_per_token"] == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            lora_b_weight(layer).normal_(std=0.5)
    batched = answer_kl(model, tokenizer, prompts, answers, batch_size=3)
    assert batched["kl_per_token"] > 1e-4 and batched["answers"] == 3
    single = [answer_kl(model, tokenizer, [p], [a], batch_size=1) for p, a in zip(prompts, answers)]
    assert batched["tokens"] == sum(r["tokens"] for r in single)  # right padding changes no counted position
    assert batched["kl_per_token"] == pytest.approx(
        sum(r["kl_per_token"] * r["tokens"] for r in single) / batched["tokens"], rel=1e-6)
    # by hand for the first: the chat prompt, then the answer; the predictions of the answer's tokens only
    prompt_ids = tokenizer(measures._chat_prompt(tokenizer, prompts[0]), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answers[0], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits[:, :-1]
        with model.disable_adapter():
            reference = model(input_ids=ids).logits[:, :-1]
    mask = torch.zeros(1, ids.shape[1] - 1, dtype=torch.long)
    mask[0, len(prompt_ids) - 1:] = 1
    total, count = token_kl(reference, adapted, mask)
    assert single[0]["tokens"] == count == len(answer_ids)
    assert single[0]["kl_per_token"] == pytest.approx(total / count, rel=1e-6)
    first = torch.zeros_like(mask)
    first[0, len(prompt_ids) - 1] = 1
    assert single[0]["first_token_kl"] == pytest.approx(token_kl(reference, adapted, first)[0], rel=1e-6)
    with pytest.raises(ValueError, match="3 prompts but 2 answers"):
        answer_kl(model, tokenizer, prompts, answers[:2])


def test_base_logits_cache_runs_the_base_once_and_changes_no_result(monkeypatch):
    base, tokenizer = load_model("tiny-llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    texts = heldout_texts(3)
    base_passes = []
    real_base_of = measures._base_of
    monkeypatch.setattr(measures, "_base_of", lambda m: base_passes.append(1) or real_base_of(m))
    cache = BaseLogitsCache()
    results = []
    for std in (0.5, 1.0):  # two different adapters against the same base
        with torch.no_grad():
            for layer in lora_layers(model).values():
                lora_b_weight(layer).normal_(std=std, generator=torch.Generator().manual_seed(int(std * 10)))
        fresh = kl_on_text(model, tokenizer, texts, max_length=64, batch_size=2)
        cached = kl_on_text(model, tokenizer, texts, max_length=64, batch_size=2, base_cache=cache)
        assert cached == fresh  # bit-identical
        results.append(cached)
    assert results[0]["kl_per_token"] != results[1]["kl_per_token"]
    assert len(cache.batches) == 2 and len(base_passes) == 2 + 2 + 2  # fresh ×2 (2 batches each), cached once
    with pytest.raises(ValueError, match="other texts, max_length"):
        kl_on_text(model, tokenizer, texts, max_length=32, batch_size=2, base_cache=cache)


def test_greedy_answer_uses_the_chat_template_and_is_deterministic():
    model, tokenizer = load_model("tiny-llama")
    first = greedy_answer(model, tokenizer, "What is 2 + 3?", max_new_tokens=5)
    assert first == greedy_answer(model, tokenizer, "What is 2 + 3?", max_new_tokens=5)
    assert isinstance(first, str)


def test_greedy_answers_batches_in_order_and_restore_the_tokenizer():
    model, tokenizer = load_model("tiny-llama")
    prompts = ["What is 2 + 3?", "Name a colour.", "Say hello in a long friendly sentence please."]
    side = tokenizer.padding_side
    batched = greedy_answers(model, tokenizer, prompts, max_new_tokens=4, batch_size=2)
    assert len(batched) == 3 and tokenizer.padding_side == side
    assert batched == greedy_answers(model, tokenizer, prompts, max_new_tokens=4, batch_size=2)
    # a batch of one is the single answer; the longest prompt is never padded, so its answer cannot depend on batching
    assert greedy_answer(model, tokenizer, prompts[2], max_new_tokens=4) == batched[2]
    with pytest.raises(ValueError, match="batch_size"):
        greedy_answers(model, tokenizer, prompts, batch_size=0)


def test_the_new_retention_probe_cannot_collide_with_either_task():
    """Issue 25's probe: >= 150 questions (one is under a point), none answered with a number (in digits or words),
    a date, a month or a weekday (the number-words task's format), none a list of words (the word-order task's),
    none repeating the legacy probe; made from retention_probe_candidates.jsonl by keeping the questions the base
    model answers right (greedy, batches of 16), re-checked on the kept file (162 of 162)."""
    import re

    from folora_ds.toolkit.measures import QUESTIONS_FILE, load_questions, normalize_answer
    from folora_ds.training.tasks import _ONES, _TENS

    probe = load_questions(QUESTIONS_FILE.parent / "retention_probe.jsonl")
    legacy = {normalize_answer(question.prompt) for question in load_questions(QUESTIONS_FILE)}
    numberish = set(_ONES) | set(_TENS[2:]) | {"hundred", "thousand", "million", "first", "second", "third",
                                              "january", "february", "march", "april", "may", "june", "july",
                                              "august", "september", "october", "november", "december", "monday",
                                              "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"}
    assert len(probe) >= 150 and len({question.prompt for question in probe}) == len(probe)
    for question in probe:
        assert normalize_answer(question.prompt) not in legacy, question.prompt
        for answer in question.answers:
            words = normalize_answer(answer).replace("-", " ").split()
            assert not re.search(r"\d", answer) and not numberish & set(words), (question.prompt, answer)
            assert len(words) <= 2 and "," not in answer, (question.prompt, answer)

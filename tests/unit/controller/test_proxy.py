"""folora_ds.controller.proxy: seeded self-sampling of the pretraining-proxy set, its JSONL file format and
its batches."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from folora_ds.controller.proxy import (
    ProxySample,
    load_proxy_jsonl,
    proxy_batches,
    read_chat_prompts,
    sample_proxy,
    save_proxy_jsonl,
)
from folora_ds.method.config import ProxyConfig
from folora_ds.training.data import DEFAULT_TASK_FILE
from folora_ds.training.models import build_byte_tokenizer, load_model

SEED_STRIDE = 1_000_003  # documented derivation: batch seed = seed * stride + first global index of the batch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny-llama", seed=0)
    return model, tokenizer


def _settings(**overrides) -> ProxyConfig:
    values = dict(num_sequences=4, seq_len=6, batch_size=2, seed=3, prompt="mixed", greedy_prefix_tokens=2)
    return ProxyConfig(**{**values, **overrides})


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_reproduces_identical_token_ids_and_text(tiny):
    model, tokenizer = tiny
    for prompt in ("mixed", "random_token"):
        first = sample_proxy(model, tokenizer, _settings(prompt=prompt))
        second = sample_proxy(model, tokenizer, _settings(prompt=prompt))
        assert first == second
        assert [tokenizer.decode(s.token_ids) for s in first] == [tokenizer.decode(s.token_ids) for s in second]


def test_different_seed_gives_different_samples(tiny):
    model, tokenizer = tiny
    first = sample_proxy(model, tokenizer, _settings(seed=3))
    other = sample_proxy(model, tokenizer, _settings(seed=4))
    assert [s.token_ids for s in first] != [s.token_ids for s in other]
    assert all(a.token_ids != b.token_ids for a, b in zip(first, other))


def test_sampling_leaves_caller_rng_and_training_mode_untouched(tiny):
    model, tokenizer = tiny
    torch.manual_seed(123)
    expected = torch.rand(5)
    model.train()
    try:
        torch.manual_seed(123)
        sample_proxy(model, tokenizer, _settings())
        assert torch.equal(torch.rand(5), expected)
        assert model.training
    finally:
        model.eval()
    sample_proxy(model, tokenizer, _settings())
    assert not model.training


def test_samples_record_kind_seed_index_and_respect_length_budget(tiny):
    model, tokenizer = tiny
    settings = _settings(num_sequences=5, seq_len=4, batch_size=2, seed=7)
    samples = sample_proxy(model, tokenizer, settings)
    assert [s.index for s in samples] == [0, 1, 2, 3, 4]
    assert [s.prompt_kind for s in samples] == ["bos", "chat_empty_user", "bos", "chat_empty_user", "bos"]
    assert [s.seed for s in samples] == [7 * SEED_STRIDE + first for first in (0, 0, 2, 2, 4)]
    chat_prompt = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=True,
                                                add_generation_prompt=True, return_dict=False)
    for sample in samples:
        prompt = sample.token_ids[:sample.prompt_length]
        assert prompt == ([tokenizer.bos_token_id] if sample.prompt_kind == "bos" else list(chat_prompt))
        assert sample.prompt_length < len(sample.token_ids) <= sample.prompt_length + settings.seq_len
        assert tokenizer.pad_token_id not in sample.token_ids[sample.prompt_length:]


def _prompts_file(tmp_path, prompts) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts), encoding="utf-8")
    return str(path)


def test_chat_prompts_start_every_sequence_with_a_user_turn_of_its_prompt_in_file_order(tiny, tmp_path):
    model, tokenizer = tiny
    prompts = ["Explain rain.", "Write a poem about a cat.", "How do I boil an egg?"]
    settings = _settings(num_sequences=5, seq_len=4, prompt="chat_prompts",
                         prompts_path=_prompts_file(tmp_path, prompts))
    samples = sample_proxy(model, tokenizer, settings)
    assert [s.prompt_kind for s in samples] == ["chat_prompt"] * 5
    for sample in samples:  # sequence i answers prompt i mod 3: the user turn, then the model's own reply
        expected = tokenizer.apply_chat_template([{"role": "user", "content": prompts[sample.index % 3]}],
                                                 tokenize=True, add_generation_prompt=True, return_dict=False)
        assert sample.token_ids[:sample.prompt_length] == list(expected)
        assert sample.prompt_length < len(sample.token_ids) <= sample.prompt_length + settings.seq_len
    shares = [sample_proxy(model, tokenizer, settings, rank=rank, world_size=2) for rank in (0, 1)]
    assert sorted((s.index, s.token_ids[:s.prompt_length]) for share in shares for s in share) == \
        [(s.index, s.token_ids[:s.prompt_length]) for s in samples]  # each sequence keeps its prompt on any rank


def test_shipped_chat_prompts_are_open_requests_disjoint_from_both_retention_probes():
    """The proxy of the model's own chat answers must not be the probe: no probe question, none of its
    short-answer instructions ("Answer with one word: ..."), no factoid "What is the capital/plural/opposite"."""
    data = DEFAULT_TASK_FILE.parent
    prompts = read_chat_prompts(data / "chat_prompts.jsonl")
    assert len(prompts) == len(set(prompts)) == 64
    probe = set()
    for name in ("retention_probe.jsonl", "retention_questions.jsonl"):
        probe |= {json.loads(line)["prompt"].lower() for line in (data / name).read_text().splitlines() if line}
    for prompt in prompts:
        lowered = prompt.lower()
        assert lowered not in probe, prompt
        assert not lowered.startswith(("answer with", "reply with", "respond with", "give only")), prompt
        assert not any(f"what is the {word}" in lowered for word in ("capital", "plural", "opposite", "past")), prompt


@pytest.mark.parametrize(("content", "match"), [
    (None, r"proxy.prompts_path .*missing\.jsonl' does not exist"),
    ("", r"is empty"),
    ('{"prompt": "ok"}\n{"prompt": ""}\n', r"line 2: expected a non-empty string 'prompt'"),
    ('{"text": "no prompt key"}\n', r"line 1: expected a non-empty string 'prompt', got None"),
])
def test_bad_prompts_files_are_refused_before_the_model_generates(tmp_path, content, match):
    path = tmp_path / "missing.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    model = _CounterLM()
    error = FileNotFoundError if content is None else ValueError
    with pytest.raises(error, match=match):
        read_chat_prompts(path)
    with pytest.raises(error, match=match):
        sample_proxy(model, build_byte_tokenizer(), _settings(prompt="chat_prompts", prompts_path=str(path)))
    assert model.calls == []


def test_random_token_prompt_is_bos_plus_one_ordinary_token_and_greedy_tokens_count_toward_seq_len(tiny):
    model, tokenizer = tiny
    settings = _settings(prompt="random_token", num_sequences=4, seq_len=5, greedy_prefix_tokens=3)
    samples = sample_proxy(model, tokenizer, settings)
    first_tokens = set()
    for sample in samples:
        assert sample.prompt_kind == "random_token" and sample.prompt_length == 2
        assert sample.token_ids[0] == tokenizer.bos_token_id
        assert sample.token_ids[1] not in tokenizer.all_special_ids
        assert len(sample.token_ids) <= 2 + settings.seq_len
        first_tokens.add(sample.token_ids[1])
    assert len(first_tokens) > 1  # the random token really varies per sequence


def test_mixed_prompt_falls_back_to_random_token_without_chat_template(tiny):
    model, _ = tiny
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = None
    samples = sample_proxy(model, tokenizer, _settings())
    assert [s.prompt_kind for s in samples] == ["bos", "random_token", "bos", "random_token"]


def test_ranks_sample_disjoint_interleaved_shares_reproducibly(tiny):
    model, tokenizer = tiny
    settings = _settings(num_sequences=5, batch_size=2)
    shares = [sample_proxy(model, tokenizer, settings, rank=r, world_size=2) for r in (0, 1)]
    assert [s.index for s in shares[0]] == [0, 2, 4]
    assert [s.index for s in shares[1]] == [1, 3]
    assert [s.seed for s in shares[1]] == [3 * SEED_STRIDE + 1] * 2  # one batch, seeded by its first index
    assert sample_proxy(model, tokenizer, settings, rank=1, world_size=2) == shares[1]


# ---------------------------------------------------------------------------------------------- scripted generation
class _CounterLM(nn.Module):
    """A stand-in causal LM whose ``generate`` continues every row with (last + 1) % 250, (last + 2) % 250, ...

    A row emits EOS instead of token ``stop_at`` and only pads after it; it emits the pad id instead of token
    ``pad_at`` (a sampled pad). Every call's arguments are recorded.
    """

    def __init__(self, *, stop_at: int | None = None, pad_at: int | None = None) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.stop_at, self.pad_at = stop_at, pad_at
        self.calls: list[dict] = []

    def generate(self, *, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **kwargs):
        self.calls.append(dict(kwargs, input_ids=input_ids.clone(), attention_mask=attention_mask.clone(),
                               max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, eos_token_id=eos_token_id))
        rows = []
        for row in input_ids.tolist():
            new, token, stopped = [], row[-1], False
            for _ in range(max_new_tokens):
                token = (token + 1) % 250
                if stopped:
                    new.append(pad_token_id)
                elif token == self.stop_at:
                    new.append(eos_token_id)
                    stopped = True
                elif token == self.pad_at:
                    new.append(pad_token_id)
                else:
                    new.append(token)
            rows.append(row + new)
        return torch.tensor(rows)


def test_generation_stops_at_eos_and_sampling_settings_reach_generate():
    tokenizer = build_byte_tokenizer()
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    model = _CounterLM(stop_at=(bos + 3) % 250)
    settings = _settings(prompt="mixed", num_sequences=2, seq_len=5, temperature=0.7, top_p=0.9)
    samples = sample_proxy(model, tokenizer, settings)
    # bos row: two tokens, then EOS is kept and the pads after it are dropped (a short sequence)
    assert samples[0].token_ids == [bos, (bos + 1) % 250, (bos + 2) % 250, eos]
    chat = samples[1].token_ids[:samples[1].prompt_length]
    assert samples[1].token_ids[len(chat):] == [(chat[-1] + k) % 250 for k in range(1, 6)]
    (call,) = model.calls
    assert call["do_sample"] is True and call["temperature"] == 0.7 and call["top_p"] == 0.9
    assert call["top_k"] == 0 and call["max_new_tokens"] == 5
    assert call["pad_token_id"] == pad and call["eos_token_id"] == eos
    # prompts of different lengths are left-padded (pad ids, mask 0) so generation continues each of them
    assert call["input_ids"][0].tolist() == [pad] * (len(chat) - 1) + [bos]
    assert call["attention_mask"].tolist() == [[0] * (len(chat) - 1) + [1], [1] * len(chat)]


def test_greedy_prefix_is_generated_without_sampling_and_taken_from_the_sequence_budget():
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = None  # "mixed" then alternates bos / random_token
    model = _CounterLM()
    settings = _settings(prompt="mixed", num_sequences=2, seq_len=5, greedy_prefix_tokens=3)
    bos_sample, random_sample = sample_proxy(model, tokenizer, settings)
    greedy_call, sample_call = model.calls
    assert greedy_call["do_sample"] is False and greedy_call["max_new_tokens"] == 3
    token = random_sample.token_ids[1]
    assert greedy_call["input_ids"].tolist() == [[tokenizer.bos_token_id, token]]
    assert sample_call["do_sample"] is True and sample_call["max_new_tokens"] == 5  # the bos row's budget
    bos = tokenizer.bos_token_id
    assert bos_sample.token_ids == [bos] + [(bos + k) % 250 for k in range(1, 6)]
    # 3 greedy tokens + 2 sampled tokens = seq_len new tokens after the 2-token prompt
    assert random_sample.prompt_length == 2
    assert random_sample.token_ids == [bos, token] + [(token + k) % 250 for k in range(1, 6)]


def test_sampled_pad_tokens_are_dropped_from_the_sequence():
    tokenizer = build_byte_tokenizer()
    bos = tokenizer.bos_token_id
    model = _CounterLM(pad_at=(bos + 2) % 250)
    (sample,) = sample_proxy(model, tokenizer, _settings(prompt="bos", num_sequences=1, seq_len=4))
    assert sample.token_ids == [bos, (bos + 1) % 250, (bos + 3) % 250, (bos + 4) % 250]


def test_sampled_budget_is_seq_len_minus_greedy_prefix():
    tokenizer = build_byte_tokenizer()
    model = _CounterLM()
    samples = sample_proxy(model, tokenizer, _settings(prompt="random_token", num_sequences=2, seq_len=5,
                                                       greedy_prefix_tokens=3))
    assert [c["max_new_tokens"] for c in model.calls] == [3, 3, 2]  # one greedy call per row, then one sampled
    assert all(len(s.token_ids) == 2 + 5 for s in samples)


def test_greedy_prefix_longer_than_seq_len_is_cut_to_seq_len():
    tokenizer = build_byte_tokenizer()
    model = _CounterLM()
    (sample,) = sample_proxy(model, tokenizer, _settings(prompt="random_token", num_sequences=1, seq_len=2,
                                                         greedy_prefix_tokens=4))
    token = sample.token_ids[1]
    assert sample.token_ids == [tokenizer.bos_token_id, token, (token + 1) % 250, (token + 2) % 250]
    assert model.calls[-1]["max_new_tokens"] == 1  # generate is still asked for at least one token


def test_random_first_token_is_never_a_special_token():
    tokenizer = build_byte_tokenizer()
    settings = _settings(prompt="random_token", num_sequences=600, seq_len=1, batch_size=200, greedy_prefix_tokens=0)
    first = [s.token_ids[1] for s in sample_proxy(_CounterLM(), tokenizer, settings)]
    assert len(set(first)) > 150  # spread over the vocabulary: ~3 % of 600 uniform draws would hit a special id
    assert not set(first) & set(tokenizer.all_special_ids)
    added_special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    assert added_special - set(tokenizer.all_special_ids), "the byte tokenizer has added special tokens (roles)"
    assert not set(first) & added_special, "a chat role marker was drawn as a random first token"


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("rank", "world_size", "match"), [
    (0, 0, r"world_size=0 is invalid; allowed: an integer >= 1"),
    (2, 2, r"rank=2 must be in \[0, world_size=2\)"),
    (-1, 2, r"rank=-1 must be in"),
])
def test_invalid_rank_or_world_size_is_rejected(rank, world_size, match):
    with pytest.raises(ValueError, match=match):
        sample_proxy(_CounterLM(), build_byte_tokenizer(), _settings(), rank=rank, world_size=world_size)


def test_tokenizer_without_pad_or_eos_is_rejected():
    tokenizer = build_byte_tokenizer()
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="needs a tokenizer with a pad or EOS token"):
        sample_proxy(_CounterLM(), tokenizer, _settings())


def test_prompt_kinds_missing_their_special_tokens_are_rejected():
    no_bos = build_byte_tokenizer()
    no_bos.bos_token = None
    with pytest.raises(ValueError, match="'bos' needs a tokenizer with a BOS token"):
        sample_proxy(_CounterLM(), no_bos, _settings(prompt="bos"))
    no_template = build_byte_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="'chat_empty_user' needs a tokenizer with a chat template"):
        sample_proxy(_CounterLM(), no_template, _settings(prompt="chat_empty_user"))
    with pytest.raises(ValueError, match="'chat_prompts' needs a tokenizer with a chat template"):
        prompts_path = str(DEFAULT_TASK_FILE.parent / "chat_prompts.jsonl")
        sample_proxy(_CounterLM(), no_template, _settings(prompt="chat_prompts", prompts_path=prompts_path))


def test_training_mode_is_restored_after_a_failure():
    model = _CounterLM().train()
    no_bos = build_byte_tokenizer()
    no_bos.bos_token = None
    with pytest.raises(ValueError):
        sample_proxy(model, no_bos, _settings(prompt="bos"))
    assert model.training


# ---------------------------------------------------------------------------------------------- JSONL
def test_save_then_load_round_trips_and_records_every_setting(tiny, tmp_path):
    model, tokenizer = tiny
    settings = _settings(temperature=0.8, top_p=0.95)
    samples = sample_proxy(model, tokenizer, settings)
    path = tmp_path / "nested" / "dir" / "proxy.jsonl"
    save_proxy_jsonl(samples, path, settings)
    assert load_proxy_jsonl(path) == samples
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(samples)
    for line, sample in zip(lines, samples):
        record = json.loads(line)
        assert record["settings"] == dataclasses.asdict(settings)
        assert ProxyConfig(**record["settings"]) == settings
        assert record["seed"] == sample.seed and record["token_ids"] == sample.token_ids


def test_load_truncates_to_max_length(tmp_path):
    samples = [ProxySample([5, 6, 7, 8, 9], 1, "bos", 11, 0), ProxySample([5, 6], 1, "bos", 11, 1)]
    path = tmp_path / "proxy.jsonl"
    save_proxy_jsonl(samples, path, _settings())
    loaded = load_proxy_jsonl(path, max_length=3)
    assert [s.token_ids for s in loaded] == [[5, 6, 7], [5, 6]]
    assert [(s.prompt_length, s.prompt_kind, s.seed, s.index) for s in loaded] == [(1, "bos", 11, 0), (1, "bos", 11, 1)]


def test_truncation_shorter_than_the_prompt_clamps_the_prompt_length(tmp_path):
    path = tmp_path / "proxy.jsonl"
    save_proxy_jsonl([ProxySample([5, 6, 7, 8, 9], 4, "chat_empty_user", 3, 0)], path, _settings())
    loaded = load_proxy_jsonl(path, max_length=3)
    assert loaded[0].token_ids == [5, 6, 7] and loaded[0].prompt_length == 3


@pytest.mark.parametrize("max_length", [0, -2, 2.5])
def test_invalid_max_length_is_refused(tmp_path, max_length):
    path = tmp_path / "proxy.jsonl"
    save_proxy_jsonl([ProxySample([5, 6], 1, "bos", 0, 0)], path, _settings())
    with pytest.raises(ValueError, match="max_length"):
        load_proxy_jsonl(path, max_length=max_length)


def test_user_text_corpus_is_tokenized_with_bos_and_blank_lines_skipped(tmp_path):
    tokenizer = build_byte_tokenizer()
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "hello"}\n\n{"text": "é!"}\n', encoding="utf-8")
    loaded = load_proxy_jsonl(path, tokenizer=tokenizer)
    assert [s.index for s in loaded] == [0, 1]
    assert all(s.prompt_kind == "user_text" and s.seed == -1 and s.prompt_length == 0 for s in loaded)
    assert loaded[0].token_ids[0] == tokenizer.bos_token_id
    assert [tokenizer.decode(s.token_ids[1:]) for s in loaded] == ["hello", "é!"]
    assert len(loaded[1].token_ids) == 1 + len("é!".encode())
    assert load_proxy_jsonl(path, tokenizer=tokenizer, max_length=3)[0].token_ids == loaded[0].token_ids[:3]


def test_loading_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"proxy calibration set .*missing\.jsonl' does not exist"):
        load_proxy_jsonl(tmp_path / "missing.jsonl")


GOOD_LINE = '{"token_ids": [1, 2], "prompt_length": 1, "prompt_kind": "bos", "seed": 0, "index": 0}'


@pytest.mark.parametrize(("content", "match"), [
    (GOOD_LINE + "\n{not json\n", r"line 2: "),
    ('{"token_ids": [], "prompt_length": 1, "prompt_kind": "bos", "seed": 0, "index": 0}\n',
     r"line 1: token_ids must be a non-empty list of integers"),
    ('{"token_ids": [1, "a"], "prompt_length": 1, "prompt_kind": "bos", "seed": 0, "index": 0}\n',
     r"line 1: token_ids must be a non-empty list of integers"),
    (GOOD_LINE + "\n\n" + '{"token_ids": [1, 2], "prompt_kind": "bos", "seed": 0, "index": 0}\n',
     r"line 3: .*prompt_length"),
    ('{"tokens": [1, 2]}\n', r"line 1: expected 'token_ids' \(a saved proxy set\) or 'text'"),
    ('{"text": "hi"}\n', r"line 1: text lines need a tokenizer"),
    ("", r"is empty"),
    ("\n  \n", r"is empty"),
])
def test_malformed_proxy_files_raise_value_error_with_line_number(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_proxy_jsonl(path)


# ---------------------------------------------------------------------------------------------- batches
def test_proxy_batches_right_pad_in_sample_order():
    samples = [ProxySample(ids, 1, "bos", 0, i) for i, ids in enumerate([[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]])]
    batches = list(proxy_batches(samples, batch_size=3, pad_token_id=0))
    assert len(batches) == 2
    assert batches[0]["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert batches[0]["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batches[1]["input_ids"].tolist() == [[7, 8, 9, 10]]
    assert batches[1]["attention_mask"].tolist() == [[1, 1, 1, 1]]
    assert all(t.dtype == torch.long for b in batches for t in b.values())


def test_proxy_batches_reject_empty_set_and_bad_batch_size():
    with pytest.raises(ValueError, match="calibration set is empty"):
        next(proxy_batches([], batch_size=2, pad_token_id=0))
    with pytest.raises(ValueError, match="batch_size=0 is invalid; allowed: an integer >= 1"):
        next(proxy_batches([ProxySample([1], 1, "bos", 0, 0)], batch_size=0, pad_token_id=0))

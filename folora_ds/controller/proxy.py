"""The pretraining-proxy calibration set: text the model samples itself (docs/method.md), saved as JSONL.

C_pre is estimated on what the model generates on its own, not on one fixed corpus: sequences start from BOS,
from an empty user turn of the chat template, from one random token followed by a few greedy tokens, or from a
user turn of the chat template holding one of the user's prompts (the model's own answers to them), and
continue by sampling at the configured temperature / top-p (1.0 / 1.0: the model's own distribution).

Sharding: global sequence i belongs to rank i mod world_size. A rank generates its sequences in batches of
``batch_size``; each batch runs under its own seed derived from the base seed and the batch's first global
index, inside ``torch.random.fork_rng`` so the caller's RNG stream is untouched. The same (seed, world size,
batch size) reproduces the same set.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from folora_ds.common.checks import require_int
from folora_ds.common.files import read_jsonl_objects, replace_atomically
from folora_ds.distributed import comm
from folora_ds.method.config import FoLoRAConfig, ProxyConfig

_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class ProxySample:
    """One proxy sequence.

    Attributes:
        token_ids: prompt tokens + generated tokens (what the statistics pass feeds the model).
        prompt_length: tokens of the prompt at the start of ``token_ids``.
        prompt_kind: "bos", "random_token", "chat_empty_user", "chat_prompt" or "user_text".
        seed: seed of the batch that produced it (-1 for user text).
        index: global sequence index.
    """

    token_ids: list[int]
    prompt_length: int
    prompt_kind: str
    seed: int
    index: int


def _prompt_kind(requested: str, index: int, tokenizer) -> str:
    if requested == "chat_prompts":
        return "chat_prompt"
    if requested != "mixed":
        return requested
    if index % 2 == 0:
        return "bos"
    return "chat_empty_user" if tokenizer.chat_template else "random_token"


def read_chat_prompts(path: str | Path) -> list[str]:
    """The user turns of a ``{"prompt": ...}`` JSONL file (``proxy.prompts_path``), in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line without a non-empty string "prompt" (with its 1-based number), or no lines.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"proxy.prompts_path {str(path)!r} does not exist")
    prompts = []
    for line_number, record in read_jsonl_objects(path, what="proxy prompts file"):
        prompt = record.get("prompt")
        if not (isinstance(prompt, str) and prompt.strip()):
            raise ValueError(f"proxy prompts file {str(path)!r} line {line_number}: expected a non-empty string "
                             f"'prompt', got {prompt!r}")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"proxy prompts file {str(path)!r} is empty")
    return prompts


def _prompt_ids(kind: str, tokenizer, generator: torch.Generator, user_text: str = "") -> list[int]:
    if kind == "bos":
        if tokenizer.bos_token_id is None:
            raise ValueError("proxy prompt 'bos' needs a tokenizer with a BOS token; use 'random_token' or "
                             "'chat_empty_user'")
        return [tokenizer.bos_token_id]
    if kind in ("chat_empty_user", "chat_prompt"):
        if not tokenizer.chat_template:
            requested = "chat_prompts" if kind == "chat_prompt" else kind
            raise ValueError(f"proxy prompt {requested!r} needs a tokenizer with a chat template; use 'bos' or "
                             "'random_token'")
        return list(tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=False))
    if kind == "random_token":
        special = set(tokenizer.all_special_ids) | {  # also added special tokens (chat role markers and the like)
            index for index, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
        choices = [i for i in range(len(tokenizer)) if i not in special]
        token = choices[int(torch.randint(len(choices), (1,), generator=generator))]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + [token]
    raise ValueError(f"unknown proxy prompt kind {kind!r}")


def _left_pad(rows: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(row) for row in rows)
    ids = torch.tensor([[pad_token_id] * (length - len(row)) + row for row in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)
    return ids, mask


def _generate(model, ids: torch.Tensor, mask: torch.Tensor, *, new_tokens: int, sample: bool, settings,
              pad_token_id: int, eos_token_id: int | None) -> torch.Tensor:
    device = next(model.parameters()).device
    kwargs = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0) if sample \
        else dict(do_sample=False)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                         min_new_tokens=0, pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)
    return out.cpu()


def _strip(row: list[int], start: int, pad_token_id: int, eos_token_id: int | None) -> list[int]:
    """Generated part of a row: up to and including the first EOS, pads removed."""
    kept = []
    for token in row[start:]:
        if token == eos_token_id:
            kept.append(token)
            break
        if token != pad_token_id:
            kept.append(token)
    return kept


def sample_proxy(model, tokenizer, settings: ProxyConfig, *, rank: int = 0, world_size: int = 1,
                 progress: bool = False) -> list[ProxySample]:
    """Sample this rank's share of the proxy calibration set from ``model``.

    Returns:
        The samples of global indices i ≡ rank (mod world_size), in index order. A sequence that ends at EOS is
        kept as it is (possibly short); each has at most ``prompt_length + seq_len`` tokens.
    """
    require_int("world_size", world_size)
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank={rank!r} must be in [0, world_size={world_size})")
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("proxy sampling needs a tokenizer with a pad or EOS token")
    eos_token_id = tokenizer.eos_token_id
    user_texts = read_chat_prompts(settings.prompts_path) if settings.prompt == "chat_prompts" else [""]
    indices = list(range(rank, settings.num_sequences, world_size))
    batches = [indices[i:i + settings.batch_size] for i in range(0, len(indices), settings.batch_size)]
    was_training = model.training
    model.eval()
    samples: list[ProxySample] = []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for batch in tqdm(batches, desc="proxy sampling", disable=not progress, leave=False):
                seed = settings.seed * _SEED_STRIDE + batch[0]
                torch.manual_seed(seed)
                generator = torch.Generator().manual_seed(seed)
                kinds = [_prompt_kind(settings.prompt, index, tokenizer) for index in batch]
                prompts = [_prompt_ids(kind, tokenizer, generator, user_texts[index % len(user_texts)])
                           for kind, index in zip(kinds, batch)]
                prompt_lengths = [len(p) for p in prompts]
                greedy = settings.greedy_prefix_tokens
                if greedy > 0 and "random_token" in kinds:
                    extended = []
                    for kind, prompt in zip(kinds, prompts):
                        if kind != "random_token":
                            extended.append(prompt)
                            continue
                        ids, mask = _left_pad([prompt], pad_token_id)
                        out = _generate(model, ids, mask, new_tokens=greedy, sample=False, settings=settings,
                                        pad_token_id=pad_token_id, eos_token_id=eos_token_id)[0].tolist()
                        extended.append(prompt + _strip(out, ids.shape[1], pad_token_id, eos_token_id))
                    prompts = extended
                ids, mask = _left_pad(prompts, pad_token_id)
                budgets = [settings.seq_len - (len(p) - n) for p, n in zip(prompts, prompt_lengths)]
                out = _generate(model, ids, mask, new_tokens=max(1, max(budgets)), sample=True, settings=settings,
                                pad_token_id=pad_token_id, eos_token_id=eos_token_id)
                for row, prompt, prompt_length, budget, kind, index in zip(
                        out.tolist(), prompts, prompt_lengths, budgets, kinds, batch):
                    generated = prompt[prompt_length:] + _strip(row, ids.shape[1], pad_token_id,
                                                                eos_token_id)[:max(budget, 0)]
                    samples.append(ProxySample(prompt[:prompt_length] + generated[:settings.seq_len], prompt_length,
                                               kind, seed, index))
    finally:
        model.train(was_training)
    return samples


def save_proxy_jsonl(samples: Sequence[ProxySample], path: str | Path, settings: ProxyConfig) -> None:
    """Write samples as JSONL, each line with its seed and every sampling setting (for reproduction); the file
    appears only when complete."""
    recorded = dataclasses.asdict(settings)
    with replace_atomically(Path(path)) as scratch, scratch.open("w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps({**dataclasses.asdict(sample), "settings": recorded}) + "\n")


def load_proxy_jsonl(path: str | Path, *, tokenizer=None, max_length: int | None = None) -> list[ProxySample]:
    """Read a saved proxy set, or a user corpus of ``{"text": ...}`` lines (tokenized, BOS prepended).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a malformed line (with its 1-based number), text lines without a tokenizer, or no samples.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"proxy calibration set {str(path)!r} does not exist")
    require_int("max_length", max_length, optional=True, where="load_proxy_jsonl: ")
    samples = []
    for line_number, record in read_jsonl_objects(path, what="proxy calibration set"):
        try:
            if "token_ids" in record:
                ids = record["token_ids"]
                if not (isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids)):
                    raise ValueError("token_ids must be a non-empty list of integers")
                kept = ids[:max_length]
                sample = ProxySample(kept, min(int(record["prompt_length"]), len(kept)),
                                     str(record["prompt_kind"]), int(record["seed"]), int(record["index"]))
            elif isinstance(record.get("text"), str):
                if tokenizer is None:
                    raise ValueError("text lines need a tokenizer")
                bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
                ids = bos + tokenizer(record["text"], add_special_tokens=False)["input_ids"]
                sample = ProxySample(ids[:max_length], 0, "user_text", -1, len(samples))
            else:
                raise ValueError("expected 'token_ids' (a saved proxy set) or 'text' (a user corpus)")
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"proxy calibration set {str(path)!r} line {line_number}: {error}") from error
        samples.append(sample)
    if not samples:
        raise ValueError(f"proxy calibration set {str(path)!r} is empty")
    return samples


def proxy_batches(samples: Sequence[ProxySample], *, batch_size: int,
                  pad_token_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches ``{"input_ids": (b, t), "attention_mask": (b, t)}`` (int64) in sample order."""
    if not samples:
        raise ValueError("the proxy calibration set is empty")
    require_int("batch_size", batch_size)
    for start in range(0, len(samples), batch_size):
        rows = [sample.token_ids for sample in samples[start:start + batch_size]]
        length = max(len(row) for row in rows)
        yield {"input_ids": torch.tensor([row + [pad_token_id] * (length - len(row)) for row in rows],
                                         dtype=torch.long),
               "attention_mask": torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows],
                                              dtype=torch.long)}


def proxy_samples_for_this_rank(model: nn.Module, tokenizer, folora: FoLoRAConfig, *, progress: bool = False,
                                replica: int | None = None, replicas: int | None = None) -> list[ProxySample]:
    """This rank's share of the proxy calibration set: of ``proxy.path`` (a saved proxy set or a ``{"text": ...}``
    corpus) when set, else sampled from ``model`` with the ``proxy`` settings (distinct seeds per rank). Empty when
    this rank gets no sample (calibration then stops every rank, naming it).

    Args:
        replica, replicas: this rank's data-parallel replica and how many there are (default: the rank and the
            world); under tensor parallelism the TP ranks of a replica share one shard.
    """
    rank = comm.rank() if replica is None else replica
    world = comm.world_size() if replicas is None else replicas
    if folora.proxy.path is not None:
        samples = load_proxy_jsonl(folora.proxy.path, tokenizer=tokenizer, max_length=folora.max_seq_len)
        return [sample for index, sample in enumerate(samples) if index % world == rank]
    return sample_proxy(model, tokenizer, folora.proxy, rank=rank, world_size=world, progress=progress)


def calibration_batches(samples: list[ProxySample], tokenizer, folora: FoLoRAConfig) -> list[dict[str, torch.Tensor]]:
    """Padded proxy batches of ``proxy.batch_size`` (none for no samples)."""
    if not samples:
        return []
    return list(proxy_batches(samples, batch_size=folora.proxy.batch_size, pad_token_id=tokenizer.pad_token_id))

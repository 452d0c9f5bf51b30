"""A Llama decoder on megatron-core's tensor-parallel linears: Hugging Face ``LlamaForCausalLM``'s math and module
names, Megatron's tensor-parallel layout, LoRA (``LoRAParallelLinear``) on the projections FoLoRA targets.

    model.embed_tokens (whole, frozen)
    model.layers[i]: input_layernorm → self_attn {q,k,v}_proj column-parallel (heads split over TP)
                     → causal attention over this rank's heads (RoPE) → o_proj row-parallel
                     → post_attention_layernorm → mlp {gate,up}_proj column-parallel → SiLU·up → down_proj row-parallel
    model.norm → lm_head (whole, frozen)

Why our own decoder and not megatron-core's ``GPTModel``: on CPU its attention allocates a CUDA buffer and its
RoPE moves frequencies to the CUDA device, so it does not run on this project's CPU/gloo test machines; every
tensor-parallel piece here is megatron-core's own. Loading a Hugging Face Llama's weights (``load_hf_weights``)
gives each rank its slices, so a TP = N model computes what the Hugging Face model computes, and the exported
adapter (``FoLoRAController.export_adapter``) loads on that model with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from types import SimpleNamespace

import torch
from torch import nn

from folora_ds.adapters.megatron.lora import LoRAParallelLinear
from folora_ds.adapters.megatron.mpu import parallel_state
from folora_ds.distributed import comm

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
ROW_PARALLEL = ("o_proj", "down_proj")


def check_tensor_parallel_fits(config, tp_size: int) -> None:
    """Raise ValueError naming the setting when ``tp_size`` does not divide the heads or widths it splits."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for name, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                        ("intermediate_size", config.intermediate_size)):
        if value % tp_size:
            raise ValueError(f"tensor-parallel size {tp_size} does not divide {name}={value}; choose a TP size "
                             "that divides the attention heads, the key/value heads and the MLP width")


class _RMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm (normalised in float32, scaled in the input's dtype)."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width), requires_grad=False)
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        hidden = hidden.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x)[0]  # megatron's parallel linears (and LoRAParallelLinear) return (output, bias)


class ParallelLlamaForCausalLM(nn.Module):
    """``LlamaForCausalLM``'s forward at tensor-parallel size ``tp_size`` (megatron-core's ``parallel_state`` must
    be initialized with it), LoRA of rank ``lora_rank`` / ``lora_alpha`` on ``targets``.

    ``forward(input_ids, attention_mask=None, labels=None)`` → ``.loss`` (next-token cross-entropy over labelled
    tokens, -100 = ignored) and ``.logits`` (batch, seq, vocab), as the FoLoRA controller and a training loop
    call it. Every weight but LoRA's is frozen. Right padding (``attention_mask`` 0 after the text).

    Raises:
        ValueError: ``tp_size`` does not divide the heads or the MLP width; ``targets`` names no projection.
    """

    def __init__(self, config, tp_size: int, *, lora_rank: int, lora_alpha: float,
                 targets: Iterable[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"), seed: int = 0) -> None:
        super().__init__()
        check_tensor_parallel_fits(config, tp_size)
        targets = set(targets)
        known = {name for names in PROJECTIONS.values() for name in names}
        if not targets or targets - known:
            raise ValueError(f"targets {sorted(targets - known) or '[]'} name no Llama projection; allowed: "
                             f"{sorted(known)}")
        core = importlib.import_module("megatron.core")
        tensor_parallel = importlib.import_module("megatron.core.tensor_parallel")
        parallel_config = core.ModelParallelConfig(tensor_model_parallel_size=tp_size, use_cpu_initialization=True,
                                                   params_dtype=torch.float32)
        self.config, self.tp_size = config, tp_size
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.local_heads = config.num_attention_heads // tp_size
        self.local_kv_heads = config.num_key_value_heads // tp_size
        widths = {"q_proj": (config.hidden_size, config.num_attention_heads * self.head_dim),
                  "k_proj": (config.hidden_size, config.num_key_value_heads * self.head_dim),
                  "v_proj": (config.hidden_size, config.num_key_value_heads * self.head_dim),
                  "o_proj": (config.num_attention_heads * self.head_dim, config.hidden_size),
                  "gate_proj": (config.hidden_size, config.intermediate_size),
                  "up_proj": (config.hidden_size, config.intermediate_size),
                  "down_proj": (config.intermediate_size, config.hidden_size)}

        def projection(name: str, lora_seed: int) -> nn.Module:
            d_in, d_out = widths[name]
            if name in ROW_PARALLEL:
                base = tensor_parallel.RowParallelLinear(d_in, d_out, config=parallel_config, bias=False,
                                                         init_method=nn.init.zeros_, input_is_parallel=True,
                                                         skip_bias_add=False)
            else:
                base = tensor_parallel.ColumnParallelLinear(d_in, d_out, config=parallel_config, bias=False,
                                                            init_method=nn.init.zeros_, gather_output=False)
            if name not in targets:
                base.weight.requires_grad_(False)
                return base
            return LoRAParallelLinear(base, lora_rank, lora_alpha, seed=lora_seed)

        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList()
        for index in range(config.num_hidden_layers):
            layer = nn.Module()
            layer.input_layernorm = _RMSNorm(config.hidden_size, config.rms_norm_eps)
            layer.post_attention_layernorm = _RMSNorm(config.hidden_size, config.rms_norm_eps)
            for block, names in PROJECTIONS.items():
                setattr(layer, block, nn.ModuleDict({name: projection(name, seed + 16 * index + number)
                                                     for number, name in enumerate(names)}))
            self.model.layers.append(layer)
        self.model.norm = _RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for param in (*self.model.embed_tokens.parameters(), *self.lm_head.parameters()):
            param.requires_grad_(False)
        theta = config.rope_parameters["rope_theta"]
        self.register_buffer("inv_freq", 1.0 / (theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)),
                             persistent=False)

    # ------------------------------------------------------------------ weights
    def load_hf_weights(self, state: Mapping[str, torch.Tensor], tp_rank: int) -> None:
        """Copy a Hugging Face ``LlamaForCausalLM`` state dict in: each parallel weight gets this TP rank's slice
        (column layers rows, row layers columns), the rest whole.

        Raises:
            KeyError: the state lacks a weight this model needs (named).
        """
        def take(name: str) -> torch.Tensor:
            if name not in state:
                raise KeyError(f"the Hugging Face state dict has no {name!r}")
            return state[name]

        with torch.no_grad():
            self.model.embed_tokens.weight.copy_(take("model.embed_tokens.weight"))
            self.model.norm.weight.copy_(take("model.norm.weight"))
            head = state.get("lm_head.weight", state.get("model.embed_tokens.weight"))
            self.lm_head.weight.copy_(head)
            for index, layer in enumerate(self.model.layers):
                prefix = f"model.layers.{index}."
                layer.input_layernorm.weight.copy_(take(prefix + "input_layernorm.weight"))
                layer.post_attention_layernorm.weight.copy_(take(prefix + "post_attention_layernorm.weight"))
                for block, names in PROJECTIONS.items():
                    for name in names:
                        module = getattr(layer, block)[name]
                        base = module.base if isinstance(module, LoRAParallelLinear) else module
                        whole = take(f"{prefix}{block}.{name}.weight")
                        dim = 1 if name in ROW_PARALLEL else 0
                        base.weight.copy_(whole.chunk(self.tp_size, dim=dim)[tp_rank])

    # ------------------------------------------------------------------ forward
    def _attention(self, layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   allowed: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        attention = layer.self_attn
        q = _project(attention["q_proj"], x).view(batch, seq, self.local_heads, self.head_dim).transpose(1, 2)
        k = _project(attention["k_proj"], x).view(batch, seq, self.local_kv_heads, self.head_dim).transpose(1, 2)
        v = _project(attention["v_proj"], x).view(batch, seq, self.local_kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        repeat = self.local_heads // self.local_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        heads = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return _project(attention["o_proj"], heads.transpose(1, 2).reshape(batch, seq, -1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> SimpleNamespace:
        batch, seq = input_ids.shape
        hidden = self.model.embed_tokens(input_ids)
        freqs = torch.arange(seq, dtype=torch.float32, device=hidden.device)[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos().to(hidden.dtype), angles.sin().to(hidden.dtype)
        allowed = torch.ones(seq, seq, dtype=torch.bool, device=hidden.device).tril()[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        for layer in self.model.layers:
            hidden = hidden + self._attention(layer, layer.input_layernorm(hidden), cos, sin, allowed)
            x = layer.post_attention_layernorm(hidden)
            mlp = layer.mlp
            hidden = hidden + _project(mlp["down_proj"], nn.functional.silu(_project(mlp["gate_proj"], x))
                                       * _project(mlp["up_proj"], x))
        logits = self.lm_head(self.model.norm(hidden))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


def parallel_llama_from_hf(hf_model, *, lora_rank: int, lora_alpha: float, targets: Iterable[str] | None = None,
                           tp_group=None) -> ParallelLlamaForCausalLM:
    """A ``ParallelLlamaForCausalLM`` at the TP size of ``tp_group`` (default: megatron-core's tensor-parallel
    group) holding this rank's slices of ``hf_model``'s weights (a Hugging Face ``LlamaForCausalLM`` every rank
    loaded)."""
    if tp_group is None:
        tp_group = parallel_state().get_tensor_model_parallel_group()
    tp_size, tp_rank = comm.world_size(tp_group), comm.rank(tp_group)
    extra = {} if targets is None else {"targets": targets}
    model = ParallelLlamaForCausalLM(hf_model.config, tp_size, lora_rank=lora_rank, lora_alpha=lora_alpha, **extra)
    model.load_hf_weights(hf_model.state_dict(), tp_rank)
    return model

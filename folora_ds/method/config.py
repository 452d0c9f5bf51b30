"""Typed, validated configuration of every FoLoRA knob.

``FoLoRAConfig`` is built from Python keyword arguments or from the ``"folora"`` block of a DeepSpeed JSON
config (``FoLoRAConfig.from_deepspeed_config``). Every field is checked on construction; an error names the
field, the value and the allowed range. An unknown key is an error that suggests the closest valid key, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from folora_ds.common.checks import require, require_choice, require_int, require_real
from folora_ds.common.files import read_json_file

GATE_KINDS = ("rational", "sigmoid", "hard")
TAU_MODES = ("relative_median", "absolute")
VARIANTS = ("A", "B")
INITS = ("projected", "kaiming", "eigenvectors")
TASK_TOKEN_MASKS = ("attention", "labels")
EIGENSOLVERS = ("full", "top_k", "auto")
TOP_K_MIN_DIM = 8192
"""``eigensolver="auto"`` solves for the k stored directions only from this input width on (70B's 8192 and 28672,
8B's 14336): below it the full solve takes seconds."""
SOLVE_DTYPES = ("float64", "float32")
STATISTICS_DTYPES = ("float32", "float64")
PROXY_PROMPTS = ("bos", "random_token", "chat_empty_user", "mixed", "chat_prompts")


class MissingFoloraBlockError(KeyError):
    """A DeepSpeed config without a ``"folora"`` block (a user error, unlike other KeyErrors)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# Every config error starts with where the value came from (the "folora" block or FoLoRAConfig's arguments).
_WHERE = "folora config: "
_require = functools.partial(require, where=_WHERE)
_require_int = functools.partial(require_int, where=_WHERE)
_require_choice = functools.partial(require_choice, where=_WHERE)
_require_real = functools.partial(require_real, where=_WHERE)


@dataclass(kw_only=True, frozen=True)
class ProxyConfig:
    """How the pretraining-proxy calibration set is sampled from the base model (docs/method.md).

    Attributes:
        num_sequences: sequences in the whole calibration set (summed over ranks).
        seq_len: new tokens generated per sequence.
        batch_size: sequences generated together.
        temperature: sampling temperature (1.0 = the model's own distribution).
        top_p: nucleus mass kept (1.0 = no truncation).
        seed: base seed; each batch derives its own seed from it and its first sequence index.
        prompt: how a sequence starts: "bos", "random_token" (then ``greedy_prefix_tokens`` greedy tokens),
            "chat_empty_user" (an empty user turn in the chat template), "mixed" (bos and chat_empty_user
            alternating) or "chat_prompts" (a user turn from ``prompts_path``: the model's own answers to them).
        greedy_prefix_tokens: greedy tokens after a random first token ("random_token" prompts).
        path: a saved proxy set (JSONL) or a user corpus of ``{"text": ...}`` lines to use instead of sampling.
        prompts_path: JSONL of ``{"prompt": ...}`` user turns for ``prompt="chat_prompts"`` (sequence i answers
            prompt i mod their count); only with that prompt.
    """

    num_sequences: int = 64
    seq_len: int = 128
    batch_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    prompt: str = "mixed"
    greedy_prefix_tokens: int = 3
    path: str | None = None
    prompts_path: str | None = None

    def __post_init__(self) -> None:
        _require_int("proxy.num_sequences", self.num_sequences, 1)
        _require_int("proxy.seq_len", self.seq_len, 1)
        _require_int("proxy.batch_size", self.batch_size, 1)
        _require_real("proxy.temperature", self.temperature, low=0.0)
        _require_real("proxy.top_p", self.top_p, low=0.0, high=1.0)
        _require_int("proxy.seed", self.seed, 0)
        _require_choice("proxy.prompt", self.prompt, PROXY_PROMPTS)
        _require_int("proxy.greedy_prefix_tokens", self.greedy_prefix_tokens, 0)
        _require(self.path is None or (isinstance(self.path, str) and self.path != ""), "proxy.path", self.path,
                 "null or a non-empty file path")
        _require(self.prompts_path is None or (isinstance(self.prompts_path, str) and self.prompts_path != ""),
                 "proxy.prompts_path", self.prompts_path, "null or a non-empty file path")
        _require((self.prompts_path is not None) == (self.prompt == "chat_prompts"), "proxy.prompts_path",
                 self.prompts_path, 'a file of {"prompt": ...} lines exactly when proxy.prompt is "chat_prompts" '
                 f"(proxy.prompt={self.prompt!r})")


@dataclass(kw_only=True, frozen=True)
class FoLoRAConfig:
    """Every FoLoRA knob, validated on construction.

    Attributes:
        lora_rank: LoRA rank r of every adapted linear.
        lora_alpha: LoRA scale numerator; the adapter computes ``(lora_alpha / lora_rank) * B A x``.
        lora_dropout: dropout on the LoRA branch input.
        target_modules: module name suffixes to adapt, or "all-linear" (peft's meaning).
        gate: gate function of the generalized eigenvalue λ: "rational" λ/(λ+τ), "sigmoid"
            sigmoid((ln λ − ln τ)/temperature), or "hard" [λ ≥ τ].
        temperature: sigmoid temperature (1.0 makes the sigmoid gate equal the rational one).
        tau: the trade-off knob; larger τ preserves more.
        tau_mode: "relative_median" (τ is multiplied by the layer's median λ) or "absolute".
        k: number of directions stored per input (None = all d directions, exact P_g); see
            ``spectral.select_directions`` for which ones.
        gate_tie_tolerance: gates closer than this are one tied cluster, stored whole or not at all, so the
            projector does not depend on round-off (or on the number of ranks) when k would split a cluster.
        ridge: relative ridge δ: C̃ = C_pre + δ·(tr C_pre / d)·I.
        max_ridge_escalations: times δ is multiplied by 10 after a Cholesky failure before giving up.
        solve_dtype: precision of the eigensolve; "float32" retries in float64 when ``retry_float64``.
        retry_float64: retry a failed float32 solve in float64.
        eigensolver: "full" (every eigenpair; exact), "top_k" (only the k stored directions, by block Krylov
            iteration, with the spectrum's distribution — τ's median, the base gate, Σg — estimated by stochastic
            Lanczos quadrature; needs ``k``; falls back to the full solve when it does not converge or when k
            would cut a tied cluster), or "auto" (top_k from d ≥ ``TOP_K_MIN_DIM`` with k ≤ d/16, else full).
        top_k_residual: the relative residual ‖My − θy‖ / θ_max each of the top-k solver's eigenpairs must reach
            (None: as small as the solve dtype allows, 1e-8 in float64 and 3.1e-5 in float32). It is a backward
            error: the stored directions and their λ are exact for whitened task statistics M + E with
            ‖E‖₂ ≤ √k · this · λ_max — far below what one refresh window moves C_task or what sampling its tokens
            leaves uncertain (docs/method.md). At 1e-3 a refresh at d = 28672 needed 1,458 operator columns
            instead of float32's 2,349, with the gated update within 7.3e-4 of it (docs/benchmarks.md).
        max_consecutive_failures: the N-th failed re-solve in a row of one input stops training with an error
            naming the layer; the N − 1 before it keep the previous basis.
        refresh_interval: optimizer steps between re-solves from the running C_task (0 = never).
        ema_decay: weight of the previous C_task estimate when a new window is folded in.
        variant: "A" gates the Adam update (default); "B" keeps Adam moments in spectral coordinates.
        cap_update_norm: rescale each gated row to be no longer (Euclidean) than the ungated row.
        init: "projected" (Kaiming rows of A projected by P_g, renormalised), "kaiming" (peft's default) or
            "eigenvectors" (the r generalized eigenvectors with the largest λ, at the Kaiming rows' norms; needs
            k = None).
        task_token_mask: tokens counted for C_task: "labels" (default: the tokens with a label, i.e. the
            response of prompt/response data, whose inputs the loss trains on) or "attention" (every real token,
            prompt included). On SmolLM2 "labels" cut KL 6-9× at the same learning rate (docs/results.md). Batches
            must then carry ``labels`` (-100 = not counted); data without labels needs "attention".
        statistics_tokens: tokens per input and training micro-batch counted towards the running C_task, drawn
            uniformly from the counted tokens (None = every token: exact, for tests). Σxxᵀ costs Σd² multiply-adds
            per token (≈ 11 GFLOP per token for all inputs of Llama-2-7B, against ≈ 28 GFLOP per token for a LoRA
            training step), so 64 tokens cost ≤ 2% of a step once a micro-batch holds ≥ 1.3k tokens. Calibration
            always counts every token.
        statistics_every: collect C_task on one training micro-batch in this many (1 = every micro-batch).
        statistics_flops_share: None (off) or the largest share of the training step's model flops the running
            C_task may cost (e.g. 0.02). After calibration the controller computes the share from the calibration
            micro-batches' tokens, the input widths and the model's linear parameters
            (``statistics_cost.statistics_share``) and, above it, lowers ``statistics_tokens`` (down to 16) and
            then collects on fewer micro-batches (at least one per ``refresh_interval``); never more than the two
            settings ask. The share is of the busiest owner's time: its flops are weighted by how unevenly the
            owners' Σd² fall and by ``statistics_flop_cost``. ``plan`` prints it.
        statistics_flop_cost: what one statistics flop (a fold in ``statistics_dtype``) costs in model flops, for
            ``statistics_flops_share``; None = 1 when the model computes in the statistics' width or wider, 2.5
            when narrower (bf16: 2.2-2.8 measured on a CPU, ``benchmarks/statistics_update.py``; measure it on a
            GPU, where float32 against bf16 tensor cores can cost far more).
        statistics_dtype: accumulation dtype of the covariance sums. "float64" makes the statistics (and so the
            bases) independent of summation order across ranks up to ~1e-16; useful for ill-conditioned inputs.
        max_seq_len: tokens per task example after truncation.
        forgetting_budget: None (off, the default) or the allowed relative forgetting
            F = Σ tr(ΔW C_pre ΔWᵀ) / Σ tr(W C_pre Wᵀ); at every refresh τ is adapted by dual ascent to hold F
            under it (``folora_ds/method/budget.py``). Needs ``refresh_interval`` > 0.
        budget_step_size: dual-ascent step η on log τ: θ ← θ + η·(F/budget − 1).
        budget_max_tau_scale: bound m on the adapted τ: τ·exp(θ) stays within [τ/m, τ·m].
        proxy: how the pretraining-proxy calibration set is obtained.
    """

    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj")
    gate: str = "rational"
    temperature: float = 1.0
    tau: float = 1.0
    tau_mode: str = "relative_median"
    k: int | None = None
    gate_tie_tolerance: float = 1e-6
    ridge: float = 1e-3
    max_ridge_escalations: int = 6
    solve_dtype: str = "float64"
    retry_float64: bool = True
    eigensolver: str = "full"
    top_k_residual: float | None = 1e-3
    max_consecutive_failures: int = 3
    refresh_interval: int = 100
    ema_decay: float = 0.9
    variant: str = "A"
    cap_update_norm: bool = False
    init: str = "projected"
    task_token_mask: str = "labels"
    statistics_tokens: int | None = 64
    statistics_every: int = 1
    statistics_flops_share: float | None = None
    statistics_flop_cost: float | None = None
    statistics_dtype: str = "float32"
    max_seq_len: int = 256
    forgetting_budget: float | None = None
    budget_step_size: float = 0.5
    budget_max_tau_scale: float = 1000.0
    proxy: ProxyConfig = field(default_factory=ProxyConfig)

    def __post_init__(self) -> None:
        _require_int("lora_rank", self.lora_rank, 1)
        _require_real("lora_alpha", self.lora_alpha, low=0.0)
        _require_real("lora_dropout", self.lora_dropout, low=0.0, high=1.0, low_open=False, high_open=True)
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        targets = self.target_modules
        _require(targets == "all-linear" or (isinstance(targets, tuple) and len(targets) > 0
                                             and all(isinstance(t, str) and t for t in targets)),
                 "target_modules", targets, '"all-linear" or a non-empty list of module name suffixes')
        _require_choice("gate", self.gate, GATE_KINDS)
        _require_real("temperature", self.temperature, low=0.0)
        _require_real("tau", self.tau, low=0.0)
        _require_choice("tau_mode", self.tau_mode, TAU_MODES)
        if self.k is not None:
            _require_int("k", self.k, 1)
        _require_real("gate_tie_tolerance", self.gate_tie_tolerance, low=0.0, high=1.0, low_open=False,
                      high_open=True)
        _require_real("ridge", self.ridge, low=0.0, high=1.0)
        _require_int("max_ridge_escalations", self.max_ridge_escalations, 0)
        _require_choice("solve_dtype", self.solve_dtype, SOLVE_DTYPES)
        _require(isinstance(self.retry_float64, bool), "retry_float64", self.retry_float64, "true or false")
        _require_choice("eigensolver", self.eigensolver, EIGENSOLVERS)
        _require(self.eigensolver != "top_k" or self.k is not None, "eigensolver", self.eigensolver,
                 '"full" or "auto" when k is null (every direction is stored: there is nothing to skip)')
        if self.top_k_residual is not None:
            _require_real("top_k_residual", self.top_k_residual, low=0.0, high=0.1)
        _require_int("max_consecutive_failures", self.max_consecutive_failures, 1)
        _require_int("refresh_interval", self.refresh_interval, 0)
        _require_real("ema_decay", self.ema_decay, low=0.0, high=1.0, low_open=False, high_open=True)
        _require_choice("variant", self.variant, VARIANTS)
        _require(self.variant == "A" or self.k is None, "k", self.k,
                 'null when variant="B" (Variant B keeps moments in the full d-dimensional spectral basis)')
        _require(isinstance(self.cap_update_norm, bool), "cap_update_norm", self.cap_update_norm, "true or false")
        _require_choice("init", self.init, INITS)
        _require(self.init != "eigenvectors" or self.k is None, "k", self.k,
                 'null when init="eigenvectors" (the init reads the directions with the largest λ, which a width-k '
                 'projector does not store)')
        _require_choice("task_token_mask", self.task_token_mask, TASK_TOKEN_MASKS)
        if self.statistics_tokens is not None:
            _require_int("statistics_tokens", self.statistics_tokens, 1)
        _require_int("statistics_every", self.statistics_every, 1)
        if self.statistics_flops_share is not None:
            _require_real("statistics_flops_share", self.statistics_flops_share, low=0.0, high=1.0)
        if self.statistics_flop_cost is not None:
            _require_real("statistics_flop_cost", self.statistics_flop_cost, low=0.0)
        _require_choice("statistics_dtype", self.statistics_dtype, STATISTICS_DTYPES)
        _require_int("max_seq_len", self.max_seq_len, 2)
        if self.forgetting_budget is not None:
            _require_real("forgetting_budget", self.forgetting_budget, low=0.0)
            _require(self.refresh_interval > 0, "forgetting_budget", self.forgetting_budget,
                     "null when refresh_interval=0 (τ is adapted at refreshes)")
        _require_real("budget_step_size", self.budget_step_size, low=0.0)
        _require_real("budget_max_tau_scale", self.budget_max_tau_scale, low=1.0, low_open=False)
        if isinstance(self.proxy, Mapping):
            object.__setattr__(self, "proxy", _from_mapping(ProxyConfig, self.proxy, prefix="proxy."))
        _require(isinstance(self.proxy, ProxyConfig), "proxy", self.proxy, "a ProxyConfig or a mapping")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FoLoRAConfig:
        """Build from a mapping (e.g. the ``"folora"`` block); unknown keys are errors with a suggestion."""
        return _from_mapping(cls, values, prefix="")

    @classmethod
    def from_deepspeed_config(cls, config: str | Path | Mapping[str, Any]) -> FoLoRAConfig:
        """Read the ``"folora"`` block of a DeepSpeed config (a JSON file path or an already-loaded dict).

        Raises:
            FileNotFoundError: the JSON file does not exist.
            MissingFoloraBlockError (a KeyError): the config has no ``"folora"`` block (``{}`` means all defaults).
        """
        if isinstance(config, (str, Path)):
            config = read_json_file(config, what="DeepSpeed config")
        if "folora" not in config:
            raise MissingFoloraBlockError('the DeepSpeed config has no "folora" block; add "folora": {} to use every '
                                          "default (see README, config reference)")
        return cls.from_dict(config["folora"])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that ``from_dict`` turns back into an equal config."""
        values = dataclasses.asdict(self)
        if isinstance(self.target_modules, tuple):
            values["target_modules"] = list(self.target_modules)
        return values


def _from_mapping(cls: type, values: Mapping[str, Any], *, prefix: str):
    if not isinstance(values, Mapping):
        raise ValueError(f"folora config: {prefix.rstrip('.') or 'folora'} must be a mapping, got {values!r}")
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
            raise ValueError(f"folora config: unknown key {prefix + str(key)!r}{hint}")
    return cls(**values)

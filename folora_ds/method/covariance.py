"""Input covariance statistics of every LoRA-adapted linear, collected by forward pre-hooks.

For each adapted input, the collector keeps float32 sums Σ xᵢ xᵢᵀ (d, d) over unmasked tokens and their
count, per source ("pre" for the pretraining proxy, "task" for task data). The covariance is sum / tokens.
With a row exchange (``route_to``), each rank sends the counted token rows of every input to the input's owner
and keeps sums only for the inputs it owns: the (d, d) accumulators are partitioned across ranks, not replicated.

Modules fed the very same tensor (q/k/v of one attention block; gate/up of one MLP) share one accumulator: on
the first collecting forward, a module whose input *is* the tensor a module before it received in the same
forward joins that module's key. The key is the first module's qualified name. Sharing is fixed after that
forward and checked on every later one.

State lives in the collector, never on the modules. Hooks do nothing unless a ``collect(...)`` context is
active, and never modify the input, so a model with the collector attached computes exactly what it computed
before. Recomputation of the forward during backward (activation checkpointing) is not counted twice.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from folora_ds.common.checks import require_int
from folora_ds.method.peft_layers import lora_layers, tensor_parallel_kind

SOURCES = ("pre", "task")


@dataclass
class CovarianceSums:
    """Unnormalised statistics of one input from one source.

    Attributes:
        sum: (d, d) Σ x xᵀ over counted tokens (float32, or float64 when asked for).
        tokens: 0-dim int64 number of counted tokens.
    """

    sum: torch.Tensor
    tokens: torch.Tensor

    def covariance(self, *, name: str = "<input>", in_place: bool = False) -> torch.Tensor:
        """sum / tokens (d, d); ``in_place`` divides the sum itself (no second d × d buffer; the sums are then
        spent). Raises ValueError naming the input when no token was counted."""
        tokens = int(self.tokens)
        if tokens == 0:
            raise ValueError(f"{name!r}: zero unmasked tokens were counted; check the attention/label masks and "
                             "that the calibration set is not empty")
        return self.sum.div_(tokens) if in_place else self.sum / tokens


class CovarianceCollector:
    """Forward pre-hooks on every peft LoRA layer of ``model`` that accumulate input second moments.

    Usage::

        collector = CovarianceCollector(peft_model)
        with collector.collect("pre", attention_mask=batch["attention_mask"]):
            peft_model(**batch)
        c_pre = collector.covariance("pre", key)     # (d, d)
        collector.remove()

    Inputs must be (batch, seq, d) when a mask is given (the mask is (batch, seq)); without a mask any
    (..., d) input counts every token.
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype = torch.float32) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"statistics dtype must be float32 or float64, got {dtype}")
        self.dtype = dtype
        layers = lora_layers(model)
        self._layer_names = list(layers)
        # a row-parallel layer sees d_in / TP columns of its input; its key's width is the whole d_in (the exchange
        # joins the TP ranks' column blocks into whole rows on the owner)
        self._whole_width = {name: layer.in_features for name, layer in layers.items()
                             if tensor_parallel_kind(layer) == "row"}
        self._key_of: dict[str, str] = {}
        self._live_inputs: dict[str, weakref.ref] = {}
        self._dims: dict[str, int] = {}
        self._sums: dict[str, dict[str, CovarianceSums]] = {source: {} for source in SOURCES}
        self._source: str | None = None
        self._mask: torch.Tensor | None = None
        self._sample_tokens: int | None = None
        self._generator: torch.Generator | None = None
        self._drawn: tuple[int, torch.Tensor | None] | None = None  # (tokens of the forward, kept positions)
        self._exchange: RowExchange | None = None
        self._handles = [
            module.register_forward_pre_hook(self._make_hook(name))
            for name, module in model.named_modules() if name in set(self._layer_names)
        ]

    # ------------------------------------------------------------------ public API
    @contextlib.contextmanager
    def collect(self, source: str, *, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, sample_tokens: int | None = None,
                generator: torch.Generator | None = None) -> Iterator[None]:
        """Count the inputs of the forwards run inside this context towards ``source``.

        Args:
            source: "pre" or "task".
            attention_mask: (batch, seq); tokens with 0 are padding and are not counted.
            labels: (batch, seq); if given, only tokens with label != -100 are counted as well.
            sample_tokens: count only this many of the counted tokens per forward, drawn uniformly without
                replacement once per forward and used for every input (None: every token).
            generator: the CPU generator of the draws (for reproducible sampling).
        """
        require_int("sample_tokens", sample_tokens, optional=True)
        if source not in SOURCES:
            raise ValueError(f"source {source!r}; allowed: {SOURCES}")
        if self._source is not None:
            raise RuntimeError("collect() contexts cannot be nested")
        mask = None if attention_mask is None else attention_mask.bool()
        if labels is not None:
            if attention_mask is not None and labels.shape != attention_mask.shape:
                raise ValueError(f"labels {tuple(labels.shape)} and attention_mask {tuple(attention_mask.shape)} "
                                 "must have the same (batch, seq) shape")
            label_mask = labels != -100
            mask = label_mask if mask is None else mask & label_mask
        self._source, self._mask = source, mask
        self._sample_tokens, self._generator, self._drawn = sample_tokens, generator, None
        try:
            yield
        finally:
            self._source, self._mask, self._sample_tokens, self._generator, self._drawn = None, None, None, None, None

    @contextlib.contextmanager
    def discover(self) -> Iterator[None]:
        """Learn the input keys, their sharing and widths from the forward run inside this context, without
        counting anything (so the owners of the inputs can be chosen before any statistics move)."""
        if self._source is not None:
            raise RuntimeError("discover() cannot run inside collect()")
        self._source = "discover"
        try:
            yield
        finally:
            self._source = None

    def route_to(self, exchange: RowExchange | None) -> None:
        """Send the counted rows of every input through ``exchange`` from now on (None: keep every input here).
        The sums already held are kept."""
        self._exchange = exchange

    def keys(self) -> list[str]:
        """Input keys in first-forward order. Raises if no collecting forward has run yet."""
        if not self._key_of:
            raise RuntimeError("no statistics have been collected yet; run a forward inside collect() first")
        return list(dict.fromkeys(self._key_of[name] for name in self._layer_names if name in self._key_of))

    def members(self) -> dict[str, list[str]]:
        """Module names sharing each input key."""
        groups: dict[str, list[str]] = {key: [] for key in self.keys()}
        for name in self._layer_names:
            if name in self._key_of:
                groups[self._key_of[name]].append(name)
        return groups

    def load_sharing(self, members: dict[str, list[str]], dims: dict[str, int]) -> None:
        """Preset which modules share an input (e.g. from a checkpoint) instead of discovering it.

        The next collecting forward still checks that members really receive their key's tensor.
        """
        unknown = sorted({name for names in members.values() for name in names} - set(self._layer_names))
        if unknown:
            raise ValueError(f"modules {unknown[:3]} are not LoRA layers of this model")
        self._key_of = {name: key for key, names in members.items() for name in names}
        self._dims = dict(dims)

    def key_of(self, module_name: str) -> str:
        """The input key of one LoRA module."""
        if module_name not in self._key_of:
            raise KeyError(f"{module_name!r} has not been seen by a collecting forward (or is not a LoRA layer)")
        return self._key_of[module_name]

    def input_dims(self) -> dict[str, int]:
        """Width d of every input key (keys in first-forward order)."""
        return {key: self._dims[key] for key in self.keys()}

    def sums(self, source: str) -> dict[str, CovarianceSums]:
        """The raw sums and token counts of ``source`` per key (with a row exchange: the keys this rank owns)."""
        return dict(self._sums[source])

    def covariance(self, source: str, key: str) -> torch.Tensor:
        """Token-mean covariance (d, d) of input ``key`` under ``source``."""
        if key not in self._sums[source]:
            raise KeyError(f"no {source!r} statistics for {key!r}; known keys: {list(self._sums[source])[:5]}...")
        return self._sums[source][key].covariance(name=f"{key} [{source}]")

    def add_sums(self, source: str, key: str, sums: CovarianceSums) -> None:
        """Add externally held sums (e.g. a checkpointed statistics window) to ``source`` for ``key``.

        Raises:
            KeyError: ``key`` is not an input of this model (as known from ``load_sharing`` or a forward).
            ValueError: the sum is not (d, d) for the input's width d.
        """
        if key not in self._dims:
            raise KeyError(f"add_sums: {key!r} is not a known input of this model")
        dim = self._dims[key]
        if tuple(sums.sum.shape) != (dim, dim):
            raise ValueError(f"add_sums: {key!r} has width {dim}, the added sum has shape {tuple(sums.sum.shape)}")
        current = self._sums[source].get(key)
        if current is None:
            self._sums[source][key] = CovarianceSums(sums.sum.clone().to(self.dtype), sums.tokens.clone())
        else:
            current.sum += sums.sum.to(device=current.sum.device, dtype=self.dtype)
            current.tokens += sums.tokens.to(current.tokens.device)

    def reset(self, *sources: str) -> None:
        """Forget the sums of each of ``sources`` (the sharing of inputs is kept)."""
        for source in sources:
            self._sums[source] = {}

    def remove(self) -> None:
        """Remove every hook. The collected statistics stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if self._source is None or torch._C._current_graph_task_id() != -1:
                return  # not collecting, or a recompute inside backward (activation checkpointing)
            if not args or not isinstance(args[0], torch.Tensor):
                raise TypeError(f"{name!r}: expected the input tensor as the first positional argument")
            self._observe(name, args[0])

        return hook

    def _observe(self, name: str, inputs: torch.Tensor) -> None:
        key = self._key_of.get(name)
        if key is None:
            key = next((k for k, ref in self._live_inputs.items() if ref() is inputs), name)
            self._key_of[name] = key
        elif key != name:
            if self._live_inputs.get(key, lambda: None)() is not inputs:
                raise RuntimeError(f"{name!r} was found to share its input with {key!r} on the first collecting "
                                   "forward but received a different tensor now; the model's data flow changed")
            return
        if key != name:
            return
        self._live_inputs[key] = weakref.ref(inputs)
        self._dims[key] = self._whole_width.get(name, inputs.shape[-1])
        if self._source != "discover":
            self._accumulate(key, inputs)

    @torch.no_grad()
    def _accumulate(self, key: str, inputs: torch.Tensor) -> None:
        inputs = inputs.detach()
        d = inputs.shape[-1]
        if self._mask is not None and (inputs.ndim != 3 or inputs.shape[:2] != self._mask.shape):
            raise ValueError(f"{key!r}: input of shape {tuple(inputs.shape)} does not match the token mask "
                             f"{tuple(self._mask.shape)}; expected (batch, seq, d)")
        rows = inputs.reshape(-1, d)
        positions = self._positions(rows.shape[0], rows.device)
        if positions is not None:
            rows = rows[positions.to(rows.device)]  # inputs may sit on other devices (a model split over GPUs)
        blocks = [rows] if self._exchange is None else self._exchange.route(key, rows)
        width = self._dims[key]  # whole rows reach the owner (a row-parallel input: joined over TP)
        for block in blocks:  # nothing reaches a rank that does not own the input
            sums = self._sums[self._source].get(key)
            if sums is None:
                sums = CovarianceSums(torch.zeros(width, width, dtype=self.dtype, device=rows.device),
                                      torch.zeros((), dtype=torch.int64, device=rows.device))
                self._sums[self._source][key] = sums
            if sums.sum.shape[0] != block.shape[1]:
                raise ValueError(f"{key!r}: input width changed from {sums.sum.shape[0]} to {block.shape[1]}")
            block = block.to(self.dtype)
            sums.sum.addmm_(block.mT, block)
            sums.tokens += block.shape[0]

    def _positions(self, tokens: int, device: torch.device) -> torch.Tensor | None:
        """The token rows counted in this forward (None: all of them), found once per forward and shared by every
        input with the same number of tokens — in a language model every LoRA input of a forward. The mask
        (and a draw of ``sample_tokens`` of its tokens) costs one host sync per forward; the exchange learns
        every rank's row count here."""
        if self._drawn is None or self._drawn[0] != tokens:
            mask = self._mask
            if mask is None and self._sample_tokens is None:
                positions, count = None, tokens
            else:
                counted = torch.arange(tokens) if mask is None else torch.nonzero(mask.flatten().cpu()).flatten()
                if self._sample_tokens is not None and counted.numel() > self._sample_tokens:
                    draw = torch.randperm(counted.numel(), generator=self._generator)[:self._sample_tokens]
                    counted = counted[draw]
                positions, count = counted.to(device), counted.numel()
            if self._exchange is not None:
                self._exchange.begin_forward(count, device)
            self._drawn = (tokens, positions)
        return self._drawn[1]


class RowExchange(Protocol):
    """Where the counted rows of each input go (``distributed.statistics.OwnerRowExchange``): every rank calls
    ``begin_forward`` once per collecting forward and ``route`` once per input, in the same order."""

    def begin_forward(self, rows: int, device: torch.device) -> None:
        """This rank counts ``rows`` token rows per input in the forward that starts."""

    def route(self, key: str, rows: torch.Tensor) -> Iterable[torch.Tensor]:
        """Hand over this rank's (n, d) rows of input ``key``; yields every rank's rows of it, in blocks, on the
        input's owner, and nothing elsewhere."""


class CovarianceEMA:
    """Exponential moving average of per-key covariances across windows (C_task during training).

    ``update(key, window)`` sets the estimate to a copy of ``window`` the first time and to
    ``decay·previous + (1 − decay)·window`` afterwards, in place (no (d, d) temporaries: at 70B one is 3.3 GB), so
    a tensor returned earlier for the key follows later updates.

    It also counts the token rows folded into each estimate (``rows``), when every update says how many: a sum of
    covariances of n₁, n₂, ... rows has rank ≤ n₁ + n₂ + ..., so an estimate of fewer rows than d has a null space
    of at least d − rows, which the top-k solver counts instead of estimating (``SpectralSolver.solve``).
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay {decay!r} must be in [0, 1)")
        self.decay = decay
        self._estimates: dict[str, torch.Tensor] = {}
        self._rows: dict[str, int | None] = {}

    def update(self, key: str, window: torch.Tensor, *, take: bool = False, rows: int | None = None) -> torch.Tensor:
        """Fold ``window`` in; ``take=True`` lets the first estimate be ``window`` itself (the caller's spent
        buffer: no (d, d) copy). ``rows``: the token rows ``window`` sums (None: unknown, and so from then on)."""
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
            raise ValueError(f"CovarianceEMA.update({key!r}): rows={rows!r} must be None or an integer >= 0")
        previous = self._estimates.get(key)
        if previous is None:
            self._estimates[key] = window if take else window.clone()
            self._rows[key] = rows
        else:
            previous.mul_(self.decay).add_(window.to(previous.dtype), alpha=1 - self.decay)
            folded = self._rows.get(key)
            self._rows[key] = None if folded is None or rows is None else folded + rows
        return self._estimates[key]

    def rows(self, key: str) -> int | None:
        """The token rows folded into ``key``'s estimate so far (an upper bound on its rank), None if unknown."""
        return self._rows.get(key)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._estimates[key]

    def __contains__(self, key: str) -> bool:
        return key in self._estimates

    def state_dict(self) -> dict:
        return {"decay": self.decay, "estimates": dict(self._estimates), "rows": dict(self._rows)}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s output; a state without "rows" (saved before they were counted) leaves every
        estimate's rows unknown."""
        decay = state["decay"]
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"CovarianceEMA state: decay={decay!r} must be a float in [0, 1)")
        self.decay = decay
        self._estimates = dict(state["estimates"])
        rows = state.get("rows", {})
        self._rows = {key: rows.get(key) for key in self._estimates}

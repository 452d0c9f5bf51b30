"""``GatedAdamW``: AdamW whose update of LoRA-A is gated direction by direction (docs/method.md).

Every parameter gets exactly torch's AdamW (decoupled weight decay, bias correction, same defaults). A
parameter in a param group marked ``gated=True`` (the LoRA-A weights, shape (r, d_in)) that carries a projector
has its Adam update ``u`` (r, d_in) replaced by the gated update before it is applied:

    Variant A (default):  ΔA = −lr · u·P_g,     u = m̂ / (√v̂ + ε)  in the usual A coordinates
    Variant B:            moments of the gradient in spectral coordinates G·V; ΔA = −lr · (g ⊙ u_Z)·Vᵀ;
                          at a basis change the moments rotate: m ← m·T, v ← v·(T∘T), T = (C̃V_old)ᵀ V_new

Decoupled weight decay (A ← A·(1 − lr·wd)) is not gated: it shrinks A towards zero, which the gate has no
opinion about. Projectors are set or refreshed per parameter between steps (``set_projector``); refreshing
keeps the Adam moments (Variant A) or rotates them (Variant B). ``gated_step_counts`` tells how many steps
really ran gated, so callers can assert that gating happened.

Variant A gates the LoRA-A's of one input together (q/k/v read the same input, as do gate/up, and share its
projector): their update rows are stacked so the projector is read once per step, and where 2k ≥ d as one
(d, d) matrix P_g built once per refresh (``projector.dense_projector``) rather than its two (d, k) factors. The
demo's exact projectors (k = d) are read 3.5x less per block that way (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from folora_ds.method.config import VARIANTS
from folora_ds.method.flat_partitions import CutRow, Fragment, gate_flat_update
from folora_ds.method.peft_layers import lora_a_weight, lora_layers
from folora_ds.method.projector import (
    Projector,
    apply_projector,
    apply_projector_shard,
    cap_row_norms,
    dense_projector,
    prefers_dense,
)


@dataclass
class FlatPartitionLayout:
    """Where the LoRA-A weights live in one flat partition that DeepSpeed hands to the optimizer.

    Attributes:
        fragments: the LoRA-A pieces inside the partition (see ``folora_ds.method.flat_partitions``).
        cut_rows: the rows cut by any rank's partition boundary, identical on every rank of the group.
        sum_across_ranks: all-reduce (sum) over the group, supplied by ``folora_ds.distributed``.
        gated_steps: steps on which this partition's gate ran (counted on every rank, pieces or not).
        split_names: LoRA-A weights split along d_in over tensor-parallel ranks (``gate_flat_update``).
        sum_over_shards: all-reduce (sum) over the tensor-parallel group, for ``split_names``' coordinates.
    """

    fragments: Sequence[Fragment]
    cut_rows: Sequence[CutRow]
    sum_across_ranks: Callable[[torch.Tensor], torch.Tensor]
    gated_steps: int = 0
    split_names: frozenset[str] = frozenset()
    sum_over_shards: Callable[[torch.Tensor], torch.Tensor] | None = None


class GatedAdamW(torch.optim.Optimizer):
    """AdamW with FoLoRA's direction-wise gate on LoRA-A updates.

    Args:
        params: parameters or param groups (as for ``torch.optim.AdamW``). Groups with ``gated=True`` hold
            LoRA-A weights; only their parameters accept projectors. Groups may carry ``param_names`` (a list
            parallel to ``params``) for readable errors and counters.
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``.
        variant: "A" (gate the update) or "B" (moments in spectral coordinates).
        cap_update_norm: rescale each gated row to be no longer (Euclidean) than the ungated row.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        variant: str = "A",
        cap_update_norm: bool = False,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"GatedAdamW: invalid lr {lr!r} (must be >= 0)")
        if not eps >= 0.0:
            raise ValueError(f"GatedAdamW: invalid eps {eps!r} (must be >= 0)")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"GatedAdamW: invalid betas[{index}] {beta!r} (must be in [0, 1))")
        if not weight_decay >= 0.0:
            raise ValueError(f"GatedAdamW: invalid weight_decay {weight_decay!r} (must be >= 0)")
        if variant not in VARIANTS:
            raise ValueError(f"GatedAdamW: variant {variant!r}; allowed: 'A', 'B'")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        gated=False)
        self.variant = variant
        self.cap_update_norm = cap_update_norm
        self._flat_layouts: dict[int, tuple[torch.Tensor, FlatPartitionLayout]] = {}
        self._named_projectors: dict[str, Projector] = {}
        self._shard_sums: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}  # id(param) → sum over TP
        self._sources: dict[int, Projector] = {}  # id(param) → the projector object it was given (set_projector)
        self._dense: dict[int, tuple[Projector, torch.Tensor | None]] = {}  # id(source) → (source, dense P or None)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, checking that gated groups hold only 2-D LoRA-A weights."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("param_names")
        if names is not None and len(names) != len(group["params"]):
            self.param_groups.pop()
            raise ValueError(f"param_names has {len(names)} entries for {len(group['params'])} params")
        if group["gated"]:
            for index, param in enumerate(group["params"]):
                if param.ndim != 2:
                    self.param_groups.pop()
                    raise ValueError(f"{self._name(group, index)} is in a gated group but is not a 2-D "
                                     f"LoRA-A weight (shape {tuple(param.shape)})")

    # ------------------------------------------------------------------ bookkeeping
    def _name(self, group: dict, index: int) -> str:
        names = group.get("param_names")
        if names is not None:
            return names[index]
        group_index = next((i for i, candidate in enumerate(self.param_groups) if candidate is group),
                           len(self.param_groups))
        return f"group {group_index} param {index}"

    def _locate(self, param: torch.Tensor) -> tuple[dict, int]:
        for group in self.param_groups:
            for index, candidate in enumerate(group["params"]):
                if candidate is param:
                    return group, index
        raise ValueError("set_projector: the parameter is not managed by this optimizer")

    def set_projector(self, param: nn.Parameter, projector: Projector, *,
                      sum_over_shards: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Install or refresh the projector of one LoRA-A parameter (r, d_in); call between steps.

        Args:
            sum_over_shards: the parameter is a column block of a LoRA-A split along d_in (a row-parallel layer
                under tensor parallelism) and ``projector`` the same rows of the whole projector
                (``projector_shard``); this sums the (r, k) partial coordinates over the ranks holding the other
                blocks, once per step (``apply_projector_shard``), and every such rank must step too.

        Raises:
            ValueError: the parameter is not in a ``gated=True`` group (not a LoRA-A weight), its d_in differs
                from the projector's d, Variant B gets a low-rank projector, or a shard gets Variant B or the
                row-norm cap (both need whole rows).
        """
        group, index = self._locate(param)
        name = self._name(group, index)
        if not group["gated"]:
            raise ValueError(f"set_projector: {name} is not in a gated param group; projectors apply only to "
                             "LoRA-A weights (build the groups with folora_param_groups)")
        if sum_over_shards is not None and (self.variant != "A" or self.cap_update_norm):
            raise ValueError(f"set_projector: {name} is split along d_in; its gate supports variant='A' without "
                             "cap_update_norm (both others need whole rows)")
        if param.shape[1] != projector.dim:
            raise ValueError(f"set_projector: {name} has shape {tuple(param.shape)} but the projector is for "
                             f"d_in={projector.dim}")
        if self.variant == "B" and projector.rank != projector.dim:
            raise ValueError(f"set_projector: Variant B needs the full basis for {name} (k = d = {projector.dim}), "
                             f"got k = {projector.rank}")
        self._sources[id(param)] = projector  # members of one input share it: they are gated together
        projector = projector.to(device=param.device, dtype=param.dtype)
        state = self.state[param]
        if self.variant == "B" and "exp_avg" in state:
            if "projector_v" in state:
                rotation = state["projector_c_tilde_v"].mT @ projector.v
            else:
                rotation = projector.v
            state["exp_avg"] = state["exp_avg"] @ rotation
            squared = rotation * rotation
            state["exp_avg_sq"] = state["exp_avg_sq"] @ squared
            if "max_exp_avg_sq" in state:
                state["max_exp_avg_sq"] = state["max_exp_avg_sq"] @ squared
        state["projector_c_tilde_v"] = projector.c_tilde_v
        state["projector_v"] = projector.v
        state["projector_gates"] = projector.gates
        state["projector_base"] = float(projector.base)
        state["projector_refreshes"] = state.get("projector_refreshes", 0) + 1
        if sum_over_shards is None:
            self._shard_sums.pop(id(param), None)
        else:
            self._shard_sums[id(param)] = sum_over_shards
        state.setdefault("gated_steps", 0)

    def register_flat_partition(self, flat: torch.Tensor, layout: FlatPartitionLayout) -> None:
        """Declare that ``flat`` (a 1-D partition in a gated group) holds the LoRA-A pieces of ``layout``.

        Raises:
            ValueError: Variant B or the row-norm cap is requested (both need whole rows; not supported on
                partitions).
        """
        if self.variant != "A" or self.cap_update_norm:
            raise ValueError("gating ZeRO flat partitions supports variant='A' without cap_update_norm")
        if flat.ndim != 1:
            raise ValueError(f"flat partition must be 1-D, got shape {tuple(flat.shape)}")
        self._flat_layouts[id(flat)] = (flat, layout)

    def set_named_projector(self, name: str, projector: Projector) -> None:
        """Install the projector of the LoRA-A called ``name`` for the flat partitions that hold pieces of it."""
        columns = {fragment.cols for _, layout in self._flat_layouts.values() for fragment in layout.fragments
                   if fragment.name == name}
        if not columns:
            raise ValueError(f"set_named_projector: no flat partition of this rank holds {name!r}")
        if columns != {projector.dim}:
            raise ValueError(f"set_named_projector: {name!r} has {columns.pop()} columns but the projector is for "
                             f"d={projector.dim}")
        self._named_projectors[name] = projector

    def flat_gated_steps(self) -> list[int]:
        """Gated steps of every registered flat partition (equal to the optimizer steps when gating ran)."""
        return [layout.gated_steps for _, layout in self._flat_layouts.values()]

    def projector(self, param: nn.Parameter) -> Projector | None:
        """The projector in use for ``param`` (None before one is set)."""
        state = self.state.get(param, {})
        if "projector_v" not in state:
            return None
        return Projector(state["projector_c_tilde_v"], state["projector_v"], state["projector_gates"],
                         state.get("projector_base", 1.0))

    def gated_step_counts(self) -> dict[str, int]:
        """Gated steps taken per LoRA-A parameter (by ``param_names`` where given)."""
        counts = {}
        for group in self.param_groups:
            if not group["gated"]:
                continue
            for index, param in enumerate(group["params"]):
                counts[self._name(group, index)] = int(self.state.get(param, {}).get("gated_steps", 0))
        return counts

    def update_norm_ratios(self) -> dict[str, float]:
        """‖gated update‖ / ‖ungated update‖ (Euclidean) of the last step, per gated parameter."""
        ratios = {}
        for group in self.param_groups:
            for index, param in enumerate(group["params"]):
                ratio = self.state.get(param, {}).get("update_norm_ratio")
                if ratio is not None:
                    ratios[self._name(group, index)] = float(ratio)
        return ratios

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step for every parameter with a gradient; gated for LoRA-A parameters with a projector."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sharing: dict[int, list[tuple[nn.Parameter, torch.Tensor, float]]] = {}  # id(source) → its LoRA-A's updates
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("GatedAdamW does not support sparse gradients")
                grad = -param.grad if group["maximize"] else param.grad
                state = self.state[param]
                gated = group["gated"] and "projector_v" in state
                if gated and self.variant == "B":
                    grad = grad @ state["projector_v"]
                if "exp_avg" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"]
                param.mul_(1 - lr * weight_decay)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                    second = state["max_exp_avg_sq"]
                else:
                    second = exp_avg_sq
                bias_correction1 = 1 - beta1**step
                denom = (second.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                flat = self._flat_layouts.get(id(param)) if group["gated"] else None
                if flat is not None and flat[0] is param:
                    self._step_flat(param, flat[1], exp_avg / denom / bias_correction1, lr)
                    continue
                if group["gated"] and param.ndim == 1:
                    raise RuntimeError("GatedAdamW got a flat partition of a gated group without a registered "
                                       "layout; its LoRA-A update would go ungated (use folora_ds.initialize)")
                if not gated:
                    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
                    continue
                update = exp_avg / denom / bias_correction1
                sum_over_shards = self._shard_sums.get(id(param))
                if self.variant == "A" and sum_over_shards is None:  # gated below, with the others of its input
                    sharing.setdefault(id(self._source(param)), []).append((param, update, lr))
                    continue
                if self.variant == "A":
                    reference = update
                    gated_update = apply_projector_shard(update, self.projector(param), sum_over_shards)
                else:
                    reference = update @ state["projector_v"].mT
                    gated_update = (update * state["projector_gates"]) @ state["projector_v"].mT
                self._apply_gated(param, gated_update, reference, lr)
        for members in sharing.values():
            self._gate_shared(members)
        return loss

    def _gate_shared(self, members: Sequence[tuple[nn.Parameter, torch.Tensor, float]]) -> None:
        """Variant A for the LoRA-A's of one input (q/k/v, gate/up share theirs): their update rows stacked, so the
        projector is read once per step, as one (d, d) matrix where that reads less (``prefers_dense``)."""
        source = self._source(members[0][0])
        rows = torch.cat([update for _, update, _ in members]) if len(members) > 1 else members[0][1]
        cached = self._dense.get(id(source))
        if cached is None or cached[0] is not source:
            projector = self.projector(members[0][0])
            cached = (source, dense_projector(projector) if prefers_dense(projector) else None)
            live = {id(held) for held in self._sources.values()}
            self._dense = {key: value for key, value in self._dense.items() if key in live}  # refreshed inputs go
            self._dense[id(source)] = cached
        gated = rows @ cached[1] if cached[1] is not None else apply_projector(rows, self.projector(members[0][0]))
        start = 0
        for param, update, lr in members:
            self._apply_gated(param, gated[start:start + update.shape[0]], update, lr)
            start += update.shape[0]

    def _source(self, param: nn.Parameter) -> Projector:
        """The projector object ``param`` was given (shared by the members of one input), or, for a projector that
        came with a loaded state dict, one of its own."""
        if id(param) not in self._sources:
            self._sources[id(param)] = self.projector(param)
        return self._sources[id(param)]

    def _apply_gated(self, param: nn.Parameter, gated_update: torch.Tensor, reference: torch.Tensor,
                     lr: float) -> None:
        """Apply one LoRA-A's gated update (capped first where asked) and count the gated step."""
        state = self.state[param]
        if self.cap_update_norm:
            gated_update = cap_row_norms(gated_update, reference)
        state["update_norm_ratio"] = gated_update.norm() / reference.norm().clamp_min(1e-30)
        param.add_(gated_update, alpha=-lr)
        state["gated_steps"] += 1

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``; the loaded projectors are each parameter's own (gated alone,
        nothing cached from before) until ``set_projector`` shares one again."""
        super().load_state_dict(state_dict)
        self._sources.clear()
        self._dense.clear()

    def dense_projector_bytes(self) -> int:
        """Bytes of the (d, d) matrices built for inputs gated densely (``projector.prefers_dense``)."""
        return sum(dense.numel() * dense.element_size() for _, dense in self._dense.values() if dense is not None)

    def _step_flat(self, flat: torch.Tensor, layout: FlatPartitionLayout, update: torch.Tensor, lr: float) -> None:
        projectors = {}
        for fragment in layout.fragments:
            projector = self._named_projectors.get(fragment.name)
            if projector is None:
                raise RuntimeError(f"no projector for {fragment.name!r} on this rank; its update would go ungated")
            projectors[fragment.name] = projector.to(device=flat.device, dtype=flat.dtype)
        gate_flat_update(update, layout.fragments, projectors, layout.cut_rows, layout.sum_across_ranks,
                         split_names=layout.split_names, sum_over_shards=layout.sum_over_shards)
        flat.add_(update, alpha=-lr)
        layout.gated_steps += 1


def folora_param_groups(model: nn.Module, *, weight_decay: float = 0.0) -> list[dict]:
    """Param groups for ``GatedAdamW`` from a peft LoRA model: LoRA-A weights gated, other trainables plain.

    Returns:
        ``[{"params": [...A...], "param_names": [...], "gated": True, "weight_decay": wd},
        {"params": [...rest...], "param_names": [...], "gated": False, "weight_decay": wd}]`` (the second group
        is omitted when empty).
    """
    lora_a_ids = {id(lora_a_weight(layer)) for layer in lora_layers(model).values()}
    gated, plain = ([], []), ([], [])
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        bucket = gated if id(param) in lora_a_ids else plain
        bucket[0].append(param)
        bucket[1].append(name)
    groups = [{"params": gated[0], "param_names": gated[1], "gated": True, "weight_decay": weight_decay}]
    if plain[0]:
        groups.append({"params": plain[0], "param_names": plain[1], "gated": False, "weight_decay": weight_decay})
    return groups

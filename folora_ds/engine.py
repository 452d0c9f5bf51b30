"""``folora_ds.initialize``: FoLoRA on a DeepSpeed engine (ZeRO 0, 1, 2, 3; fp32, and bf16 at ZeRO 1/2/3).

    engine, controller = folora_ds.initialize(peft_model, "ds_configs/zero2.json",
                                              proxy_batches=my_proxy_shard, task_batches=my_task_shard)
    for batch in loader:                         # this rank's micro-batches
        with controller.track_task(batch):       # C_task keeps being collected (reduced at refreshes)
            loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        controller.after_engine_step()           # counts optimizer steps; refreshes every K of them
    controller.check_gating()                    # raises unless every optimizer step was gated on this rank

Before DeepSpeed wraps the model, every rank runs its calibration shard through the (replicated) model; the
statistics are reduced to their owner ranks, owners solve, and the projected LoRA-A init is broadcast from the
owners. DeepSpeed then builds the engine around ``GatedAdamW``; the ZeRO partitions are mapped
(``distributed/zero_layout.py``) and each owner sends its projectors only to the ranks holding rows they gate.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from folora_ds.budget import adapter_penalty, base_energy, budget_from_config
from folora_ds.config import FoLoRAConfig
from folora_ds.distributed import comm
from folora_ds.distributed.ownership import assign_owners
from folora_ds.distributed.statistics import (
    agree_on_inputs,
    deliver_projectors,
    raise_if_any,
    reduce_to_owners,
)
from folora_ds.distributed.zero_layout import register_zero_partitions
from folora_ds.optim import FlatPartitionLayout, GatedAdamW, folora_param_groups
from folora_ds.peft_utils import base_weight_matrix, lora_a_weight, lora_b_weight, lora_layers, lora_scaling
from folora_ds.spectral import Projector, SpectralSolveError, SpectralSolver, project_rows
from folora_ds.stats import CovarianceCollector, CovarianceEMA, CovarianceSums

_ADAMW_TYPES = ("adamw", "adam")


def load_ds_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A private copy of a DeepSpeed config given as a JSON path or a dict."""
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config {str(path)!r} does not exist")
        return json.loads(path.read_text())
    return copy.deepcopy(dict(config))


def _refuse_unsupported(ds_config: Mapping[str, Any], folora: FoLoRAConfig) -> int:
    """Stop combinations FoLoRA does not handle, before any work; returns the ZeRO stage."""
    zero = ds_config.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ValueError(f"zero_optimization.{key}.device={device!r}: offloaded optimizer/parameters would step "
                             "outside GatedAdamW; remove the offload block")
    if zero.get("round_robin_gradients"):
        raise ValueError("zero_optimization.round_robin_gradients=true reorders ZeRO partitions; set it to false")
    for key in ("zero_quantized_weights", "zero_quantized_gradients"):
        if zero.get(key):
            raise ValueError(f"zero_optimization.{key} (ZeRO++) is not supported with FoLoRA; remove it")
    if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
        raise ValueError("zero_optimization.zero_hpz_partition_size > 1 (ZeRO++ hierarchical partitioning) is not "
                         "supported with FoLoRA; remove it")
    if int(zero.get("mics_shard_size", -1) or -1) > 0:
        raise ValueError("zero_optimization.mics_shard_size (MiCS) re-partitions ZeRO-3 in a way folora_ds does not "
                         "map; remove it")
    if zero.get("zenflow") is not None:
        raise ValueError("zero_optimization.zenflow steps parameters outside GatedAdamW's flat layout; remove it")
    if (ds_config.get("fp16") or {}).get("enabled"):
        raise ValueError("fp16 is not supported with FoLoRA yet; use bf16 (ZeRO 1/2/3) or fp32")
    if (ds_config.get("bf16") or {}).get("enabled") and stage == 0:
        raise ValueError("bf16 at ZeRO stage 0 wraps the client optimizer; use ZeRO stage 1, 2 or 3 for bf16")
    if stage > 0 and (folora.variant != "A" or folora.cap_update_norm):
        raise ValueError("variant='B' and cap_update_norm need whole LoRA-A rows; use ZeRO stage 0 for them")
    optimizer = ds_config.get("optimizer")
    if optimizer is not None and str(optimizer.get("type", "")).lower() not in _ADAMW_TYPES:
        raise ValueError(f"DeepSpeed optimizer type {optimizer.get('type')!r} would replace FoLoRA's GatedAdamW; use "
                         '"AdamW" (its params are passed to GatedAdamW) or remove the "optimizer" block')
    return stage


def _optimizer_arguments(ds_config: dict[str, Any]) -> dict[str, Any]:
    block = ds_config.pop("optimizer", None)
    params = dict((block or {}).get("params", {}))
    allowed = {"lr", "betas", "eps", "weight_decay"}
    unknown = sorted(set(params) - allowed - {"torch_adam", "adam_w_mode"})
    if unknown:
        raise ValueError(f"optimizer.params {unknown} are not supported by GatedAdamW (allowed: {sorted(allowed)})")
    arguments = {key: params[key] for key in allowed if key in params}
    if "betas" in arguments:
        arguments["betas"] = tuple(arguments["betas"])
    arguments.setdefault("weight_decay", 0.0)
    return arguments


class DistributedFoLoRAController:
    """FoLoRA state of one rank of a data-parallel DeepSpeed run (see the module docstring for the life cycle)."""

    def __init__(self, model: nn.Module, config: FoLoRAConfig, *, group=None) -> None:
        self.model = model
        self.config = config
        self.group = group
        self.layers = lora_layers(model)
        self.collector = CovarianceCollector(model, dtype=getattr(torch, config.statistics_dtype))
        self.solver = SpectralSolver(config)
        self.task_ema = CovarianceEMA(config.ema_decay)
        self.pre_covariances: dict[str, torch.Tensor] = {}
        self.owned_projectors: dict[str, Projector] = {}
        self.dims: dict[str, int] = {}
        self.owners: dict[str, int] = {}
        self.engine = None
        self.optimizer: GatedAdamW | None = None
        self.layouts: list[FlatPartitionLayout] = []
        self.held_projectors: dict[str, Projector] = {}
        self.optimizer_steps = 0
        self.refreshes = 0
        self.budget = budget_from_config(config)
        self._owned_base_energy = 0.0
        self._last_global_steps = 0
        self._device = next(model.parameters()).device

    # ------------------------------------------------------------------ statistics and solves
    def _forward(self, source: str, batches: Iterable[Mapping[str, torch.Tensor]], progress: bool) -> None:
        was_training = self.model.training
        self.model.eval()
        use_labels = source == "task" and self.config.task_token_mask == "labels"
        with torch.no_grad():
            for batch in tqdm(batches, desc=f"{source} statistics", disable=not progress, leave=False):
                batch = {name: tensor.to(self._device) for name, tensor in batch.items()}
                with self.collector.collect(source, attention_mask=batch.get("attention_mask"),
                                            labels=batch.get("labels") if use_labels else None):
                    self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        self.model.train(was_training)

    def calibrate(self, proxy_batches, task_batches, *, progress: bool = False) -> None:
        """Collective: statistics of this rank's shards, reduced to owners; owners keep C_pre and seed the EMA."""
        self._forward("pre", proxy_batches, progress)
        self._forward("task", task_batches, progress)
        self.dims = agree_on_inputs(self.collector, self.group)
        self.owners = assign_owners(self.dims, comm.world_size(self.group))
        pre = reduce_to_owners(self.collector, "pre", self.dims, self.owners, self._device, self.group)
        error = None
        try:
            self.pre_covariances = {key: sums.covariance(name=f"{key} [pre]") for key, sums in pre.items()}
        except ValueError as problem:
            error = str(problem)
        raise_if_any(error, self.group)
        self.collector.reset("pre")
        if self.budget is not None:  # the model is still replicated here, so owners read whole base weights
            self._owned_base_energy = sum(
                float(base_energy(base_weight_matrix(layer), self.pre_covariances[self.collector.key_of(name)]))
                for name, layer in self.layers.items() if self.collector.key_of(name) in self.pre_covariances)
        self._fold_task_window()

    def _fold_task_window(self) -> None:
        task = reduce_to_owners(self.collector, "task", self.dims, self.owners, self._device, self.group)
        self.collector.reset("task")
        error = None
        try:
            for key, sums in task.items():
                self.task_ema.update(key, sums.covariance(name=f"{key} [task]"))
        except ValueError as problem:
            error = str(problem)
        raise_if_any(error, self.group)

    def solve(self) -> None:
        """Collective: owners solve their inputs; any failure is raised on every rank."""
        error = None
        tau_scale = 1.0 if self.budget is None else self.budget.tau_scale
        try:
            for key in self.pre_covariances:
                projector, _ = self.solver.solve(key, self.task_ema[key], self.pre_covariances[key],
                                                 tau_scale=tau_scale)
                self.owned_projectors[key] = projector.to(dtype=torch.float32)
        except (SpectralSolveError, RuntimeError) as problem:
            error = str(problem)
        raise_if_any(error, self.group)

    def projector_rank(self, key: str) -> int:
        """k of the projector of ``key`` (identical on every rank)."""
        return self.dims[key] if self.config.k is None else min(self.config.k, self.dims[key])

    def initialize_lora_a(self) -> None:
        """Collective: owners project the (replicated) initial LoRA-A rows of their inputs and broadcast them."""
        if self.config.init != "projected":
            return
        me = comm.rank(self.group)
        with torch.no_grad():
            for name, layer in self.layers.items():
                key = self.collector.key_of(name)
                weight = lora_a_weight(layer)
                owner = self.owners[key]
                value = weight.detach().clone().float()
                if owner == me:
                    value = project_rows(value, self.owned_projectors[key].to(value.device))
                weight.copy_(comm.broadcast(value, owner, self.group))

    # ------------------------------------------------------------------ engine
    def attach(self, engine, optimizer: GatedAdamW) -> None:
        """Map the engine's ZeRO partitions and deliver projectors to the ranks that need them."""
        self.engine, self.optimizer = engine, optimizer
        self._last_global_steps = engine.global_steps
        lora_a_names = {id(lora_a_weight(layer)): name for name, layer in self.layers.items()}
        key_of_name = {name: self.collector.key_of(name) for name in self.layers}
        self.layouts = register_zero_partitions(engine, optimizer,
                                                lora_a_names, lambda name: self.projector_rank(key_of_name[name]))
        self._deliver()
        for layout in self.layouts:  # gated steps before a resume were checked when the checkpoint was taken
            layout.gated_steps = self.optimizer_steps

    def _needed_keys(self) -> set[str]:
        if not self.layouts:  # ZeRO 0: every rank steps whole parameters
            return set(self.dims)
        names = {fragment.name for layout in self.layouts for fragment in layout.fragments}
        return {self.collector.key_of(name) for name in names}

    def _deliver(self) -> None:
        shapes = {key: (dim, self.projector_rank(key)) for key, dim in self.dims.items()}
        self.held_projectors = deliver_projectors(self.owned_projectors, self.owners, self._needed_keys(), shapes,
                                                  self._device, self.group)
        held_names = {fragment.name for layout in self.layouts for fragment in layout.fragments}
        for name, layer in self.layers.items():
            key = self.collector.key_of(name)
            if not self.layouts:
                self.optimizer.set_projector(lora_a_weight(layer), self.held_projectors[key])
            elif name in held_names:
                self.optimizer.set_named_projector(name, self.held_projectors[key])

    def projector_bytes(self) -> int:
        """Bytes of projector tensors this rank holds (delivered, not counting the copies it owns and sends)."""
        return sum(t.numel() * t.element_size() for p in self.held_projectors.values()
                   for t in (p.c_tilde_v, p.v, p.gates))

    @contextlib.contextmanager
    def track_task(self, batch: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Count the training forward run inside this context towards the running C_task."""
        use_labels = self.config.task_token_mask == "labels"
        with self.collector.collect("task", attention_mask=batch.get("attention_mask"),
                                    labels=batch.get("labels") if use_labels else None):
            yield

    def after_engine_step(self) -> bool:
        """Call after every ``engine.step()``; acts only when DeepSpeed took an optimizer step (accumulation
        boundary). Every ``refresh_interval`` optimizer steps: reduce C_task, re-solve, re-deliver (collective).

        Returns:
            Whether a refresh ran.
        """
        global_steps = self.engine.global_steps
        if global_steps == self._last_global_steps:
            return False
        self._last_global_steps = global_steps
        self.optimizer_steps += 1
        interval = self.config.refresh_interval
        if interval == 0 or self.optimizer_steps % interval != 0:
            return False
        self._fold_task_window()
        if self.budget is not None:
            self.budget.update(self.measured_forgetting())
        self.solve()
        self._deliver()
        self.refreshes += 1
        return True

    def _lora_gathered(self):
        """A context in which every rank sees whole LoRA weights (a collective all-gather under ZeRO-3)."""
        if self.engine is None or self.engine.zero_optimization_stage() != 3:
            return contextlib.nullcontext()
        import deepspeed

        lora = [weight for layer in self.layers.values() for weight in (lora_a_weight(layer), lora_b_weight(layer))]
        return deepspeed.zero.GatheredParameters(lora, modifier_rank=None)

    def measured_forgetting(self) -> float:
        """Collective: F = Σ tr(ΔW C_pre ΔWᵀ) / Σ tr(W C_pre Wᵀ) over all LoRA modules (identical on every rank).

        Each owner adds the modules of its inputs; one all-reduce of two float64 numbers combines them.
        """
        if self.budget is None:
            raise RuntimeError("measured_forgetting needs a forgetting_budget in the folora config")
        penalty, error = 0.0, None
        with torch.no_grad(), self._lora_gathered():
            try:
                for name, layer in self.layers.items():
                    key = self.collector.key_of(name)
                    if key in self.pre_covariances:
                        penalty += float(adapter_penalty(lora_a_weight(layer), lora_b_weight(layer),
                                                         lora_scaling(layer), self.pre_covariances[key]))
            except (ValueError, RuntimeError) as problem:
                error = f"forgetting budget: {problem}"
        raise_if_any(error, self.group)  # every rank stops, none waits in the all-reduce below
        totals = comm.all_reduce_sum(torch.tensor([penalty, self._owned_base_energy], dtype=torch.float64,
                                                  device=self._device), self.group)
        if not totals[1] > 0:
            raise RuntimeError("measured_forgetting: the base layers' proxy energy is zero; was calibrate() run?")
        return float(totals[0] / totals[1])

    # ------------------------------------------------------------------ checkpoints
    _STRUCTURAL_FIELDS = ("lora_rank", "lora_alpha", "target_modules", "k", "variant", "statistics_dtype")

    def state_dict(self) -> dict:
        """Collective: FoLoRA's whole state in a world-size-independent form (identical on every rank).

        C_pre, the C_task EMA and the solver state (last good projector, report, failure count) per input key,
        gathered from the owners; the current C_task window summed over ranks; counters; the input sharing.
        """
        owned = {"pre": {k: v.cpu() for k, v in self.pre_covariances.items()},
                 "ema": {k: self.task_ema[k].cpu() for k in self.pre_covariances},
                 "solver": self.solver.state_dict()}
        merged: dict[str, dict] = {"pre": {}, "ema": {}, "solver": {}}
        for rank_state in comm.all_gather_objects(owned, self.group):
            for part in merged:
                merged[part].update(rank_state[part])
        local = self.collector.sums("task")
        window = {}
        for key, dim in self.dims.items():
            sums = local.get(key)
            packed = torch.zeros(dim * dim + 1, dtype=torch.float64, device=self._device)
            if sums is not None:
                packed[:-1] = sums.sum.reshape(-1).to(torch.float64)
                packed[-1] = sums.tokens.to(torch.float64)
            comm.all_reduce_sum(packed, self.group)
            window[key] = {"sum": packed[:-1].reshape(dim, dim).cpu(), "tokens": int(packed[-1].round())}
        base_energy_total = float(comm.all_reduce_sum(torch.tensor([self._owned_base_energy], dtype=torch.float64,
                                                                   device=self._device), self.group)[0])
        return {"version": 1, "config": self.config.to_dict(), "dims": dict(self.dims),
                "members": self.collector.members(), "optimizer_steps": self.optimizer_steps,
                "refreshes": self.refreshes, "task_window": window,
                "budget": None if self.budget is None else {**self.budget.state_dict(),
                                                            "base_energy": base_energy_total},
                **merged}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` (saved with any world size); call before ``attach``.

        Raises:
            ValueError: the checkpoint comes from an incompatible config or a model with other LoRA modules.
        """
        if state.get("version") != 1:
            raise ValueError(f"FoLoRA checkpoint version {state.get('version')!r} is not supported (expected 1)")
        saved = FoLoRAConfig.from_dict(state["config"])
        changed = [f for f in self._STRUCTURAL_FIELDS if getattr(saved, f) != getattr(self.config, f)]
        if changed:
            raise ValueError(f"the checkpoint was written with a different FoLoRA config: {changed} differ "
                             f"(checkpoint {[getattr(saved, f) for f in changed]}, now "
                             f"{[getattr(self.config, f) for f in changed]})")
        saved_modules = {name for names in state["members"].values() for name in names}
        if saved_modules != set(self.layers):
            extra = sorted(saved_modules ^ set(self.layers))[:3]
            raise ValueError(f"the checkpoint's LoRA modules differ from this model's (e.g. {extra})")
        self.collector.load_sharing(state["members"], state["dims"])
        self.dims = dict(state["dims"])
        self.owners = assign_owners(self.dims, comm.world_size(self.group))
        me = comm.rank(self.group)
        mine = [key for key, owner in self.owners.items() if owner == me]
        self.pre_covariances = {key: state["pre"][key].to(self._device) for key in mine}
        for key in mine:
            self.task_ema.update(key, state["ema"][key].to(self._device))
        self.solver.load_state_dict(state["solver"], mine)
        self.owned_projectors = {key: self.solver.projector(key).to(self._device) for key in mine}
        self.collector.reset("task")
        if me == 0:
            for key, window in state["task_window"].items():
                if window["tokens"] > 0:
                    self.collector.add_sums("task", key, CovarianceSums(
                        window["sum"].to(self._device), torch.tensor(window["tokens"], device=self._device)))
        self.optimizer_steps = int(state["optimizer_steps"])
        self.refreshes = int(state["refreshes"])
        if self.budget is None and state.get("budget") is not None and me == 0:
            warnings.warn("the checkpoint carries a forgetting budget but this config has none: τ returns to the "
                          "configured value from here on", stacklevel=2)
        if self.budget is not None:
            saved_budget = state.get("budget")
            if saved_budget is None:
                raise ValueError("the checkpoint was written without a forgetting_budget; resume without one or "
                                 "start a new run")
            self.budget.load_state_dict(saved_budget)
            self._owned_base_energy = float(saved_budget["base_energy"]) if me == 0 else 0.0

    def save_checkpoint(self, directory: str | Path, tag: str | None = None) -> None:
        """Collective: ``engine.save_checkpoint`` with FoLoRA's state in ``client_state["folora"]``."""
        self.engine.save_checkpoint(str(directory), tag=tag, client_state={"folora": self.state_dict()})

    def export_adapter(self, directory: str | Path) -> None:
        """Collective: write a standard peft adapter directory (rank 0 writes; every rank waits for it).

        At ZeRO 0/1/2 every rank holds the full, updated LoRA weights after each step, so rank 0 saves them as is.
        At ZeRO-3 each rank holds 1/world of every weight: the trainable (adapter) parameters are all-gathered
        for the save and released afterwards; the frozen base weights are not gathered.
        """
        gathered = contextlib.nullcontext()
        if self.engine is not None and self.engine.zero_optimization_stage() == 3:
            import deepspeed

            trainable = [param for param in self.model.parameters() if param.requires_grad]
            gathered = deepspeed.zero.GatheredParameters(trainable, modifier_rank=None)
        with gathered:
            if comm.rank(self.group) == 0:
                self.model.save_pretrained(str(directory))
        comm.barrier(self.group)

    def gated_step_counts(self) -> list[int]:
        """Gated steps of this rank: one entry per flat partition (ZeRO 1/2), per flat sub-group holding LoRA-A
        (ZeRO 3), or per LoRA-A parameter (ZeRO 0)."""
        if self.layouts:
            return self.optimizer.flat_gated_steps()
        return list(self.optimizer.gated_step_counts().values())

    def check_gating(self) -> None:
        """Raise unless every optimizer step so far was gated on this rank (no silent fallback)."""
        counts = self.gated_step_counts()
        if not counts or set(counts) != {self.optimizer_steps}:
            raise RuntimeError(f"gated steps {counts} differ from optimizer steps {self.optimizer_steps}: the gate "
                               "did not run on every step")


def proxy_batches_for_this_rank(model: nn.Module, tokenizer, folora: FoLoRAConfig, *, max_length: int,
                                progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """This rank's proxy calibration batches: its share of ``proxy.path`` (a saved proxy set or a ``{"text": ...}``
    corpus) when set, else its share of a set sampled from ``model`` with the ``proxy`` settings (distinct seeds
    per rank). Empty when this rank gets no sample (``initialize`` then stops every rank with the culprit)."""
    from folora_ds.proxy import load_proxy_jsonl, proxy_batches, sample_proxy

    rank, world = comm.rank(), comm.world_size()
    if folora.proxy.path is not None:
        samples = load_proxy_jsonl(folora.proxy.path, tokenizer=tokenizer, max_length=max_length)
        samples = [sample for index, sample in enumerate(samples) if index % world == rank]
    else:
        samples = sample_proxy(model, tokenizer, folora.proxy, rank=rank, world_size=world, progress=progress)
    if not samples:
        return []
    return list(proxy_batches(samples, batch_size=folora.proxy.batch_size, pad_token_id=tokenizer.pad_token_id))


def initialize(model: nn.Module, config: str | Path | Mapping[str, Any], *, proxy_batches=None, task_batches=None,
               tokenizer=None, resume_from: str | Path | None = None, tag: str | None = None, lr_scheduler=None,
               progress: bool = False):
    """Build a DeepSpeed engine that trains ``model`` (a peft LoRA model) with FoLoRA's gated AdamW.

    Args:
        model: the same peft model on every rank (not yet wrapped by DeepSpeed).
        config: DeepSpeed config (JSON path or dict) with a ``"folora"`` block. An ``"optimizer"`` block may only
            be AdamW; its params (lr, betas, eps, weight_decay) go to GatedAdamW.
        proxy_batches: this rank's shard of proxy calibration batches (``input_ids``, ``attention_mask``). When
            None and ``tokenizer`` is given, they come from the ``"folora"`` block's ``proxy`` settings: sampled
            from ``model`` (this rank's share) or read from ``proxy.path`` (see ``proxy_batches_for_this_rank``).
        task_batches: this rank's shard of task calibration batches (plus ``labels``).
        tokenizer: the model's tokenizer, needed only to sample or read the proxy set here.
        resume_from: a checkpoint directory written by ``controller.save_checkpoint``; calibration is skipped and
            weights, optimizer and FoLoRA state are restored (any world size for FoLoRA's own state).
        tag: checkpoint tag (DeepSpeed's ``latest`` when None).
        lr_scheduler: passed to ``deepspeed.initialize``.

    Returns:
        ``(engine, controller)``.

    Raises:
        KeyError: no ``"folora"`` block. ValueError / NotImplementedError: an unsupported combination (before any
        work). DistributedStatisticsError: a rank without data, mismatched LoRA modules, bad statistics.
    """
    import deepspeed

    ds_config = load_ds_config(config)
    folora = FoLoRAConfig.from_deepspeed_config(ds_config)
    _refuse_unsupported(ds_config, folora)
    ds_config.pop("folora")
    optimizer_arguments = _optimizer_arguments(ds_config)
    ds_config["zero_allow_untested_optimizer"] = True  # GatedAdamW under ZeRO is what tests/distributed/ checks

    if resume_from is None and (task_batches is None or (proxy_batches is None and tokenizer is None)):
        raise ValueError("initialize needs task_batches and proxy_batches (or a tokenizer to sample the proxy set "
                         "with the config's proxy settings), or resume_from a checkpoint")
    if resume_from is not None and not Path(resume_from).is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(resume_from)!r} does not exist")
    comm.init_distributed()  # a no-op when the launcher's script already started the process group
    controller = DistributedFoLoRAController(model, folora)
    if resume_from is None:
        if proxy_batches is None:
            proxy_batches = proxy_batches_for_this_rank(model, tokenizer, folora, max_length=folora.max_seq_len,
                                                        progress=progress and comm.rank() == 0)
        controller.calibrate(proxy_batches, task_batches, progress=progress)
        controller.solve()
        controller.initialize_lora_a()
    optimizer = GatedAdamW(folora_param_groups(model, weight_decay=optimizer_arguments.pop("weight_decay")),
                           **optimizer_arguments, variant=folora.variant, cap_update_norm=folora.cap_update_norm)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           lr_scheduler=lr_scheduler)
    client = engine.optimizer if engine.zero_optimization_stage() == 0 else engine.optimizer.optimizer
    if client is not optimizer:
        raise RuntimeError(f"DeepSpeed wrapped the optimizer in {type(engine.optimizer).__name__}; FoLoRA cannot "
                           "guarantee the gate runs inside it")
    if resume_from is not None:
        path = Path(resume_from)
        group_markers = [{key: group[key] for key in ("gated", "param_names") if key in group}
                         for group in optimizer.param_groups]
        _refuse_world_size_change(path, tag, engine, ds_config)
        loaded, client_state = engine.load_checkpoint(str(path), tag=tag)
        for group, markers in zip(optimizer.param_groups, group_markers):
            group.update(markers)  # ZeRO-3 universal loading copies group 0's entries into every group
        if loaded is None or not client_state or "folora" not in client_state:
            raise ValueError(f"{str(path)!r} (tag {tag!r}) holds no FoLoRA checkpoint; was it written by "
                             "controller.save_checkpoint?")
        controller.load_state_dict(client_state["folora"])
    controller.attach(engine, optimizer)
    return engine, controller


def _refuse_world_size_change(path: Path, tag: str | None, engine, ds_config: Mapping[str, Any]) -> None:
    """Before loading: a ZeRO 1/2/3 checkpoint saved with another data-parallel world size cannot be loaded
    directly (DeepSpeed fails with an assertion or its own message); say how to convert it."""
    stage = engine.zero_optimization_stage()
    if stage == 0 or (ds_config.get("checkpoint") or {}).get("load_universal"):
        return
    if tag is None:
        latest = path / "latest"
        if not latest.is_file():
            return  # DeepSpeed reports the missing tag itself
        tag = latest.read_text().strip()
    saved_ranks = len(list((path / tag).glob("*zero_pp_rank_*optim_states.pt")))
    if saved_ranks and saved_ranks != engine.dp_world_size:
        raise ValueError(
            f"checkpoint {str(path / tag)!r} holds ZeRO stage-{stage} optimizer state of {saved_ranks} data-parallel "
            f"ranks, this run has {engine.dp_world_size}: DeepSpeed cannot re-partition it directly. Convert it once "
            "with folora_ds.engine.convert_to_universal_checkpoint(directory) (DeepSpeed's ds_to_universal) and "
            'resume with "checkpoint": {"load_universal": true} in the DeepSpeed config; FoLoRA\'s own state is '
            "world-size independent")


def convert_to_universal_checkpoint(directory: str | Path, tag: str | None = None) -> Path:
    """Convert a checkpoint written by ``controller.save_checkpoint`` into DeepSpeed's universal format, so a run
    can resume on another number of ranks at ZeRO 1/2/3 (set ``"checkpoint": {"load_universal": true}``; resume
    with ``tag=None``, or with ``tag="<tag>_universal"`` when naming the tag).

    Runs DeepSpeed's ``ds_to_universal`` on ``directory/<tag>`` (``latest`` when None), writing
    ``directory/<tag>_universal`` and ``directory/latest_universal``. Not a collective: run it once, on one process.

    Returns:
        The universal checkpoint folder.

    Raises:
        FileNotFoundError: no such checkpoint. RuntimeError: the conversion failed (its output is included).
    """
    import subprocess
    import sys

    directory = Path(directory)
    if tag is None:
        latest = directory / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"{str(directory)!r} has no 'latest' file; pass the checkpoint tag")
        tag = latest.read_text().strip()
    source = directory / tag
    if not source.is_dir():
        raise FileNotFoundError(f"checkpoint {str(source)!r} does not exist")
    target = directory / f"{tag}_universal"
    (directory / "latest_universal").unlink(missing_ok=True)  # a stale one must not pass for this conversion
    result = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                             str(source), "--output_folder", str(target), "--inject_missing_state"],
                            capture_output=True, text=True)
    if result.returncode != 0 or not (directory / "latest_universal").is_file():
        raise RuntimeError(f"ds_to_universal failed on {str(source)!r}:\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-3000:]}")
    return target

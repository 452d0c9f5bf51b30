"""``FoLoRAController``: statistics → solves → projectors → gated optimizer, for one process or N ranks.

One class serves both: the collectives come from ``folora_ds.distributed.comm``, where "no process group" means
world size 1 and every collective does nothing. On N ranks each rank runs its shard of the data; the statistics
are reduced to the input's owner rank (largest-d³-first balance), owners solve, and each owner delivers its
projectors only to the ranks whose optimizer partition holds rows they gate.

Life cycle (a plain torch loop; under DeepSpeed ``folora_ds.initialize`` does the first five lines)::

    controller = FoLoRAController(peft_model, config)
    controller.calibrate(proxy_batches, task_batches)    # C_pre, C_task (this rank's shards; collective)
    controller.solve()                                   # owners solve their inputs
    controller.initialize_lora_a()                       # projected init (config.init == "projected")
    optimizer = GatedAdamW(folora_param_groups(peft_model), ...)
    controller.attach(optimizer)                         # or attach(optimizer, engine) under DeepSpeed
    for batch in loader:
        with controller.track_task(batch):               # C_task keeps being collected (EMA across windows)
            loss = peft_model(**batch).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        controller.after_step()                          # re-solves every ``refresh_interval`` optimizer steps
    controller.check_gating()                            # raises unless every optimizer step was gated
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from folora_ds.budget import adapter_penalty, base_energy, budget_from_config
from folora_ds.config import FoLoRAConfig
from folora_ds.distributed import comm
from folora_ds.distributed.ownership import assign_owners
from folora_ds.distributed.statistics import agree_on_inputs, deliver_projectors, raise_if_any, reduce_to_owners
from folora_ds.distributed.zero_layout import register_zero_partitions
from folora_ds.optim import FlatPartitionLayout, GatedAdamW
from folora_ds.peft_utils import base_weight_matrix, lora_a_weight, lora_b_weight, lora_layers, lora_scaling
from folora_ds.projector import Projector, project_rows
from folora_ds.spectral import SolveReport, SpectralSolveError, SpectralSolver
from folora_ds.stats import CovarianceCollector, CovarianceEMA, CovarianceSums

STATE_VERSION = 2
_STRUCTURAL_FIELDS = ("lora_rank", "lora_alpha", "target_modules", "k", "variant", "statistics_dtype")


@dataclass(frozen=True)
class LayerSummary:
    """What the gate does to one input key (``key``: its first member's module name; ``members``: the LoRA modules
    fed by it): input width ``dim``, ``effective_rank`` Σg, ``attenuated`` directions (g < 0.5), the absolute ``tau``
    used, the consecutive failed re-solves at the end (``solve_failures``), and what the width-k projector keeps:
    ``stored`` directions, the ``base_gate`` of all others, ``approximated`` directions (k too small) and, of
    those, ``split_ties`` (tied clusters left out whole; see ``spectral.select_directions``)."""

    key: str
    members: tuple[str, ...]
    dim: int
    effective_rank: float
    attenuated: int
    tau: float
    solve_failures: int
    stored: int
    base_gate: float
    approximated: int
    split_ties: int


class FoLoRAController:
    """FoLoRA's statistics, bases and projector delivery for one peft model, on this rank of ``group``.

    Attributes:
        pre_covariances: C_pre (d, d) of the input keys this rank owns (every key at world size 1).
        owned_projectors: the projectors this rank solved (its owned keys).
        projectors: the projectors this rank's optimizer uses (delivered by their owners at ``attach``).
        owners: owner rank of every input key; dims: width d of every input key.
        optimizer_steps, refreshes: counters (identical on every rank).
    """

    def __init__(self, model: nn.Module, config: FoLoRAConfig, *, group=None) -> None:
        self.model = model
        self.config = config
        self.group = group
        self.layers = lora_layers(model)
        self.collector = CovarianceCollector(model, dtype=getattr(torch, config.statistics_dtype))
        self.task_ema = CovarianceEMA(config.ema_decay)
        self.solver = SpectralSolver(config)
        self.budget = budget_from_config(config)
        self.pre_covariances: dict[str, torch.Tensor] = {}
        self.owned_projectors: dict[str, Projector] = {}
        self.projectors: dict[str, Projector] = {}
        self.dims: dict[str, int] = {}
        self.owners: dict[str, int] = {}
        self.engine = None
        self.optimizer: GatedAdamW | None = None
        self.layouts: list[FlatPartitionLayout] = []
        self.optimizer_steps = 0
        self.refreshes = 0
        self.task_forwards = 0
        self._base_energy = 0.0
        self._last_global_steps = 0
        self._device = next(model.parameters()).device

    # ------------------------------------------------------------------ statistics
    def _forward(self, source: str, batches: Iterable[Mapping[str, torch.Tensor]], progress: bool) -> int:
        was_training = self.model.training
        self.model.eval()
        use_labels = source == "task" and self.config.task_token_mask == "labels"
        count = 0
        with torch.no_grad():
            for batch in tqdm(batches, desc=f"{source} statistics", disable=not progress, leave=False):
                batch = {name: tensor.to(self._device) for name, tensor in batch.items()}
                with self.collector.collect(source, attention_mask=batch.get("attention_mask"),
                                            labels=batch.get("labels") if use_labels else None):
                    self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
                count += 1
        self.model.train(was_training)
        return count

    def calibrate(self, proxy_batches: Iterable[Mapping[str, torch.Tensor]],
                  task_batches: Iterable[Mapping[str, torch.Tensor]], *, progress: bool = False) -> None:
        """Collective: C_pre over this rank's proxy batches and the first C_task over its task batches, summed
        over ranks into each input's owner.

        Raises:
            DistributedStatisticsError: on every rank, when any rank had an empty calibration set, other LoRA
                inputs, an input with zero unmasked tokens, or non-finite statistics.
        """
        self.collector.reset("pre")
        self.collector.reset("task")
        error = None
        if self._forward("pre", proxy_batches, progress) == 0:
            error = "the proxy calibration set produced no batches"
        elif self._forward("task", task_batches, progress) == 0:
            error = "the task calibration set produced no batches"
        raise_if_any(error, self.group)
        self.dims = agree_on_inputs(self.collector, self.group)
        self.owners = assign_owners(self.dims, comm.world_size(self.group))
        pre = reduce_to_owners(self.collector, "pre", self.dims, self.owners, self._device, self.group)
        self.collector.reset("pre")
        try:
            self.pre_covariances = {key: sums.covariance(name=f"{key} [pre]") for key, sums in pre.items()}
        except ValueError as problem:
            error = str(problem)
        raise_if_any(error, self.group)
        if self.budget is not None:  # before DeepSpeed wraps the model, so base weights are whole on every rank
            owned = sum(float(base_energy(base_weight_matrix(layer), self.pre_covariances[self.collector.key_of(
                name)])) for name, layer in self.layers.items() if self.collector.key_of(name) in self.pre_covariances)
            self._base_energy = float(comm.all_reduce_sum(
                torch.tensor([owned], dtype=torch.float64, device=self._device), self.group)[0])
        self._fold_task_window(training=False)

    def _fold_task_window(self, *, training: bool = True) -> None:
        """Collective: reduce the task sums collected since the last window to the owners, fold them into the
        C_task EMA, and start a new window."""
        task = reduce_to_owners(self.collector, "task", self.dims, self.owners, self._device, self.group)
        self.collector.reset("task")
        error = None
        try:
            for key, sums in task.items():
                self.task_ema.update(key, sums.covariance(name=f"{key} [task]"))
        except ValueError as problem:
            hint = ("; run the training forward inside controller.track_task(batch) (and keep statistics_every at "
                    "most the micro-batches between refreshes)") if training else ""
            error = f"{problem}{hint}"
        raise_if_any(error, self.group)

    @contextlib.contextmanager
    def track_task(self, batch: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Count the training forward run inside this context towards the running C_task: on one micro-batch in
        ``statistics_every``, ``statistics_tokens`` tokens per input (a draw seeded by ``proxy.seed``, the rank and
        the micro-batch count, so a resumed run draws the same)."""
        self.task_forwards += 1
        if (self.task_forwards - 1) % self.config.statistics_every != 0:
            yield
            return
        use_labels = self.config.task_token_mask == "labels"
        generator = None
        if self.config.statistics_tokens is not None:
            generator = torch.Generator().manual_seed(
                self.config.proxy.seed * 1_000_003 + comm.rank(self.group) * 7_919 + self.task_forwards)
        with self.collector.collect("task", attention_mask=batch.get("attention_mask"),
                                    labels=batch.get("labels") if use_labels else None,
                                    sample_tokens=self.config.statistics_tokens, generator=generator):
            yield

    # ------------------------------------------------------------------ bases
    def solve(self, *, progress: bool = False) -> dict[str, SolveReport]:
        """Collective: owners solve their inputs from the C_task EMA and C_pre; any failure is raised on every
        rank. Returns this rank's reports (its owned keys)."""
        if not self.dims:
            raise RuntimeError("solve() before calibrate(): no statistics")
        tau_scale = 1.0 if self.budget is None else self.budget.tau_scale
        reports, error = {}, None
        try:
            for key in tqdm(list(self.pre_covariances), desc="generalized eigensolves", disable=not progress,
                            leave=False):
                projector, reports[key] = self.solver.solve(key, self.task_ema[key], self.pre_covariances[key],
                                                            tau_scale=tau_scale)
                self.owned_projectors[key] = projector.to(dtype=torch.float32)
        except (SpectralSolveError, RuntimeError) as problem:
            error = str(problem)
        raise_if_any(error, self.group)
        return reports

    def projector_rank(self, key: str) -> int:
        """k of the projector of ``key`` (identical on every rank)."""
        return self.dims[key] if self.config.k is None else min(self.config.k, self.dims[key])

    def initialize_lora_a(self) -> None:
        """Collective: owners project the initial LoRA-A rows of their inputs by P_g (renormalised) and broadcast
        them (``config.init == "projected"``; a no-op for "kaiming"). Call before DeepSpeed partitions the model."""
        if self.config.init != "projected":
            return
        me = comm.rank(self.group)
        with torch.no_grad():
            for name, layer in self.layers.items():
                key = self.collector.key_of(name)
                weight = lora_a_weight(layer)
                value = weight.detach().clone().float()
                if self.owners[key] == me:
                    value = project_rows(value, self.owned_projectors[key].to(value.device))
                weight.copy_(comm.broadcast(value, self.owners[key], self.group))

    # ------------------------------------------------------------------ optimizer
    def attach(self, optimizer: GatedAdamW, engine=None) -> None:
        """Collective: install the projectors on ``optimizer``. With a DeepSpeed ``engine`` (whose client
        optimizer is ``optimizer``), map its ZeRO partitions first and count optimizer steps by the engine."""
        self.optimizer, self.engine = optimizer, engine
        if engine is not None:
            self._last_global_steps = engine.global_steps
            lora_a_names = {id(lora_a_weight(layer)): name for name, layer in self.layers.items()}
            self.layouts = register_zero_partitions(
                engine, optimizer, lora_a_names, lambda name: self.projector_rank(self.collector.key_of(name)))
        self._deliver()
        for layout in self.layouts:  # gated steps before a resume were checked when the checkpoint was taken
            layout.gated_steps = self.optimizer_steps

    def _deliver(self) -> None:
        held_names = {fragment.name for layout in self.layouts for fragment in layout.fragments}
        needed = {self.collector.key_of(name) for name in held_names} if self.layouts else set(self.dims)
        shapes = {key: (dim, self.projector_rank(key)) for key, dim in self.dims.items()}
        self.projectors = deliver_projectors(self.owned_projectors, self.owners, needed, shapes, self._device,
                                             self.group)
        for name, layer in self.layers.items():
            key = self.collector.key_of(name)
            if not self.layouts:  # whole parameters (no engine, or ZeRO-0)
                self.optimizer.set_projector(lora_a_weight(layer), self.projectors[key])
            elif name in held_names:
                self.optimizer.set_named_projector(name, self.projectors[key])

    def projector_bytes(self) -> int:
        """Bytes of the projector tensors this rank's optimizer uses."""
        return sum(t.numel() * t.element_size() for p in self.projectors.values() for t in (p.c_tilde_v, p.v, p.gates))

    def after_step(self) -> bool:
        """Call after every ``optimizer.step()`` (or ``engine.step()``, which only counts at an accumulation
        boundary). Every ``refresh_interval`` optimizer steps: reduce C_task, adapt τ (budget), re-solve,
        re-deliver (collective).

        Returns:
            Whether a refresh ran.
        """
        if self.optimizer is None:
            raise RuntimeError("after_step() before attach(): no optimizer to gate")
        if self.engine is not None:
            if self.engine.global_steps == self._last_global_steps:
                return False
            self._last_global_steps = self.engine.global_steps
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

    def gated_step_counts(self) -> list[int]:
        """Gated steps of this rank: one entry per flat partition (ZeRO 1/2), per flat sub-group holding LoRA-A
        (ZeRO 3), or per LoRA-A parameter (whole parameters)."""
        if self.layouts:
            return self.optimizer.flat_gated_steps()
        return list(self.optimizer.gated_step_counts().values())

    def check_gating(self) -> None:
        """Collective: raise on every rank unless every optimizer step so far was gated on every rank (no silent
        fallback; a rank that skipped the gate cannot leave the others waiting in a later collective)."""
        counts = self.gated_step_counts()
        error = None
        if not counts or set(counts) != {self.optimizer_steps}:
            error = (f"gated steps {counts} differ from optimizer steps {self.optimizer_steps}: the gate did not run "
                     "on every step")
        raise_if_any(error, self.group)

    # ------------------------------------------------------------------ reporting
    def layer_summaries(self) -> list[LayerSummary]:
        """Collective: per input key, effective rank Σg, attenuated directions, τ and failure count."""
        members = self.collector.members()
        mine = [LayerSummary(key=key, members=tuple(members[key]), dim=report.gates.numel(),
                             effective_rank=float(report.gates.sum()), attenuated=int((report.gates < 0.5).sum()),
                             tau=report.tau, solve_failures=report.consecutive_failures, stored=report.stored,
                             base_gate=report.base_gate, approximated=report.approximated,
                             split_ties=report.split_ties)
                for key, report in self.solver.reports.items()]
        by_key = {summary.key: summary for rank_list in comm.all_gather_objects(mine, self.group)
                  for summary in rank_list}
        return [by_key[key] for key in self.collector.keys() if key in by_key]

    def forgetting_penalty(self, model: nn.Module | None = None) -> dict[str, float]:
        """Collective: tr(ΔW C_pre ΔWᵀ) per LoRA module with ΔW = s·B·A (LoRA starts with B = 0), of this
        controller's model or of ``model`` (another peft model with the same LoRA modules, e.g. a baseline).

        Each owner evaluates the modules of its inputs (ZeRO-3 weights gathered); the results are gathered."""
        layers = self.layers if model is None else lora_layers(model)
        if set(layers) != set(self.layers):
            raise ValueError("forgetting_penalty: the model's LoRA modules differ from the controller's")
        mine, error = {}, None
        weights = [w for layer in layers.values() for w in (lora_a_weight(layer), lora_b_weight(layer))]
        with torch.no_grad(), comm.gathered(weights):
            try:
                for name, layer in layers.items():
                    c_pre = self.pre_covariances.get(self.collector.key_of(name))
                    if c_pre is not None:
                        mine[name] = float(adapter_penalty(lora_a_weight(layer), lora_b_weight(layer),
                                                           lora_scaling(layer), c_pre))
            except (ValueError, RuntimeError) as problem:
                error = f"forgetting penalty: {problem}"
        raise_if_any(error, self.group)
        merged = {name: value for rank_values in comm.all_gather_objects(mine, self.group)
                  for name, value in rank_values.items()}
        return {name: merged[name] for name in self.layers}

    def measured_forgetting(self) -> float:
        """Collective: F = Σ tr(ΔW C_pre ΔWᵀ) / Σ tr(W C_pre Wᵀ), the relative forgetting the budget holds down."""
        if self._base_energy <= 0:
            raise RuntimeError("measured_forgetting needs a forgetting_budget and calibrate() first")
        return sum(self.forgetting_penalty().values()) / self._base_energy

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
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
            packed = torch.zeros(dim * dim + 1, dtype=torch.float64, device=self._device)
            if key in local:
                packed[:-1] = local[key].sum.reshape(-1).to(torch.float64)
                packed[-1] = local[key].tokens.to(torch.float64)
            comm.all_reduce_sum(packed, self.group)
            window[key] = {"sum": packed[:-1].reshape(dim, dim).cpu(), "tokens": int(packed[-1].round())}
        return {"version": STATE_VERSION, "config": self.config.to_dict(), "dims": dict(self.dims),
                "members": self.collector.members(), "optimizer_steps": self.optimizer_steps,
                "task_forwards": self.task_forwards,
                "refreshes": self.refreshes, "task_window": window,
                "budget": None if self.budget is None else {**self.budget.state_dict(),
                                                            "base_energy": self._base_energy},
                **merged}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` saved with any world size; call before ``attach``.

        Raises:
            ValueError: another state version, an incompatible config, or a model with other LoRA modules.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"FoLoRA state version {state.get('version')!r} is not supported (expected "
                             f"{STATE_VERSION})")
        saved = FoLoRAConfig.from_dict(state["config"])
        changed = [f for f in _STRUCTURAL_FIELDS if getattr(saved, f) != getattr(self.config, f)]
        if changed:
            raise ValueError(f"the checkpoint was written with a different FoLoRA config: {changed} differ "
                             f"(checkpoint {[getattr(saved, f) for f in changed]}, now "
                             f"{[getattr(self.config, f) for f in changed]})")
        saved_modules = {name for names in state["members"].values() for name in names}
        if saved_modules != set(self.layers):
            extra = sorted(saved_modules ^ set(self.layers))[:3]
            raise ValueError(f"the checkpoint's LoRA modules differ from this model's (e.g. {extra})")
        if self.budget is None and state.get("budget") is not None:
            warnings.warn("the checkpoint carries a forgetting budget but this config has none: τ returns to the "
                          "configured value from here on", stacklevel=2)
        if self.budget is not None and state.get("budget") is None:
            raise ValueError("the checkpoint was written without a forgetting_budget; resume without one or start "
                             "a new run")
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
        if me == 0:  # the summed window re-enters once
            for key, window in state["task_window"].items():
                if window["tokens"] > 0:
                    self.collector.add_sums("task", key, CovarianceSums(
                        window["sum"].to(self._device), torch.tensor(window["tokens"], device=self._device)))
        self.optimizer_steps = int(state["optimizer_steps"])
        self.refreshes = int(state["refreshes"])
        self.task_forwards = int(state["task_forwards"])
        if self.budget is not None:
            self.budget.load_state_dict(state["budget"])
            self._base_energy = float(state["budget"]["base_energy"])

    def save_checkpoint(self, directory: str | Path, tag: str | None = None) -> Path:
        """Collective: the engine's checkpoint plus FoLoRA's state (``folora_ds.checkpoint``); returns the tag folder.
        Needs an engine; in a plain loop save ``state_dict()`` with the model's and the optimizer's."""
        from folora_ds.checkpoint import save_checkpoint

        if self.engine is None:
            raise RuntimeError("save_checkpoint needs a DeepSpeed engine; in a plain loop save state_dict(), the "
                               "model's and the optimizer's state dicts")
        return save_checkpoint(self.engine, self.state_dict(), directory, tag)

    def export_adapter(self, directory: str | Path) -> None:
        """Collective: write a standard peft adapter directory (rank 0 writes; every rank waits for it).
        ZeRO-3-partitioned adapter weights are gathered for it; the folder appears complete or not at all."""
        from folora_ds.outputs import save_adapter

        save_adapter(self.model, Path(directory))

    def remove(self) -> None:
        """Remove the statistics hooks from the model."""
        self.collector.remove()

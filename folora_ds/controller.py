"""``FoLoRAController``: statistics → solves → projectors → gated optimizer, for one process or N ranks.

One class serves both: the collectives come from ``folora_ds.distributed.comm``, where "no process group" means
world size 1 and every collective does nothing. On N ranks each rank runs its shard of the data; every input has
an owner rank (largest-d³-first balance) to which each forward sends that input's counted token rows, so only the
owner holds its (d, d) statistics; owners solve, and each owner delivers its projectors only to the ranks whose
optimizer partition holds rows they gate.

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
import itertools
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from folora_ds.budget import adapter_penalty, base_energy, budget_from_config, relative_forgetting
from folora_ds.config import FoLoRAConfig
from folora_ds.distributed import comm
from folora_ds.distributed.ownership import assign_owners
from folora_ds.distributed.statistics import OwnerRowExchange, agree_on_inputs, deliver_projectors, raise_if_any
from folora_ds.distributed.zero_layout import register_zero_partitions
from folora_ds.optim import FlatPartitionLayout, GatedAdamW
from folora_ds.peft_utils import base_weight_matrix, lora_a_weight, lora_b_weight, lora_layers, lora_scaling
from folora_ds.projector import Projector, eigenvector_rows, project_rows
from folora_ds.spectral import SolveReport, SpectralSolveError, SpectralSolver
from folora_ds.stats import CovarianceCollector, CovarianceEMA, CovarianceSums

STATE_VERSION = 4
_STRUCTURAL_FIELDS = ("lora_rank", "lora_alpha", "target_modules", "k", "variant", "statistics_dtype")


_PER_INPUT_PARTS = ("pre", "ema", "task_window", "solver")


def merge_state_parts(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The whole FoLoRA state from every rank's ``state_dict()`` part (tensors are not copied).

    Raises:
        ValueError: parts of different runs or versions, or a rank's part missing (named).
    """
    parts = list(parts)
    if not parts:
        raise ValueError("no FoLoRA state parts to merge")
    world = parts[0]["part"][1]
    ranks = sorted(part["part"][0] for part in parts)
    if ranks != list(range(world)) or any(part["part"][1] != world for part in parts):
        missing = sorted(set(range(world)) - set(ranks))
        raise ValueError(f"FoLoRA state parts of ranks {ranks} were given, the run had {world} ranks"
                         + (f" (missing: {missing})" if missing else ""))
    first = min(parts, key=lambda part: part["part"][0])
    common = {key: value for key, value in first.items() if key not in _PER_INPUT_PARTS}
    for part in parts:
        if part.get("version") != first.get("version") or part["dims"] != first["dims"] or (
                part["optimizer_steps"] != first["optimizer_steps"]):
            raise ValueError(f"FoLoRA state part of rank {part['part'][0]} belongs to another run or step")
    merged = {name: {} for name in _PER_INPUT_PARTS}
    for part in parts:
        for name in _PER_INPUT_PARTS:
            merged[name].update(part[name])
    return {**common, "part": (0, 1), **merged}


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
        self._base_energies: dict[str, float] = {}
        self._last_global_steps = 0
        self.last_solve_seconds = 0.0
        self.last_window_tokens = 0
        self.last_metrics: dict[str, float] = {}

    @property
    def _device(self) -> torch.device:
        """Where the model is now (DeepSpeed may move it after this controller was built)."""
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ statistics
    def _set_inputs(self, dims: Mapping[str, int]) -> None:
        """Fix the input widths, choose the owners and route every input's token rows to its owner."""
        self.dims = dict(dims)
        self.owners = assign_owners(self.dims, comm.world_size(self.group))
        self.collector.route_to(OwnerRowExchange(self.owners, self.group))

    def _owned_keys(self) -> list[str]:
        me = comm.rank(self.group)
        return [key for key, owner in self.owners.items() if owner == me]

    def _owned_covariances(self, source: str, *, in_place: bool) -> dict[str, torch.Tensor]:
        """The covariance of every input this rank owns; ValueError naming an input without a counted token."""
        sums = self.collector.sums(source)
        missing = [key for key in self._owned_keys() if key not in sums]
        if missing:
            raise ValueError(f"{missing[0]!r} [{source}]: zero unmasked tokens were counted; check the "
                             "attention/label masks and that the calibration set is not empty")
        return {key: sums[key].covariance(name=f"{key} [{source}]", in_place=in_place) for key in self._owned_keys()}

    def _forward(self, source: str, batches: Iterator[Mapping[str, torch.Tensor]], progress: bool) -> int:
        """Collective: run this rank's batches through the model inside ``collect(source)``; returns how many.

        Every rank runs as many forwards as the rank with the most batches (the row exchange and ZeRO-3's
        parameter gathers are collectives): a rank out of batches repeats its last one with nothing counted."""
        was_training = self.model.training
        self.model.eval()
        use_labels = source == "task" and self.config.task_token_mask == "labels"
        count, last = 0, None
        bar = tqdm(desc=f"{source} statistics", disable=not progress, leave=False)
        with torch.no_grad():
            while True:
                batch = next(batches, None)
                problem = _labels_problem(batch, "task calibration") if use_labels and batch is not None else None
                flags = comm.all_gather_counts(int(batch is not None) + 2 * int(problem is not None), self._device,
                                               self.group)
                if any(flag & 2 for flag in flags):  # every rank raises together, none waits in a collective
                    raise_if_any(problem, self.group)
                if not any(flag & 1 for flag in flags):
                    break
                counting = batch is not None
                batch = {name: tensor.to(self._device) for name, tensor in batch.items()} if counting else last
                mask = batch.get("attention_mask")
                if not counting:
                    mask = torch.zeros_like(batch["input_ids"])
                with self.collector.collect(source, attention_mask=mask,
                                            labels=batch.get("labels") if use_labels and counting else None):
                    self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
                count, last = count + counting, batch
                bar.update(int(counting))
        bar.close()
        self.model.train(was_training)
        return count

    def _discover(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Collective: one short forward (the first sequence, up to 8 tokens) that names the inputs and widths."""
        was_training = self.model.training
        self.model.eval()
        short = {name: batch[name][:1, :8].to(self._device) for name in ("input_ids", "attention_mask")
                 if name in batch}
        with torch.no_grad(), self.collector.discover():
            self.model(**short)
        self.model.train(was_training)

    def calibrate(self, proxy_batches: Iterable[Mapping[str, torch.Tensor]],
                  task_batches: Iterable[Mapping[str, torch.Tensor]], *, progress: bool = False) -> None:
        """Collective: C_pre over this rank's proxy batches and the first C_task over its task batches, each
        input's token rows sent to its owner, which alone holds that input's (d, d) sums.

        Runs one short forward first to learn the inputs (so owners are chosen before any statistics move).

        Raises:
            DistributedStatisticsError: on every rank, when any rank had an empty calibration set, other LoRA
                inputs, an input with zero unmasked tokens, or non-finite statistics.
        """
        self.collector.reset("pre")
        self.collector.reset("task")
        proxy, task = iter(proxy_batches), iter(task_batches)
        first_proxy, first_task = next(proxy, None), next(task, None)
        error = None
        if first_proxy is None:
            error = "the proxy calibration set produced no batches"
        elif first_task is None:
            error = "the task calibration set produced no batches"
        raise_if_any(error, self.group)
        self._discover(first_proxy)
        self._set_inputs(agree_on_inputs(self.collector, self.group))
        self._forward("pre", itertools.chain([first_proxy], proxy), progress)
        self._forward("task", itertools.chain([first_task], task), progress)
        try:
            self.pre_covariances = self._owned_covariances("pre", in_place=True)
        except ValueError as problem:
            error = str(problem)
        self.collector.reset("pre")
        raise_if_any(error, self.group)
        if self.budget is not None:
            self._base_energies = self.base_energies()
        self._fold_task_window(training=False)

    def base_energies(self) -> dict[str, float]:
        """Collective: tr(W C_pre Wᵀ) of every LoRA module (the scale its forgetting is measured against); owners
        evaluate their inputs' modules (ZeRO-3 base weights gathered one module at a time), results gathered."""
        if not self.pre_covariances and not self.dims:
            raise RuntimeError("base_energies() before calibrate(): no C_pre")
        mine = {}
        for name, layer in self.layers.items():
            c_pre = self.pre_covariances.get(self.collector.key_of(name))
            with torch.no_grad(), comm.gathered([layer.get_base_layer().weight]):
                if c_pre is not None:
                    mine[name] = float(base_energy(base_weight_matrix(layer), c_pre))
        merged = {name: value for rank_values in comm.all_gather_objects(mine, self.group)
                  for name, value in rank_values.items()}
        return {name: merged[name] for name in self.layers}

    def _fold_task_window(self, *, training: bool = True) -> None:
        """Collective (error check): fold the task sums the owners collected since the last window into the C_task
        EMA and start a new window."""
        error = None
        window = self.collector.sums("task")
        self.last_window_tokens = max((int(sums.tokens) for sums in window.values()), default=0)
        try:
            for key, covariance in self._owned_covariances("task", in_place=True).items():
                self.task_ema.update(key, covariance, take=True)  # the window's sums are spent: no copy
        except ValueError as problem:
            hint = ("; run the training forward inside controller.track_task(batch) (and keep statistics_every at "
                    "most the micro-batches between refreshes)") if training else ""
            error = f"{problem}{hint}"
        self.collector.reset("task")
        raise_if_any(error, self.group)

    @contextlib.contextmanager
    def track_task(self, batch: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Count the training forward run inside this context towards the running C_task: on one micro-batch in
        ``statistics_every``, ``statistics_tokens`` tokens per input (a draw seeded by ``proxy.seed``, the rank and
        the micro-batch count, so a resumed run draws the same).

        Collective on N ranks: each input's token rows go to its owner during the forward, so every rank must
        run the same number of training forwards inside ``track_task`` (as data-parallel training does)."""
        self.task_forwards += 1
        use_labels = self.config.task_token_mask == "labels"
        problem = _labels_problem(batch, "training") if use_labels else None
        if self.task_forwards == 1:  # collective on the first forward: every rank raises together
            raise_if_any(problem, self.group)
        elif problem is not None:
            raise ValueError(problem)
        if (self.task_forwards - 1) % self.config.statistics_every != 0:
            yield
            return
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
        started = time.perf_counter()
        try:
            for key in tqdm(list(self.pre_covariances), desc="generalized eigensolves", disable=not progress,
                            leave=False):
                projector, reports[key] = self.solver.solve(key, self.task_ema[key], self.pre_covariances[key],
                                                            tau_scale=tau_scale)
                self.owned_projectors[key] = projector.to(dtype=torch.float32)
        except (SpectralSolveError, RuntimeError) as problem:
            error = str(problem)
        self.last_solve_seconds = time.perf_counter() - started
        raise_if_any(error, self.group)
        return reports

    def projector_rank(self, key: str) -> int:
        """k of the projector of ``key`` (identical on every rank)."""
        return self.dims[key] if self.config.k is None else min(self.config.k, self.dims[key])

    def initialize_lora_a(self, engine=None) -> None:
        """Collective: owners rewrite the initial LoRA-A rows of their inputs and broadcast them: projected by P_g
        and renormalised (``config.init == "projected"``) or the top generalized eigenvectors ("eigenvectors"); a
        no-op for "kaiming". Call before the first optimizer step; with
        a DeepSpeed ``engine`` (ZeRO-3 weights gathered one at a time), its optimizer's fp32 partitions are
        refreshed from the new weights."""
        if self.config.init == "kaiming":
            return
        initialize = project_rows if self.config.init == "projected" else eigenvector_rows
        me = comm.rank(self.group)
        with torch.no_grad():
            for name, layer in self.layers.items():
                key, weight = self.collector.key_of(name), lora_a_weight(layer)
                partitioned = hasattr(weight, "ds_id")  # ZeRO-3: the owner's change is broadcast on exit
                with comm.gathered([weight], modifier_rank=self.owners[key]):  # (the world group's rank)
                    value = weight.detach().clone().float()
                    if self.owners[key] == me:
                        value = initialize(value, self.owned_projectors[key].to(value.device))
                    if not partitioned:
                        value = comm.broadcast(value, self.owners[key], self.group)
                    weight.copy_(value)
        if engine is not None and engine.zero_optimization_stage() > 0:
            engine.optimizer.refresh_fp32_params()

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

    def statistics_bytes(self) -> int:
        """Bytes of the (d, d) statistics this rank holds now: C_pre and the C_task EMA of its owned inputs, and
        the sums of the current collection window (owned inputs only)."""
        held = [*self.pre_covariances.values(), *(self.task_ema[key] for key in self._owned_keys()
                                                   if key in self.task_ema)]
        held += [sums.sum for source in ("pre", "task") for sums in self.collector.sums(source).values()]
        return sum(tensor.numel() * tensor.element_size() for tensor in held)

    def projector_bytes(self) -> int:
        """Bytes of the projector tensors this rank's optimizer uses."""
        return sum(t.numel() * t.element_size() for p in self.projectors.values() for t in (p.c_tilde_v, p.v, p.gates))

    def after_step(self) -> bool:
        """Call after every ``optimizer.step()`` (or ``engine.step()``, which only counts at an accumulation
        boundary). Every ``refresh_interval`` optimizer steps: fold the C_task window, adapt τ (budget), re-solve,
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
        refresh = interval > 0 and self.optimizer_steps % interval == 0
        every = 0 if self.engine is None else (self.engine.steps_per_print() or 0)  # DeepSpeed's own log cadence
        if every > 0 and self.optimizer_steps % every == 0 and not refresh:  # a refresh logs it with the rest
            self._write_events({"folora/gated_steps": float(min(self.gated_step_counts(), default=0))})
        if not refresh:
            return False
        self._fold_task_window()
        if self.budget is not None:
            self.budget.update(self.measured_forgetting())
        self.solve()
        self._deliver()
        self.refreshes += 1
        self.log_metrics()
        return True

    def metrics(self) -> dict[str, float]:
        """Collective: what a refresh reports — the relative forgetting F; the mean effective rank Σg/d and
        attenuated share over inputs and, per input (named by its first module, ``layers.11.mlp.down_proj``),
        Σg, attenuated directions and the absolute τ; τ's budget scale; the slowest rank's last solve time; the
        task tokens per input counted in the window just folded (the most on any rank); the fewest gated steps of
        any rank; refreshes and optimizer steps."""
        summaries = self.layer_summaries()
        solve_seconds, tokens, gated = zip(*comm.all_gather_objects(
            (self.last_solve_seconds, self.last_window_tokens, min(self.gated_step_counts(), default=0)),
            self.group))
        values = {"folora/relative_forgetting": self.measured_forgetting(),
                  "folora/effective_rank_fraction": sum(s.effective_rank / s.dim for s in summaries) / len(summaries),
                  "folora/attenuated_fraction": sum(s.attenuated / s.dim for s in summaries) / len(summaries),
                  "folora/solve_seconds": float(max(solve_seconds)), "folora/statistics_tokens": float(max(tokens)),
                  "folora/gated_steps": float(min(gated)), "folora/refreshes": float(self.refreshes),
                  "folora/optimizer_steps": float(self.optimizer_steps)}
        if self.budget is not None:
            values["folora/tau_scale"] = float(self.budget.tau_scale)
        for summary in summaries:
            name = summary.key.split("model.")[-1] if "model." in summary.key else summary.key
            values[f"folora/effective_rank/{name}"] = float(summary.effective_rank)
            values[f"folora/attenuated/{name}"] = float(summary.attenuated)
            values[f"folora/tau/{name}"] = float(summary.tau)
        return values

    def log_metrics(self) -> dict[str, float]:
        """Collective: ``metrics()``, kept in ``last_metrics`` and written to the DeepSpeed engine's monitor
        (TensorBoard / CSV / W&B / Comet as its config enables; rank 0 writes) at the engine's global sample count,
        the x-axis of DeepSpeed's own events (``folora/optimizer_steps`` is one of the values).
        ``after_step`` calls it at every refresh; call it once after ``attach`` for the calibration's values."""
        self.last_metrics = self.metrics()
        self._write_events(self.last_metrics)
        return self.last_metrics

    def _write_events(self, values: Mapping[str, float]) -> None:
        monitor = None if self.engine is None else getattr(self.engine, "monitor", None)
        if monitor is not None and monitor.enabled:  # at DeepSpeed's own x-axis (samples), as its events are:
            step = int(self.engine.global_samples)   # W&B drops events whose step goes backwards
            monitor.write_events([(name, value, step) for name, value in values.items()])

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
        """Collective: the relative forgetting F = mean over modules of tr(ΔW C_pre ΔWᵀ) / tr(W C_pre Wᵀ)
        (``budget.relative_forgetting``), what the budget holds down and the run summary reports."""
        if not self._base_energies:
            self._base_energies = self.base_energies()
        return relative_forgetting(self.forgetting_penalty(), self._base_energies)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This rank's part of FoLoRA's state (no collective): the common part (config, inputs, counters, budget)
        and the per-input state of the inputs it owns (C_pre, the C_task EMA, the current window, the solver's
        last good projector and report). ``merge_state_parts`` of every rank's part is the whole state, which
        any world size can load; at world size 1 the part is the whole. Like ``nn.Module.state_dict``, CPU
        tensors are the live ones, not copies (save before training on; at 70B a copy would be gigabytes)."""
        window = self.collector.sums("task")
        return {"version": STATE_VERSION, "part": (comm.rank(self.group), comm.world_size(self.group)),
                "config": self.config.to_dict(), "dims": dict(self.dims), "members": self.collector.members(),
                "optimizer_steps": self.optimizer_steps, "task_forwards": self.task_forwards,
                "refreshes": self.refreshes,
                "budget": None if self.budget is None else {**self.budget.state_dict(),
                                                            "base_energies": dict(self._base_energies)},
                "pre": {k: v.cpu() for k, v in self.pre_covariances.items()},
                "ema": {k: self.task_ema[k].cpu() for k in self.pre_covariances},
                "task_window": {k: {"sum": window[k].sum.cpu(), "tokens": int(window[k].tokens)} for k in window},
                "solver": self.solver.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved with any world size (``merge_state_parts`` of its ranks' parts, or one part
        holding every input); call before ``attach``.

        Raises:
            ValueError: another state version, an incompatible config, a model with other LoRA modules, or a
                state without some input this rank now owns.
        """
        self.check_state(state)
        if self.budget is None and state.get("budget") is not None:
            warnings.warn("the checkpoint carries a forgetting budget but this config has none: τ returns to the "
                          "configured value from here on", stacklevel=2)
        self.collector.load_sharing(state["members"], state["dims"])
        self._set_inputs(state["dims"])
        mine = self._owned_keys()
        missing = [key for key in mine if key not in state["pre"]]
        if missing:
            raise ValueError(f"the FoLoRA state lacks input {missing[0]!r} ({len(missing)} missing): load the "
                             "merge_state_parts of every rank's part, not one rank's")
        self._load_owned(state, mine)

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise ValueError unless ``state`` fits this controller (version, structural config, LoRA modules, budget);
        cheap, so a resume can check before any engine or weights exist."""
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
        if self.budget is not None and state.get("budget") is None:
            raise ValueError("the checkpoint was written without a forgetting_budget; resume without one or start "
                             "a new run")

    def _load_owned(self, state: Mapping[str, Any], mine: list[str]) -> None:
        self.pre_covariances = {key: state["pre"][key].to(self._device) for key in mine}
        self.task_ema = CovarianceEMA(self.config.ema_decay)  # replaced, not blended with an estimate held before
        for key in mine:
            self.task_ema.update(key, state["ema"][key].to(self._device))
        self.solver.load_state_dict(state["solver"], mine)
        self.owned_projectors = {key: self.solver.projector(key).to(self._device) for key in mine}
        self.collector.reset("task")
        for key in mine:  # the current window re-enters at its (new) owner
            window = state["task_window"].get(key)
            if window is not None:
                self.collector.add_sums("task", key, CovarianceSums(
                    window["sum"].to(self._device), torch.tensor(window["tokens"], device=self._device)))
        self.optimizer_steps = int(state["optimizer_steps"])
        self.refreshes = int(state["refreshes"])
        self.task_forwards = int(state["task_forwards"])
        if self.budget is not None:
            self.budget.load_state_dict(state["budget"])
            self._base_energies = {name: float(v) for name, v in state["budget"]["base_energies"].items()}

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


def _labels_problem(batch: Mapping[str, torch.Tensor], where: str) -> str | None:
    """Why ``batch`` cannot be counted under ``task_token_mask="labels"`` (which counts the tokens with a label),
    or None: without ``labels`` it would silently count every token instead, and labels that are not one per
    input token (sequence classification, encoder-decoder targets) select nothing meaningful."""
    labels = batch.get("labels")
    if labels is None:
        return (f"task_token_mask='labels' counts C_task over the tokens with a label, but a {where} batch has no "
                f"'labels' (keys: {', '.join(sorted(batch))}); add labels (-100 = not counted) or set "
                "task_token_mask='attention' to count every real token")
    if tuple(labels.shape) != tuple(batch["input_ids"].shape):
        return (f"task_token_mask='labels' needs one label per input token, but a {where} batch has labels "
                f"{tuple(labels.shape)} for input_ids {tuple(batch['input_ids'].shape)}; set "
                "task_token_mask='attention' to count every real token")
    return None

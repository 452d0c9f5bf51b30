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
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from folora_ds.controller import calibration
from folora_ds.controller.checkpoint import save_checkpoint
from folora_ds.controller.export import export_adapter
from folora_ds.controller.forgetting import WholeWeights, adapter_penalty_per_module, base_energy_per_module
from folora_ds.controller.initialization import write_initial_lora_a
from folora_ds.controller.owned_statistics import load_owned_statistics, owned_covariances, save_owned_statistics
from folora_ds.controller.reporting import LayerSummary, controller_metrics, merge_summaries, summarize, write_events
from folora_ds.controller.tensor_parallel import input_kinds, needed_rows, parallel_layout
from folora_ds.distributed import comm
from folora_ds.distributed.ownership import assign_owners
from folora_ds.distributed.phases import phase
from folora_ds.distributed.statistics import OwnerRowExchange, agree_on_inputs, deliver_projectors, raise_if_any
from folora_ds.distributed.zero_layout import register_zero_partitions
from folora_ds.method.budget import budget_from_config, relative_forgetting
from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.covariance import CovarianceCollector, CovarianceEMA
from folora_ds.method.eigensolve import SpectralSolveError
from folora_ds.method.gated_adamw import FlatPartitionLayout, GatedAdamW
from folora_ds.method.peft_layers import lora_a_weight, lora_layers, tensor_parallel_kind
from folora_ds.method.projector import Projector, eigenvector_rows, project_rows
from folora_ds.method.spectral import SolveReport, SpectralSolver
from folora_ds.method.state import STATE_VERSION, check_state_fits
from folora_ds.method.statistics_cost import StatisticsSchedule, refresh_is_read, window_is_read


class FoLoRAController:
    """FoLoRA's statistics, bases and projector delivery for one peft model, on this rank of ``group``.

    Attributes:
        pre_covariances: C_pre (d, d) of the input keys this rank owns (every key at world size 1).
        owned_projectors: the projectors this rank solved (its owned keys).
        projectors: the projectors this rank's optimizer uses (delivered by their owners at ``attach``).
        owners: owner rank of every input key; dims: width d of every input key.
        layout: the tensor-parallel x data-parallel grid (TP = 1 without ``TensorParallelLoRA`` layers; with them,
            building the controller is collective).
        optimizer_steps, refreshes: counters (identical on every rank).
        statistics_schedule: which training micro-batches count towards C_task, and how many of their tokens
            (the configured ones, lowered after calibration into ``statistics_flops_share`` when it is set).
    """

    def __init__(self, model: nn.Module, config: FoLoRAConfig, *, group=None) -> None:
        self.model = model
        self.config = config
        self.group = group
        self.layers = lora_layers(model)
        self.layout = parallel_layout(self.layers, group)
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
        self.optimizer_steps = self.refreshes = self.task_forwards = 0
        self.total_steps: int | None = None  # set_total_steps
        self.statistics_schedule = StatisticsSchedule(config.statistics_tokens, config.statistics_every)
        self._base_energies: dict[str, float] = {}
        self._last_global_steps, self.last_solve_seconds, self.last_window_tokens = 0, 0.0, 0
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
        kinds = input_kinds(self.layers, self.collector.members()) if self.layout.tp_size > 1 else {}
        self.collector.route_to(OwnerRowExchange(self.owners, self.group, layout=self.layout, kinds=kinds))

    def _owned_keys(self) -> list[str]:
        me = comm.rank(self.group)
        return [key for key, owner in self.owners.items() if owner == me]

    def _forward(self, source: str, batches: Iterator[Mapping[str, torch.Tensor]], progress: bool) -> int:
        """Collective: ``calibration.run_forwards`` of this rank's ``source`` batches; returns how many counted
        (a method, so a test can alter one rank's statistics)."""
        labels = source == "task" and self.config.task_token_mask == "labels"
        return calibration.run_forwards(self.model, self.collector, source, batches, labels=labels,
                                        device=self._device, group=self.group, progress=progress)

    def calibrate(self, proxy_batches: Iterable[Mapping[str, torch.Tensor]],
                  task_batches: Iterable[Mapping[str, torch.Tensor]], *, progress: bool = False) -> None:
        """Collective: C_pre over this rank's proxy batches and the first C_task over its task batches, each
        input's token rows sent to its owner, which alone holds that input's (d, d) sums. One short forward
        first learns the inputs (so owners are chosen before any statistics move).

        Raises:
            DistributedStatisticsError: on every rank, when any rank had an empty calibration set, other LoRA
                inputs, an input with zero unmasked tokens, or non-finite statistics.
        """
        with phase("calibration"):  # a rank that stops answering is named (distributed.phases)
            self._calibrate(iter(proxy_batches), iter(task_batches), progress)

    def _calibrate(self, proxy: Iterator, task: Iterator, progress: bool) -> None:
        self.collector.reset("pre", "task")
        first_proxy, first_task = next(proxy, None), next(task, None)
        error = ("the proxy calibration set produced no batches" if first_proxy is None
                 else "the task calibration set produced no batches" if first_task is None else None)
        raise_if_any(error, self.group)
        calibration.discover_inputs(self.model, self.collector, first_proxy, self._device)
        self._set_inputs(agree_on_inputs(self.collector, self.group))
        self._forward("pre", itertools.chain([first_proxy], proxy), progress)
        labels = self.config.task_token_mask == "labels"
        tally = calibration.TokenTally(itertools.chain([first_task], task), labels=labels)
        self._forward("task", tally, progress)
        self.statistics_schedule = calibration.budgeted_schedule(self.model, self.config, self.dims, tally, self.group,
                                                                 self.owners)
        try:
            self.pre_covariances = owned_covariances(self.collector, "pre", self._owned_keys(), in_place=True)
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
        return base_energy_per_module(self.layers, self.pre_covariances, self.collector.key_of, self.group,
                                      whole=WholeWeights(self.owners, self.layout, self.group))

    def _fold_task_window(self, *, training: bool = True) -> None:
        """Collective (error check): fold the task sums the owners collected since the last window into the C_task
        EMA and start a new window."""
        error = None
        window = self.collector.sums("task")
        self.last_window_tokens = max((int(sums.tokens) for sums in window.values()), default=0)
        try:
            for key, covariance in owned_covariances(self.collector, "task", self._owned_keys(), in_place=True).items():
                self.task_ema.update(key, covariance, take=True, rows=int(window[key].tokens))  # sums spent: no copy
        except ValueError as problem:
            hint = ("; run the training forward inside controller.track_task(batch) (and keep statistics_every at "
                    "most the micro-batches between refreshes)") if training else ""
            error = f"{problem}{hint}"
        self.collector.reset("task")
        raise_if_any(error, self.group)

    @contextlib.contextmanager
    def track_task(self, batch: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Count the training forward run inside this context towards the running C_task as
        ``statistics_schedule`` says (``calibration.training_forward``; a resumed run draws the same tokens).
        Collective on N ranks: every rank must run as many training forwards inside it (as DP training does)."""
        self.task_forwards += 1
        read = window_is_read(self.optimizer_steps, self.config.refresh_interval, self.total_steps)
        with calibration.training_forward(self.collector, batch, self.config, forward=self.task_forwards,
                                          schedule=self.statistics_schedule, replica=self.layout.dp_rank,
                                          group=self.group, read=read):
            yield

    def set_total_steps(self, total_steps: int | None) -> None:
        """Tell the run's length in optimizer steps (None: unknown): the last window's C_task statistics and the
        refresh at the last step, which would gate no step, are then skipped (``statistics_cost.window_is_read``).
        The HF callback, ``folora-ds train`` and the grid set it; in a loop of your own call it after ``attach``."""
        if total_steps is not None and not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"set_total_steps: total_steps={total_steps!r} must be None or an integer >= 1")
        self.total_steps = total_steps

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
                                                            tau_scale=tau_scale, task_rows=self.task_ema.rows(key))
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
        no-op for "kaiming" (``initialization.write_initial_lora_a``). Call before the first optimizer step; with a
        DeepSpeed ``engine`` (ZeRO-3 weights gathered one at a time), its optimizer's fp32 partitions are refreshed
        from the new weights."""
        if self.config.init == "kaiming":
            return
        rows = project_rows if self.config.init == "projected" else eigenvector_rows
        write_initial_lora_a(self.layers, self.collector.key_of, self.owners, self.owned_projectors, rows, self.group,
                             layout=self.layout)
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
            split = frozenset(name for name, layer in self.layers.items() if tensor_parallel_kind(layer) == "row")
            self.layouts = register_zero_partitions(
                engine, optimizer, lora_a_names, lambda name: self.projector_rank(self.collector.key_of(name)),
                split_names=split, sum_over_shards=self.layout.sum_over_tp())
        self._deliver()
        for layout in self.layouts:  # gated steps before a resume were checked when the checkpoint was taken
            layout.gated_steps = self.optimizer_steps

    def _deliver(self) -> None:
        held_names = {fragment.name for layout in self.layouts for fragment in layout.fragments}
        needed = needed_rows(self.layers, held_names if self.layouts else self.layers, self.collector.key_of,
                             self.dims)
        shapes = {key: (dim, self.projector_rank(key)) for key, dim in self.dims.items()}
        self.projectors = deliver_projectors(self.owned_projectors, self.owners, needed, shapes, self._device,
                                             self.group)
        for name, layer in self.layers.items():
            key = self.collector.key_of(name)
            if not self.layouts:  # whole parameters (no engine, or ZeRO-0); a row-parallel A sums over TP
                split = tensor_parallel_kind(layer) == "row"
                self.optimizer.set_projector(lora_a_weight(layer), self.projectors[key],
                                             sum_over_shards=self.layout.sum_over_tp() if split else None)
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
        re-deliver (collective); at the run's last step (``set_total_steps``) only log. Returns whether it refreshed.
        """
        if self.optimizer is None:
            raise RuntimeError("after_step() before attach(): no optimizer to gate")
        if self.engine is not None:
            if self.engine.global_steps == self._last_global_steps:
                return False
            self._last_global_steps = self.engine.global_steps
        self.optimizer_steps += 1
        interval, steps = self.config.refresh_interval, self.optimizer_steps
        due = interval > 0 and steps % interval == 0
        every = 0 if self.engine is None else (self.engine.steps_per_print() or 0)  # DeepSpeed's own log cadence
        if every > 0 and steps % every == 0 and not due:  # a refresh logs it with the rest
            write_events(self.engine, {"folora/gated_steps": float(min(self.gated_step_counts(), default=0))})
        if not refresh_is_read(steps, interval, self.total_steps):
            if due:  # the run's last step: a solve would gate nothing, but its values are logged as at a refresh
                self.log_metrics()
            return False
        with phase(f"refresh at optimizer step {self.optimizer_steps}"):
            self._fold_task_window()
            if self.budget is not None:
                self.budget.update(self.measured_forgetting())
            self.solve()
            self._deliver()
            self.refreshes += 1
            self.log_metrics()
        return True

    def metrics(self) -> dict[str, float]:
        """Collective: what a refresh reports (``reporting.controller_metrics``)."""
        return controller_metrics(self)

    def log_metrics(self) -> dict[str, float]:
        """Collective: ``metrics()``, kept in ``last_metrics`` and written to the engine's monitor (TensorBoard / CSV
        / W&B / Comet; rank 0) at DeepSpeed's global sample count. ``after_step`` calls it at every refresh; call
        it once after ``attach`` for the calibration's values."""
        self.last_metrics = self.metrics()
        write_events(self.engine, self.last_metrics)
        return self.last_metrics

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
        mine = summarize(self.solver.reports, self.collector.members())
        return merge_summaries(comm.all_gather_objects(mine, self.group), self.collector.keys())

    def forgetting_penalty(self, model: nn.Module | None = None) -> dict[str, float]:
        """Collective: tr(ΔW C_pre ΔWᵀ) per LoRA module with ΔW = s·B·A (LoRA starts with B = 0), of this
        controller's model or of ``model`` (another peft model with the same LoRA modules, e.g. a baseline).

        Each owner evaluates the modules of its inputs (ZeRO-3 weights gathered); the results are gathered."""
        layers = self.layers if model is None else lora_layers(model)
        if set(layers) != set(self.layers):
            raise ValueError("forgetting_penalty: the model's LoRA modules differ from the controller's")
        penalties = adapter_penalty_per_module(layers, self.pre_covariances, self.collector.key_of, self.group,
                                               whole=WholeWeights(self.owners, self.layout, self.group))
        return {name: penalties[name] for name in self.layers}

    def measured_forgetting(self) -> float:
        """Collective: F = mean over modules of tr(ΔW C_pre ΔWᵀ) / tr(W C_pre Wᵀ) (``budget.relative_forgetting``); 0
        while every ΔW is (B = 0), without the base energies (d_out·d_in² each: minutes at 70B on a CPU)."""
        penalties = self.forgetting_penalty()
        if not any(penalties.values()):
            return 0.0
        self._base_energies = self._base_energies or self.base_energies()
        return relative_forgetting(penalties, self._base_energies)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This rank's part of FoLoRA's state (no collective): the common part (config, inputs, counters, budget)
        and the per-input state of the inputs it owns (C_pre, the C_task EMA, the current window, the solver's
        last good projector and report). ``merge_state_parts`` of every rank's part is the whole state, which
        any world size can load; at world size 1 the part is the whole. Like ``nn.Module.state_dict``, CPU
        tensors are the live ones, not copies (save before training on; at 70B a copy would be gigabytes)."""
        return {"version": STATE_VERSION, "part": (comm.rank(self.group), comm.world_size(self.group)),
                "tensor_parallel": self.layout.tp_size,
                "config": self.config.to_dict(), "dims": dict(self.dims), "members": self.collector.members(),
                "optimizer_steps": self.optimizer_steps, "task_forwards": self.task_forwards,
                "statistics_schedule": [self.statistics_schedule.tokens, self.statistics_schedule.every],
                "refreshes": self.refreshes,
                "budget": None if self.budget is None else {**self.budget.state_dict(),
                                                            "base_energies": dict(self._base_energies)},
                **save_owned_statistics(self.pre_covariances, self.task_ema, self.collector.sums("task")),
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
        self.pre_covariances, self.task_ema, window = load_owned_statistics(state, mine, self._device,
                                                                            self.config.ema_decay)
        self.solver.load_state_dict(state["solver"], mine)
        self.owned_projectors = {key: self.solver.projector(key).to(self._device, torch.float32) for key in mine}
        self.collector.reset("task")
        for key, sums in window.items():  # the current window re-enters at its (new) owner
            self.collector.add_sums("task", key, sums)
        self.optimizer_steps = int(state["optimizer_steps"])
        self.refreshes = int(state["refreshes"])
        self.task_forwards = int(state["task_forwards"])
        if "statistics_schedule" in state:  # saved since statistics_flops_share; before it, the configured one
            self.statistics_schedule = StatisticsSchedule(*state["statistics_schedule"])
        if self.budget is not None:
            self.budget.load_state_dict(state["budget"])
            self._base_energies = {name: float(v) for name, v in state["budget"]["base_energies"].items()}

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise ValueError unless ``state`` fits this controller (``state.check_state_fits``); cheap, so a resume
        can check before any engine or weights exist."""
        check_state_fits(state, self.config, set(self.layers), has_budget=self.budget is not None,
                         tensor_parallel=self.layout.tp_size)

    def save_checkpoint(self, directory: str | Path, tag: str | None = None) -> Path:
        """Collective: the engine's checkpoint plus FoLoRA's state (``folora_ds.controller.checkpoint``); returns
        the tag folder. Needs an engine; in a plain loop save ``state_dict()`` with the model's and the optimizer's."""
        if self.engine is None:
            raise RuntimeError("save_checkpoint needs a DeepSpeed engine; in a plain loop save state_dict(), the "
                               "model's and the optimizer's state dicts")
        return save_checkpoint(self.engine, self.state_dict(), directory, tag)

    def export_adapter(self, directory: str | Path) -> None:
        """Collective: write a standard peft adapter directory (rank 0 writes; every rank waits for it).
        ZeRO-3-partitioned adapter weights are gathered for it; the folder appears complete or not at all. A
        tensor-parallel model's is its unsharded twin's adapter, the TP shards joined (``export``)."""
        export_adapter(self.model, self.layers, self.layout, Path(directory), self.group)

    def remove(self) -> None:
        """Remove the statistics hooks from the model."""
        self.collector.remove()

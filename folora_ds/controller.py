"""``FoLoRAController``: statistics → solves → projectors → gated optimizer, in one process.

The controller owns the FoLoRA state of a run: the covariance collector on the peft model, the EMA of C_task,
the spectral solver (with its failure policy) and the mapping from input keys to LoRA-A parameters. It talks to
the optimizer only through ``GatedAdamW.set_projector``.

Life cycle::

    controller = FoLoRAController(peft_model, config)
    controller.calibrate(proxy_batches, task_batches)    # C_pre, C_task
    controller.solve()                                   # bases + gates per input
    controller.initialize_lora_a()                       # projected init (config.init == "projected")
    optimizer = GatedAdamW(folora_param_groups(peft_model), ...)
    controller.attach_optimizer(optimizer)               # installs projectors on every LoRA-A
    for batch in loader:
        with controller.track_task(batch):               # C_task keeps being collected (EMA across windows)
            loss = peft_model(**batch).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        controller.after_optimizer_step()                # re-solves every ``refresh_interval`` steps
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from folora_ds.budget import adapter_penalty, base_energy, budget_from_config
from folora_ds.config import FoLoRAConfig
from folora_ds.optim import GatedAdamW
from folora_ds.peft_utils import base_weight_matrix, lora_a_weight, lora_b_weight, lora_layers, lora_scaling
from folora_ds.spectral import Projector, SolveReport, SpectralSolver, project_rows
from folora_ds.stats import CovarianceCollector, CovarianceEMA


@dataclass(frozen=True)
class LayerSummary:
    """What the gate does to one input key (shared by its member modules).

    Attributes:
        key: input key (first member's module name).
        members: LoRA modules fed by this input.
        dim: input dimension d.
        effective_rank: Σ g over all d directions.
        attenuated: directions with g < 0.5.
        tau: absolute τ used.
        solve_failures: consecutive failed re-solves at the end of the run.
    """

    key: str
    members: tuple[str, ...]
    dim: int
    effective_rank: float
    attenuated: int
    tau: float
    solve_failures: int


class FoLoRAController:
    """Owns FoLoRA's statistics, bases and projector delivery for one peft model in one process."""

    def __init__(self, model: nn.Module, config: FoLoRAConfig) -> None:
        self.model = model
        self.config = config
        self.layers = lora_layers(model)
        self.collector = CovarianceCollector(model, dtype=getattr(torch, config.statistics_dtype))
        self.task_ema = CovarianceEMA(config.ema_decay)
        self.solver = SpectralSolver(config)
        self.projectors: dict[str, Projector] = {}
        self.optimizer: GatedAdamW | None = None
        self.optimizer_steps = 0
        self.refreshes = 0
        self._pre_covariances: dict[str, torch.Tensor] = {}
        self.budget = budget_from_config(config)
        self._base_energy = 0.0

    # ------------------------------------------------------------------ statistics
    def _run_batches(self, source: str, batches: Iterable[Mapping[str, torch.Tensor]], description: str,
                     progress: bool) -> int:
        was_training = self.model.training
        self.model.eval()
        count = 0
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for batch in tqdm(batches, desc=description, disable=not progress, leave=False):
                batch = {name: tensor.to(device) for name, tensor in batch.items()}
                use_labels = source == "task" and self.config.task_token_mask == "labels"
                with self.collector.collect(source, attention_mask=batch.get("attention_mask"),
                                            labels=batch.get("labels") if use_labels else None):
                    self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
                count += 1
        self.model.train(was_training)
        return count

    def calibrate(self, proxy_batches: Iterable[Mapping[str, torch.Tensor]],
                  task_batches: Iterable[Mapping[str, torch.Tensor]], *, progress: bool = False) -> None:
        """Collect C_pre over the proxy batches and the initial C_task over the task batches.

        Raises:
            ValueError: a calibration set is empty, or an input received zero unmasked tokens.
        """
        self.collector.reset("pre")
        self.collector.reset("task")
        if self._run_batches("pre", proxy_batches, "proxy statistics", progress) == 0:
            raise ValueError("the proxy calibration set produced no batches")
        if self._run_batches("task", task_batches, "task statistics", progress) == 0:
            raise ValueError("the task calibration set produced no batches")
        self._pre_covariances = {key: self.collector.covariance("pre", key) for key in self.collector.keys()}
        if self.budget is not None:
            self._base_energy = sum(float(base_energy(base_weight_matrix(layer), self._pre_covariances[
                self.collector.key_of(name)])) for name, layer in self.layers.items())
        self._fold_task_window()

    def _fold_task_window(self) -> None:
        """Fold the task sums collected since the last window into the C_task EMA and start a new window."""
        sums = self.collector.sums("task")
        missing = [key for key in self.collector.keys() if key not in sums]
        if missing:
            raise RuntimeError(f"no task statistics reached {missing[0]!r} (and {len(missing) - 1} more inputs) since "
                               "the last refresh; run the training forward inside controller.track_task(batch)")
        for key in self.collector.keys():
            self.task_ema.update(key, self.collector.covariance("task", key))
        self.collector.reset("task")

    def pre_covariance(self, key: str) -> torch.Tensor:
        """C_pre (d, d) of one input key."""
        return self._pre_covariances[key]

    @contextlib.contextmanager
    def track_task(self, batch: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Count the training forward run inside this context towards the running C_task."""
        use_labels = self.config.task_token_mask == "labels"
        with self.collector.collect("task", attention_mask=batch.get("attention_mask"),
                                    labels=batch.get("labels") if use_labels else None):
            yield

    # ------------------------------------------------------------------ bases
    def solve(self, *, progress: bool = False) -> dict[str, SolveReport]:
        """Solve every input key from the current C_task EMA and C_pre; returns the reports."""
        if not self._pre_covariances:
            raise RuntimeError("solve() before calibrate(): no statistics")
        reports = {}
        for key in tqdm(self.collector.keys(), desc="generalized eigensolves", disable=not progress, leave=False):
            projector, report = self.solver.solve(key, self.task_ema[key], self._pre_covariances[key],
                                                  tau_scale=1.0 if self.budget is None else self.budget.tau_scale)
            self.projectors[key] = projector.to(dtype=torch.float32)
            reports[key] = report
        return reports

    def initialize_lora_a(self) -> None:
        """Projected init: rows of every LoRA-A are gated by their input's P_g and renormalised (config.init)."""
        if self.config.init != "projected":
            return
        with torch.no_grad():
            for name, layer in self.layers.items():
                weight = lora_a_weight(layer)
                projector = self.projectors[self.collector.key_of(name)].to(weight.device, weight.dtype)
                weight.copy_(project_rows(weight, projector))

    def attach_optimizer(self, optimizer: GatedAdamW) -> None:
        """Install the current projectors on every LoRA-A parameter of ``optimizer``."""
        self.optimizer = optimizer
        self._deliver()

    def _deliver(self) -> None:
        for name, layer in self.layers.items():
            self.optimizer.set_projector(lora_a_weight(layer), self.projectors[self.collector.key_of(name)])

    def after_optimizer_step(self) -> bool:
        """Call once per optimizer step; re-solves and re-delivers every ``refresh_interval`` steps.

        Returns:
            Whether a refresh ran.
        """
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

    # ------------------------------------------------------------------ reporting
    def layer_summaries(self) -> list[LayerSummary]:
        """Per input key: effective rank Σg, attenuated directions, τ and failure count."""
        members = self.collector.members()
        summaries = []
        for key, report in self.solver.reports.items():
            summaries.append(LayerSummary(
                key=key, members=tuple(members[key]), dim=report.gates.numel(),
                effective_rank=float(report.gates.sum()), attenuated=int((report.gates < 0.5).sum()),
                tau=report.tau, solve_failures=report.consecutive_failures))
        return summaries

    def forgetting_penalty(self) -> dict[str, float]:
        """tr(ΔW C_pre ΔWᵀ) per LoRA module with ΔW = s·B·A (LoRA starts with B = 0, so ΔW is the adapter)."""
        with torch.no_grad():
            return {name: float(adapter_penalty(lora_a_weight(layer), lora_b_weight(layer), lora_scaling(layer),
                                                self._pre_covariances[self.collector.key_of(name)]))
                    for name, layer in self.layers.items()}

    def measured_forgetting(self) -> float:
        """The relative forgetting F = Σ tr(ΔW C_pre ΔWᵀ) / Σ tr(W C_pre Wᵀ) that the budget holds down."""
        if self._base_energy <= 0:
            raise RuntimeError("measured_forgetting needs a forgetting_budget and calibrate() first")
        return sum(self.forgetting_penalty().values()) / self._base_energy

    def remove(self) -> None:
        """Remove the statistics hooks from the model."""
        self.collector.remove()


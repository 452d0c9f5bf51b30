"""Running a grid: each run trained and measured the same way, cached and resumable (``folora-ds grid``).

Every (entry, lr, seed) of a spec (``folora_ds.toolkit.grid.spec``) is one training run through the product's own
path: ``folora_ds.initialize`` and ``GatedAdamW`` for FoLoRA, ``deepspeed.initialize`` with torch AdamW for the
others (``folora_ds.toolkit.methods``), a DeepSpeed world of one, the same batches in the same order for every
method with the same seed (``artifacts.TrainingData``). It saves an adapter at each of its ``steps`` and measures
each (``folora_ds.toolkit.evaluation``) plus the forgetting proxies on C_pre, against the artefacts the grid
computes once (``artifacts.SharedArtifacts``).

A run's folder (``<output>/runs/<slug>/``) is complete when every step's ``evaluation.json`` exists
(``rows.is_complete``); a finished run is never redone. Interrupt at any time and start again: training restarts
only for the run that was cut. Several workers may share one output folder: each claims a run
(``<output>/claims/<slug>.lock``) before training it and leaves the runs others hold to them.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from folora_ds.adapters.ds_config import prepare_ds_config
from folora_ds.adapters.engine import initialize
from folora_ds.common.files import claimed, read_json_file, write_json
from folora_ds.controller.proxy import calibration_batches, load_proxy_jsonl, read_chat_prompts
from folora_ds.distributed import comm
from folora_ds.method.budget import base_energy
from folora_ds.method.peft_layers import adapter_delta_weight, base_weight_matrix, lora_layers
from folora_ds.toolkit.evaluation import EvaluationSuite, measure_adapted
from folora_ds.toolkit.grid.artifacts import SharedArtifacts, TrainingData
from folora_ds.toolkit.grid.rows import collect_rows, is_complete
from folora_ds.toolkit.grid.spec import GridRun, GridSettings, GridSpec, changed_settings, resolved_settings
from folora_ds.toolkit.methods import (
    COVARIANCE_INITS,
    MUTATING_INITS,
    build_peft_model,
    save_initial_adapter,
    save_trained_adapter,
)
from folora_ds.training.data import load_task_dataset, record_to_messages
from folora_ds.training.run import train_steps

_log = logging.getLogger(__name__)


def run_grid(spec: GridSpec, output_dir: str | Path, *, progress: bool = True,
             only: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Train and measure every run of ``spec`` not already complete in ``output_dir``; returns every row.

    Args:
        only: run only entries with these labels (the rest are still reported when complete).

    Raises:
        ValueError: more than one process (the grid runs in a DeepSpeed world of one), or a bad spec.
    """
    output_dir = Path(output_dir)
    started_group = comm.init_distributed()
    try:
        if comm.world_size() != 1:
            raise ValueError("folora-ds grid runs in one process; launch it without deepspeed/torchrun")
        check_grid_inputs(spec.settings)  # before the proxy set, the base model and any recorded fingerprint
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(output_dir / "spec.json", {"settings": spec.settings.to_dict(),
                                              "runs": [run.identity(spec.settings) | {"label": run.label}
                                                       for run in spec.runs]})
        shared = SharedArtifacts(spec.settings, output_dir / "shared", progress=progress)
        shared.ensure_proxy()
        shared.base_evaluation()
        selected = [run for run in spec.runs if only is None or run.label in only]
        best = [entry for entry in spec.best if only is None or entry.label in only]
        todo = [run for run in selected
                if not is_complete(run, output_dir / "runs" / run.slug(spec.settings), spec.settings)]
        _log.info("%d of %d runs%s already complete; %d to go%s", len(selected) - len(todo), len(selected),
                  " selected by --only" if only else "", len(todo),
                  f" (+ {len(best)} entries at their best learning rate)" if best else "")
        held_elsewhere: list[GridRun] = []
        waiting = list(best)

        def run_best_entries(final: bool) -> None:
            """Run each "best" entry whose sweep is finished (as soon as it is: its seeds need not wait for
            unrelated entries); at the end, say which could not be decided."""
            for entry in list(waiting):
                unfinished = [run for run in spec.runs if run.label == entry.label
                              and not is_complete(run, output_dir / "runs" / run.slug(spec.settings))]
                if unfinished:  # its sweep, or part of it held by another worker, is still running
                    if final:
                        _log.info("%s: %d run(s) of its sweep are not finished; its best learning rate is chosen "
                                  "when they are (run the grid again)", entry.label, len(unfinished))
                    continue
                waiting.remove(entry)
                lr = entry.resolve(collect_rows(GridSpec(spec.settings, spec.runs), output_dir))
                if lr is None:
                    _log.info("%s: no finished run to choose its best learning rate from; skipped for now",
                              entry.label)
                    continue
                for run in entry.runs(lr):
                    if not is_complete(run, output_dir / "runs" / run.slug(spec.settings), spec.settings):
                        _log.info("%s at its best lr %g: seed %d, steps %s", run.label, lr, run.seed, list(run.steps))
                        if not _run_claimed(run, spec.settings, shared, output_dir, progress):
                            held_elsewhere.append(run)

        run_best_entries(final=False)
        for index, run in enumerate(todo, 1):
            _log.info("[%d/%d] %s: lr %g, seed %d, steps %s", index, len(todo), run.label, run.lr, run.seed,
                      list(run.steps))
            if not _run_claimed(run, spec.settings, shared, output_dir, progress):
                held_elsewhere.append(run)
            run_best_entries(final=False)
        run_best_entries(final=True)
        if held_elsewhere:
            _log.info("%d run(s) were being trained by another worker on this folder and are not in this report "
                      "yet: %s", len(held_elsewhere),
                      "; ".join(f"{run.label} lr {run.lr:g} seed {run.seed}" for run in held_elsewhere))
        return collect_rows(spec, output_dir)
    finally:
        if started_group:
            comm.shutdown()


def check_grid_inputs(settings: GridSettings) -> None:
    """Load and check every input file of the grid (task data and each record's shape, test records, retention
    questions, the proxy's prompts) before anything is sampled, measured or recorded, so a bad file costs seconds
    and leaves no fingerprint behind that would block the output folder once the file is fixed.

    Raises:
        ValueError / FileNotFoundError: naming the file and, where there is one, the record or line.
    """
    dataset = load_task_dataset(settings.data)
    for index, record in enumerate(dataset):
        record_to_messages(record, index=index)
    EvaluationSuite.load(settings.evaluation)
    if settings.proxy.prompts_path is not None:
        read_chat_prompts(settings.proxy.prompts_path)


def _run_claimed(run: GridRun, settings: GridSettings, shared: SharedArtifacts, output_dir: Path,
                 progress: bool) -> bool:
    """``_run_one`` under the run's claim (``<output>/claims/<slug>.lock``), so several workers can share one grid
    folder: a run another worker holds is left to it (returns False); one it finished while this worker waited
    for its turn is not redone."""
    slug = run.slug(settings)
    with claimed(output_dir / "claims" / f"{slug}.lock") as held:
        if not held:
            _log.info("held by another worker on this folder; moving on")
            return False
        if not is_complete(run, output_dir / "runs" / slug, settings):
            _run_one(run, settings, shared, output_dir, progress)
    return True


def _run_one(run: GridRun, settings: GridSettings, shared: SharedArtifacts, output_dir: Path, progress: bool) -> None:
    """Train ``run`` unless its adapters exist (a stale run is removed first), then measure every missing step."""
    directory = output_dir / "runs" / run.slug(settings)
    train_path = directory / "train.json"
    if train_path.is_file() and changed_settings(read_json_file(train_path, what="grid run record").get("resolved")
                                                 or {}, resolved_settings(run, settings)):
        shutil.rmtree(directory)
    if not train_path.is_file() or not all((directory / f"step{s}" / "adapter").is_dir() for s in run.steps):
        record = train_run(run, shared, directory, progress=progress)
        write_json(train_path, record)
        _log.info("trained in %.0f s", record["train_seconds"])
    for steps in run.steps:
        path = directory / f"step{steps}" / "evaluation.json"
        if not path.is_file():
            result = evaluate_checkpoint(directory / f"step{steps}" / "adapter", shared, run.seed, progress=progress)
            write_json(path, result)
            _log.info("step %d: target accuracy %.1f%%, retention %.1f%%, KL %.4f (%.0f s)", steps,
                      100 * result["target_accuracy"], 100 * result["retention"], result["kl_per_token"],
                      result["seconds"])


def _ds_config(settings: GridSettings, lr: float) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": settings.batch_size, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 0}, "optimizer": {"type": "AdamW", "params": {"lr": lr,
                                                                                         "weight_decay": 0.0}}}


def train_run(run: GridRun, shared: SharedArtifacts, directory: Path, *, progress: bool) -> dict[str, Any]:
    """Train ``run``, saving ``step<N>/adapter`` at each of its steps; returns what ``train.json`` records."""
    import deepspeed
    from peft import get_peft_model

    started = time.perf_counter()
    settings = shared.settings
    data = TrainingData(settings, run.seed, steps=max(run.steps))
    folora = shared.folora_config(run.knobs)
    record: dict[str, Any] = {"run": run.identity(settings) | {"label": run.label},
                              "resolved": resolved_settings(run, settings)}
    samples = load_proxy_jsonl(shared.proxy_path, tokenizer=data.tokenizer, max_length=folora.max_seq_len)
    if run.proxy_sequences is not None:
        if run.proxy_sequences > len(samples):
            raise ValueError(f"run {run.label!r}: proxy_sequences={run.proxy_sequences} exceeds the shared proxy "
                             f"set's {len(samples)} sequences ({shared.proxy_path})")
        samples = samples[:run.proxy_sequences]
    record["proxy_sequences"] = len(samples)  # the proxy set FoLoRA calibrates on (CorDA: its knowledge data)
    if run.method == "folora":
        model = get_peft_model(data.model, data.lora_config("lora"))
        prepared = prepare_ds_config({**_ds_config(settings, run.lr), "folora": folora.to_dict()})
        engine, controller = initialize(model, prepared, proxy_batches=calibration_batches(samples, data.tokenizer,
                                                                                            folora),
                                        task_batches=data.calibration_batches(), progress=progress)
        controller.set_total_steps(max(run.steps))  # no statistics for a last window that no refresh reads
    else:
        covariances = shared.module_covariances(run.seed) if run.method in COVARIANCE_INITS else None
        torch.manual_seed(run.seed)
        model = build_peft_model(data.model, run.method, data.lora_config(run.method),
                                 knowledge_sequences=[s.token_ids for s in samples], covariances=covariances,
                                 sc_lora_beta=settings.sc_lora_beta)
        initial = directory / "initial_adapter"
        if run.method in MUTATING_INITS:
            save_initial_adapter(model, run.method, initial)
        prepared = prepare_ds_config({**_ds_config(settings, run.lr), "folora": {}})
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      **prepared.optimizer_arguments)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=prepared.ds_config)
        controller = None
    record["setup_seconds"] = time.perf_counter() - started
    losses: list[float] = []
    done = 0
    for checkpoint in run.steps:
        losses += train_steps(engine, lambda step, offset=done: data.batches(step + offset), checkpoint - done,
                              controller=controller, description=f"{run.label} lr {run.lr:g} seed {run.seed}",
                              progress=progress)
        done = checkpoint
        target = directory / f"step{checkpoint}" / "adapter"
        if controller is not None:
            controller.check_gating()  # every optimizer step so far went through the gate
            controller.export_adapter(target)
        else:
            save_trained_adapter(model, run.method, target, initial if run.method in MUTATING_INITS else None)
    record["train_losses"] = losses
    if controller is not None:
        record["gated_steps"] = controller.gated_step_counts()
        record["optimizer_steps"] = controller.optimizer_steps
        record["refreshes"] = controller.refreshes
        record["layers"] = [asdict(layer) for layer in controller.layer_summaries()]
        record["tau_scale"] = None if controller.budget is None else controller.budget.tau_scale
        controller.remove()
    engine.destroy()
    del engine, model
    record["train_seconds"] = time.perf_counter() - started
    comm.barrier()
    return record


def evaluate_checkpoint(adapter: Path, shared: SharedArtifacts, seed: int, *, progress: bool) -> dict[str, Any]:
    """Measure one saved adapter on the untouched base model: ``evaluation.measure_adapted`` plus, per LoRA
    module, the forgetting proxy tr(ΔW C_pre ΔWᵀ) and the module's base energy tr(W C_pre Wᵀ)."""
    base = shared.base_evaluation()
    with shared.adapted(adapter) as (model, tokenizer):
        result = measure_adapted(model, tokenizer, shared.suite(), base["correct"], progress=progress,
                                 base_cache=shared.base_logits, base_legacy_correct=base.get("legacy_correct"))
        result.update(forgetting_proxies(model, shared.module_covariances(seed)))
    return result


@torch.no_grad()
def forgetting_proxies(peft_model, covariances: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Per LoRA module of ``peft_model``: ``penalty`` tr(ΔW C_pre ΔWᵀ) of the adapter's ΔW (d_out, d_in) and
    ``base_energy`` tr(W C_pre Wᵀ), with C_pre (d_in, d_in) from ``covariances`` (module name → (C_pre, C_task),
    names as peft gives them).

    Raises:
        KeyError: a LoRA module without covariances (another model or target list than the statistics').
    """
    penalty, energy = {}, {}
    for name, layer in lora_layers(peft_model).items():
        if name not in covariances:
            raise KeyError(f"no calibration covariance for LoRA module {name!r}")
        c_pre = covariances[name][0].double()
        delta = adapter_delta_weight(layer).double()
        penalty[name] = float(torch.einsum("oi,ij,oj->", delta, c_pre, delta))
        energy[name] = float(base_energy(base_weight_matrix(layer).double(), c_pre))
    return {"penalty_by_module": penalty, "base_energy_by_module": energy}

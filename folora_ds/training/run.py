"""The one training run: model → task data → proxy set → peft → FoLoRA under DeepSpeed (and plain AdamW to compare).

The same function runs in one plain process (a DeepSpeed world of one) and on every rank of a launch
(``deepspeed``/``torchrun``/``mpirun launch/train.py``). Everything the DeepSpeed config says is honoured by the
engine or refused by name before the model is loaded (``folora_ds.adapters.ds_config``).

Both runs start from the same LoRA weights (peft's Kaiming A, B = 0; FoLoRA then projects A when
``init="projected"``), see the same global batches in the same order (rank r takes micro-batch slots r, r + world,
…), and use the same optimizer settings. The summary reports, per input, what the gate did (effective rank Σg,
attenuated directions) and, per run, the task losses and the relative forgetting F (mean over modules of
tr(ΔW C_pre ΔWᵀ) / tr(W C_pre Wᵀ), on the proxy statistics; ``budget.relative_forgetting``). Every output file
appears only when complete.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from folora_ds.adapters.checkpoint import check_deepspeed_files, load_engine_checkpoint
from folora_ds.adapters.ds_config import prepare_ds_config, resolve_batch_sizes
from folora_ds.adapters.engine import initialize
from folora_ds.common.checks import require_int
from folora_ds.common.files import read_json_file, write_json
from folora_ds.common.plots import plot_gates
from folora_ds.controller.export import save_adapter
from folora_ds.controller.proxy import calibration_batches, proxy_samples_for_this_rank, save_proxy_jsonl
from folora_ds.distributed import comm
from folora_ds.distributed.phases import phase
from folora_ds.method.budget import relative_forgetting
from folora_ds.method.config import FoLoRAConfig
from folora_ds.training.data import DEFAULT_TASK_FILE, TaskCollator, build_task_dataset, split_train_eval
from folora_ds.training.interrupts import RunInterrupted, StopSignals, signal_name
from folora_ds.training.models import TINY_MODEL_NAME, load_model
from folora_ds.training.outputs import KeptRun, OutputDirectoryError, previous_run_kept, refuse_other_runs
from folora_ds.training.run_checkpoints import CHECKPOINTS_DIR, RunCheckpoints
from folora_ds.training.summary import engine_settings

DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}}, "folora": {}}
"""The DeepSpeed config of a run given none: one process, ZeRO-0, fp32, micro-batch 8, AdamW lr 1e-3."""

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class RunSettings:
    """What to train on and where to write; batch sizes, optimizer and FoLoRA knobs live in the DeepSpeed config.

    Attributes:
        model: "tiny-llama" (built from a config) or a local Hugging Face model directory.
        data: task data file or saved ``datasets`` directory (prompt/response or chat messages).
        output_dir: where the proxy set, adapters and ``summary.json`` go.
        steps: optimizer steps per run.
        eval_fraction: share of the task data held out for the eval loss.
        calibration_steps: the first optimizer steps' batches, used for the initial C_task.
        seed: seed of the model init, LoRA init, data order and proxy sampling offset.
        baseline: also train plain AdamW for the comparison.
        overwrite: replace the content of a non-empty ``output_dir`` (refused otherwise).
        progress: show progress bars (rank 0).
        collective_timeout_seconds: every collective fails after this long when a rank dies or hangs.
        save_every: checkpoint both runs every this many optimizer steps into ``output_dir/checkpoints`` (and
            when SIGTERM/SIGINT stops the run); 0: no checkpoints, a signal stops the run at once.
        resume: continue the checkpointed run in ``output_dir`` (start it when the directory is empty or absent,
            so a requeued job runs the same command; print the summary when it already finished).
    """

    model: str = TINY_MODEL_NAME
    data: str = str(DEFAULT_TASK_FILE)
    output_dir: str = "runs/folora-default"
    steps: int = 60
    eval_fraction: float = 0.1
    calibration_steps: int = 8
    seed: int = 0
    baseline: bool = True
    overwrite: bool = False
    progress: bool = True
    collective_timeout_seconds: float = 600.0
    save_every: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "calibration_steps"):
            require_int(name, getattr(self, name), where="run settings: ")
        require_int("--save-every", self.save_every, minimum=0)
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --output-dir and --overwrite replaces it; pass one")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"run settings: eval_fraction={self.eval_fraction!r} must be in (0, 1)")
        if not (math.isfinite(self.collective_timeout_seconds) and self.collective_timeout_seconds > 0):
            raise ValueError(f"--collective-timeout {self.collective_timeout_seconds!r} must be > 0 seconds")


def batch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Example indices of every global step: reshuffled each epoch with a seeded generator (same for both runs)."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(num_examples, generator=generator).tolist())
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def rank_micro_batches(step_indices: list[int], micro: int, accumulation: int, rank: int, world: int
                       ) -> list[list[int]]:
    """This rank's micro-batches of one global step: slot m·world + rank of each accumulation step m."""
    return [step_indices[(m * world + rank) * micro:(m * world + rank + 1) * micro] for m in range(accumulation)]


def train_steps(engine, batches: Callable[[int], Iterator[dict]], steps: int, *, controller, description: str,
                progress: bool, first: int = 0,
                after_step: Callable[[int, torch.Tensor], None] | None = None) -> list[float]:
    """Train optimizer steps ``first`` … ``steps - 1``; returns each one's mean micro-batch loss over all ranks
    (collective). ``after_step(done, losses)`` runs after each step with the steps done so far and this rank's
    loss sums of this call's steps (the checkpoint hook)."""
    engine.train()
    losses = torch.zeros(steps - first, dtype=torch.float64, device=engine.device)
    for step in tqdm(range(first, steps), desc=description, disable=not progress, initial=first, total=steps):
        micro_batches = list(batches(step))
        with phase(f"{description}: training step {step + 1}"):  # a rank that stops answering is named
            for batch in micro_batches:
                batch = {name: tensor.to(engine.device) for name, tensor in batch.items()}
                with controller.track_task(batch) if controller is not None else contextlib.nullcontext():
                    loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()
                if controller is not None:
                    controller.after_step()
                losses[step - first] += loss.detach().double() / len(micro_batches)  # no host sync per micro-batch
        if after_step is not None:
            after_step(step + 1, losses)
    return (comm.all_reduce_sum(losses) / comm.world_size()).tolist()


@torch.no_grad()
def _eval_loss(engine, dataset, collate: TaskCollator, batch_size: int) -> float:
    """Token-mean cross-entropy over the response tokens of ``dataset`` (collective: ranks evaluate interleaved
    shares and sum; every rank runs the same number of forwards, as ZeRO-3 needs)."""
    rank, world = comm.rank(), comm.world_size()
    mine = list(range(rank, len(dataset), world))
    forwards = math.ceil(math.ceil(len(dataset) / world) / batch_size)
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)
    for index in range(forwards):
        indices = mine[index * batch_size:(index + 1) * batch_size]
        batch = {name: tensor.to(engine.device) for name, tensor in collate([dataset[i] for i in (indices or [0])]
                                                                             ).items()}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if not indices:  # a rank with no example left still joins the forward
            continue
        labels = batch["labels"][:, 1:]
        totals[0] += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                             ignore_index=-100, reduction="sum"))
        totals[1] += float((labels != -100).sum())
    engine.train()
    comm.all_reduce_sum(totals)
    return float(totals[0] / totals[1])


def check_targets(model: torch.nn.Module, targets: list[str] | str, name: str) -> None:
    """Raise ValueError naming the ``target_modules`` that match no linear layer of ``model`` (peft's rule: the
    module's name, or its last dotted parts, equals the target), with the names that would; "all-linear" passes."""
    if isinstance(targets, str):
        return
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    linear = sorted({module_name.rsplit(".", 1)[-1] for module_name, module in model.named_modules()
                     if isinstance(module, (torch.nn.Linear, Conv1D))})
    names = [module_name for module_name, _ in model.named_modules()]
    missing = [target for target in targets
               if not any(module_name == target or module_name.endswith("." + target) for module_name in names)]
    if missing:
        raise ValueError(f"target_modules {missing} match no module of {name!r}; its linear layers are named "
                         f"{', '.join(linear[:12])}")


def _peft_model(name: str, folora: FoLoRAConfig, seed: int):
    """The base model on this rank's accelerator, its tokenizer, and the LoRA config of ``folora.target_modules``
    (``torch.manual_seed(seed)`` is set last, so ``get_peft_model`` draws the same LoRA init for the same seed)."""
    from deepspeed.accelerator import get_accelerator

    model, tokenizer = load_model(name, seed=seed)
    targets = folora.target_modules if isinstance(folora.target_modules, str) else list(folora.target_modules)
    check_targets(model, targets, name)  # before minutes of proxy sampling, not after
    model.to(get_accelerator().current_device_name())
    torch.manual_seed(seed)
    return model, tokenizer, LoraConfig(r=folora.lora_rank, lora_alpha=folora.lora_alpha,
                                        lora_dropout=folora.lora_dropout, target_modules=targets)


def _with_lora(model: torch.nn.Module, lora: LoraConfig):
    """``get_peft_model`` without the FutureWarning peft 0.21 triggers in transformers 5 by probing the deprecated
    ``is_gradient_checkpointing`` (two lines of noise in every run, nothing the user can act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def run(settings: RunSettings, ds_config: Mapping[str, Any] | str | Path) -> dict | None:
    """Train FoLoRA (and plain AdamW unless ``settings.baseline`` is False) on every rank; returns the summary on
    rank 0 (None elsewhere), which is also written to ``output_dir/summary.json``.

    Raises:
        ValueError / KeyError / FileNotFoundError: a bad config, batch sizes, output directory, model or data —
            each named, and the config ones before any model is loaded; a resume whose settings differ.
        RunInterrupted: SIGTERM/SIGINT stopped the run (after saving a checkpoint when ``save_every`` is set).
    """
    started = time.perf_counter()
    prepared = prepare_ds_config(ds_config)
    output_dir = Path(settings.output_dir)
    checkpoints = RunCheckpoints(output_dir / CHECKPOINTS_DIR, every=settings.save_every)
    finished = settings.resume and (output_dir / "summary.json").is_file()
    resuming = settings.resume and not finished and checkpoints.started()
    if settings.resume and not finished and not resuming and output_dir.is_dir() and any(output_dir.iterdir()):
        raise OutputDirectoryError(f"--resume: {str(output_dir)!r} holds no checkpointed run ({CHECKPOINTS_DIR}/"
                                   "run.json is missing: was it started with --save-every?)")
    if not (finished or resuming):
        refuse_other_runs(output_dir, overwrite=settings.overwrite,
                          inputs=(settings.data, prepared.folora.proxy.path))
    started_group = comm.init_distributed(timeout_seconds=settings.collective_timeout_seconds)
    try:
        resolve_batch_sizes(prepared.ds_config, comm.world_size())  # needs the world size; before any file moves
        comm.barrier()  # every rank has looked at the output directory before rank 0 changes it
        if finished:  # a requeued job whose run had finished: nothing to do
            logger.info("the run in %s already finished; its summary is printed again", output_dir)
            if comm.rank() == 0:
                checkpoints.remove()  # left by a kill between the summary and their removal
            return read_json_file(output_dir / "summary.json", what="run summary") if comm.rank() == 0 else None
        identity = _run_identity(settings, prepared, comm.world_size())
        if resuming:
            checkpoints.check_identity(identity)
        kept = KeptRun(None)
        try:
            with StopSignals() as signals, previous_run_kept(output_dir, active=comm.rank() == 0 and not resuming
                                                             ) as kept:  # --overwrite: deleted once it finished
                session = _Session(checkpoints=checkpoints, identity=identity, resuming=resuming, signals=signals,
                                   kept=kept)
                return _run(settings, prepared, output_dir, started, session)
        except RunInterrupted as stopped:
            if stopped.checkpointed:
                raise
            left = ("its last checkpoint is kept: run the same command with --resume to continue"
                    if kept.committed or resuming else "nothing was saved and its partial outputs were removed"
                    + ("" if settings.save_every else " (--save-every N makes a run resumable)"))
            raise RunInterrupted(f"{stopped} before a checkpoint could be taken; {left}", stopped.signal_number
                                 ) from None
    finally:
        if started_group:
            comm.shutdown()


@dataclass(frozen=True)
class _Session:
    """What a run knows about checkpoints and stop signals (``run`` builds it)."""

    checkpoints: RunCheckpoints
    identity: dict[str, Any]
    resuming: bool
    signals: StopSignals
    kept: KeptRun

    def deferring(self):
        """While training a checkpointed run, a stop signal waits for the step's end (then a checkpoint)."""
        return self.signals.deferred() if self.checkpoints.every else contextlib.nullcontext()

    def hook(self, run: str, label: str, steps: int, first: int, previous: list[float], extra: Mapping[str, Any],
             save_engine: Callable[[Path, str], Any], device, *, final: bool):
        """``train_steps``' ``after_step``: checkpoint ``run`` every ``checkpoints.every`` steps (and after the
        last one when ``final``) and when a stop signal arrived — then raise ``RunInterrupted``; None when the
        run is not checkpointed."""
        every = self.checkpoints.every
        if not every:
            return None

        def after_step(done: int, losses: torch.Tensor) -> None:
            stop = self.signals.stop_requested(device)
            if done % every and not stop and not (final and done == steps):
                return
            recorded = previous + (comm.all_reduce_sum(losses[:done - first].clone()) / comm.world_size()).tolist()
            folder = self.checkpoints.save(run, done, recorded, extra, save_engine)
            self.kept.commit()  # from now on this run is the one the directory keeps
            if stop:
                raise RunInterrupted(f"stopped by {signal_name(stop)} after {label} step {done} of {steps}; "
                                     f"checkpoint {str(folder)!r}; run the same command with --resume to continue",
                                     stop, checkpointed=True)
        return after_step


def _run_identity(settings: RunSettings, prepared, world: int) -> dict[str, Any]:
    """What a resumed run must share with the run it continues (not the output flags, timeout or save rate)."""
    def where(name: str) -> str:
        return str(Path(name).resolve()) if Path(name).exists() else name

    fixed = {"model": where(settings.model), "data": where(settings.data), "steps": settings.steps,
             "eval_fraction": settings.eval_fraction, "calibration_steps": settings.calibration_steps,
             "seed": settings.seed, "baseline": settings.baseline}
    return {"settings": fixed, "ds_config": prepared.ds_config, "optimizer": prepared.optimizer_arguments,
            "folora": prepared.folora.to_dict(), "world_size": world}


def _run(settings: RunSettings, prepared, output_dir: Path, started: float, session: _Session) -> dict | None:
    import datasets
    import deepspeed
    import transformers

    folora = prepared.folora
    rank, world = comm.rank(), comm.world_size()
    micro, accumulation = resolve_batch_sizes(prepared.ds_config, world)
    progress = settings.progress and rank == 0
    if not progress:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    checkpoints = session.checkpoints
    if checkpoints.every and not session.resuming and rank == 0:
        checkpoints.start(session.identity)
    comm.barrier()  # rank 0 has emptied the output directory
    folora_done = checkpoints.folora_result() if session.resuming else None
    folora_folder = checkpoints.latest("folora") if session.resuming else None

    model, tokenizer, lora = _peft_model(settings.model, folora, settings.seed)
    dataset = build_task_dataset(settings.data, tokenizer, max_length=folora.max_seq_len)
    train_set, eval_set = split_train_eval(dataset, eval_fraction=settings.eval_fraction, seed=settings.seed)
    collate = TaskCollator(pad_token_id=tokenizer.pad_token_id)
    if folora_folder is None:
        samples = proxy_samples_for_this_rank(model, tokenizer, folora, progress=progress)  # the base model's text
        all_samples = sorted((s for share in comm.all_gather_objects(samples) for s in share), key=lambda s: s.index)
        if rank == 0 and folora.proxy.path is None:
            save_proxy_jsonl(all_samples, output_dir / "proxy.jsonl", folora.proxy)
    model = _with_lora(model, lora)

    order = batch_order(len(train_set), micro * accumulation * world, settings.steps, settings.seed)

    def batches(step: int) -> Iterator[dict]:
        for indices in rank_micro_batches(order[step], micro, accumulation, rank, world):
            yield collate([train_set[i] for i in indices])

    if folora_folder is None:
        calibration = [batch for step in range(min(settings.calibration_steps, settings.steps))
                       for batch in batches(step)]
        engine, controller = initialize(model, prepared, proxy_batches=calibration_batches(samples, tokenizer, folora),
                                        task_batches=calibration, progress=progress)
        start = {"step": 0, "losses": [], "base_eval_loss": _eval_loss(engine, eval_set, collate, micro),
                 "proxy_sequences": len(all_samples), "train_examples": len(train_set)}
    else:
        logger.info("resuming FoLoRA from %s", folora_folder)
        engine, controller = initialize(model, prepared, resume_from=folora_folder.parent, tag=folora_folder.name)
        start = checkpoints.progress(folora_folder)
        if start["train_examples"] != len(train_set):
            raise ValueError(f"--resume: the task data {settings.data!r} now gives {len(train_set)} training "
                             f"examples, the checkpointed run had {start['train_examples']}; the data changed")
        checkpoints.restore_random_state(folora_folder)
    controller.set_total_steps(settings.steps)  # the last window's statistics would gate no step: not collected
    settings_read = engine_settings(engine, controller.optimizer, prepared.ds_config)
    if folora_done is None:
        label = f"FoLoRA, ZeRO-{prepared.stage} ×{world}"
        extra = {key: start[key] for key in ("base_eval_loss", "proxy_sequences", "train_examples")}
        hook = session.hook("folora", "FoLoRA", settings.steps, start["step"], start["losses"], extra,
                            controller.save_checkpoint, engine.device, final=True)  # the comparison needs it
        with session.deferring():
            losses = start["losses"] + train_steps(engine, batches, settings.steps, controller=controller,
                                                   description=label, progress=progress, first=start["step"],
                                                   after_step=hook)
        controller.check_gating()  # on every rank: one that skipped the gate stops all
        result = {"train_losses": losses, "train_loss_last10": _mean_last(losses),
                  "eval_loss": _eval_loss(engine, eval_set, collate, micro),
                  "penalty_by_module": controller.forgetting_penalty(),
                  "relative_forgetting": controller.measured_forgetting(), "refreshes": controller.refreshes,
                  "gated_steps_per_rank": comm.all_gather_objects(controller.gated_step_counts()),
                  "tau_scale": None if controller.budget is None else controller.budget.tau_scale}
        folora_done = {**extra, "result": result, "base_energies": controller.base_energies(),
                       "layers": [asdict(layer) for layer in controller.layer_summaries()],
                       "optimizer_steps": controller.optimizer_steps}
        controller.export_adapter(output_dir / "folora_adapter")
        if checkpoints.every and rank == 0:
            checkpoints.finish_folora(folora_done)
    controller.remove()
    engine.destroy()

    baseline, resumed_adamw = None, None
    if settings.baseline:
        plain_model, _, _ = _peft_model(settings.model, folora, settings.seed)
        plain_model = _with_lora(plain_model, lora)
        arguments = prepared.optimizer_arguments
        optimizer = torch.optim.AdamW([p for p in plain_model.parameters() if p.requires_grad], **arguments)
        plain_engine, _, _, _ = deepspeed.initialize(model=plain_model, optimizer=optimizer,
                                                     config=prepared.ds_config)
        first, previous = 0, []
        adamw_folder = checkpoints.latest("adamw") if session.resuming else None
        if adamw_folder is not None:
            logger.info("resuming plain LoRA (AdamW) from %s", adamw_folder)
            check_deepspeed_files(adamw_folder)
            load_engine_checkpoint(plain_engine, optimizer, adamw_folder)
            recorded = checkpoints.progress(adamw_folder)
            first, previous, resumed_adamw = recorded["step"], recorded["losses"], recorded["step"]
            checkpoints.restore_random_state(adamw_folder)

        def save_plain(directory: Path, tag: str) -> None:
            plain_engine.save_checkpoint(str(directory), tag=tag)

        hook = session.hook("adamw", "plain LoRA (AdamW)", settings.steps, first, previous, {}, save_plain,
                            plain_engine.device, final=False)
        with session.deferring():
            plain_losses = previous + train_steps(
                plain_engine, batches, settings.steps, controller=None, first=first, after_step=hook,
                description=f"plain LoRA (AdamW), ZeRO-{prepared.stage} ×{world}", progress=progress)
        baseline = {"train_losses": plain_losses, "train_loss_last10": _mean_last(plain_losses),
                    "eval_loss": _eval_loss(plain_engine, eval_set, collate, micro),
                    "penalty_by_module": controller.forgetting_penalty(plain_model)}
        baseline["relative_forgetting"] = relative_forgetting(baseline["penalty_by_module"],
                                                              folora_done["base_energies"])
        save_adapter(plain_model, output_dir / "adamw_adapter")
        plain_engine.destroy()
    if rank != 0:
        return None
    summary = {"settings": asdict(settings), "folora_config": folora.to_dict(), "world_size": world,
               "zero_stage": prepared.stage, **settings_read, "optimizer_steps": folora_done["optimizer_steps"],
               "proxy_sequences": folora_done["proxy_sequences"], "train_examples": len(train_set),
               "eval_examples": len(eval_set), "base_eval_loss": folora_done["base_eval_loss"],
               "layers": folora_done["layers"], "base_energy_by_module": folora_done["base_energies"],
               "folora": folora_done["result"], "adamw": baseline,
               "resumed_from_step": {"folora": start["step"] if folora_folder is not None else None,
                                     "adamw": resumed_adamw},
               "seconds": time.perf_counter() - started}
    write_json(output_dir / "summary.json", summary)
    plot_gates(summary["layers"], output_dir / "gates.png",
               title=f"FoLoRA gates ({settings.model}, after {folora_done['optimizer_steps']} steps)")
    checkpoints.remove()  # the run's outputs are complete (also a resume's that saved no more checkpoints)
    return summary


def _mean_last(losses: list[float], count: int = 10) -> float:
    tail = losses[-count:]
    return sum(tail) / len(tail)

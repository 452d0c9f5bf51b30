"""The forwards that feed the statistics: the short forward that names the LoRA inputs, the statistics forwards
over this rank's calibration batches, the counting of training forwards, and the check that a batch can be counted
under ``task_token_mask="labels"``.

Every forward here is collective on N ranks (the collector sends each input's token rows to its owner; ZeRO-3
gathers parameters), so every rank runs the same number of them::

    rank 0:  b0  b1  b2          ← three batches: three counted forwards
    rank 1:  b0  b1  b1*         ← two batches: b1 repeated with an all-zero mask (* = nothing counted)
    rank 2:  b0  b1  b1*

The controller's ``calibrate`` runs them in order: ``discover_inputs`` on the first proxy batch (so owners are
chosen before any statistics move), then ``run_forwards`` for "pre" and for "task" (its batches counted by a
``TokenTally``, from which ``budgeted_schedule`` fits the training statistics into ``statistics_flops_share``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from folora_ds.distributed import comm
from folora_ds.distributed.statistics import raise_if_any
from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.covariance import CovarianceCollector
from folora_ds.method.statistics_cost import (
    StatisticsSchedule,
    StepShape,
    owner_imbalance,
    schedule_within_share,
    statistics_flop_cost,
    statistics_share,
)

_log = logging.getLogger(__name__)


def labels_problem(batch: Mapping[str, torch.Tensor], where: str) -> str | None:
    """Why ``batch`` cannot be counted under ``task_token_mask="labels"`` (which counts the tokens with a label),
    or None: without ``labels`` it would silently count every token instead, and labels that are not one per
    input token (sequence classification, encoder-decoder targets) select nothing meaningful.

    Args:
        batch: ``input_ids`` (batch, seq) and, to be countable, ``labels`` (batch, seq) with -100 = not counted.
        where: what the batch is for ("training", "task calibration"), named in the message.

    Returns:
        The message naming the fix (``task_token_mask='attention'`` counts every real token), or None.
    """
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


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode without gradients (no dropout in the statistics), its training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def statistics_forward_arguments(model: nn.Module) -> dict[str, int]:
    """``{"logits_to_keep": 1}`` when ``model`` (a peft model or a bare Hugging Face one) takes it and its output
    embeddings carry no LoRA, else ``{}``. The statistics read only the LoRA inputs, not the logits: skipping the LM
    head's (tokens × vocabulary) product saves a fifth of SmolLM2's calibration forward (49,152-token vocabulary)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        accepts = "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # a forward without an inspectable signature
        return {}
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return {"logits_to_keep": 1} if accepts and not hasattr(head, "lora_A") else {}


def discover_inputs(model: nn.Module, collector: CovarianceCollector, batch: Mapping[str, torch.Tensor],
                    device: torch.device) -> None:
    """Collective: one short forward (the first sequence, up to 8 tokens) in which ``collector`` learns the input
    keys, their sharing and widths; nothing is counted.

    Args:
        batch: ``input_ids`` (batch, seq) and optionally ``attention_mask`` (batch, seq).
        device: where the model is (the batch is moved there).
    """
    short = {name: batch[name][:1, :8].to(device) for name in ("input_ids", "attention_mask") if name in batch}
    with _evaluating(model), collector.discover():
        model(**short)


def run_forwards(model: nn.Module, collector: CovarianceCollector, source: str,
                 batches: Iterator[Mapping[str, torch.Tensor]], *, labels: bool, device: torch.device, group=None,
                 progress: bool = False) -> int:
    """Collective: run this rank's ``batches`` through ``model`` inside ``collector.collect(source)``.

    Every rank runs as many forwards as the rank with the most batches (the row exchange and ZeRO-3's parameter
    gathers are collectives): a rank out of batches repeats its last one with an all-zero mask, so nothing is
    counted. One small all-gather per forward tells every rank whether any rank still has a batch, and whether any
    rank's batch cannot be counted, so that every rank raises together instead of one waiting in a collective.

    Args:
        source: "pre" or "task".
        batches: ``input_ids`` (batch, seq), optionally ``attention_mask`` and ``labels`` (batch, seq).
        labels: count only the tokens with a label (``task_token_mask == "labels"`` on task batches); every
            batch is checked with ``labels_problem`` first.
        device: where the model is (each batch is moved there).
        progress: show a progress bar of the counted forwards.

    Returns:
        How many of this rank's batches were counted.

    Raises:
        DistributedStatisticsError: on every rank, when any rank's batch fails ``labels_problem``.
    """
    count, last = 0, None
    extra = statistics_forward_arguments(model)
    bar = tqdm(desc=f"{source} statistics", disable=not progress, leave=False)
    with _evaluating(model):
        while True:
            batch = next(batches, None)
            problem = labels_problem(batch, f"{source} calibration") if labels and batch is not None else None
            flags = comm.all_gather_counts(int(batch is not None) + 2 * int(problem is not None), device, group)
            if any(flag & 2 for flag in flags):  # every rank raises together, none waits in a collective
                raise_if_any(problem, group)
            if not any(flag & 1 for flag in flags):
                break
            counting = batch is not None
            batch = {name: tensor.to(device) for name, tensor in batch.items()} if counting else last
            mask = batch.get("attention_mask") if counting else torch.zeros_like(batch["input_ids"])
            with collector.collect(source, attention_mask=mask,
                                   labels=batch.get("labels") if labels and counting else None):
                model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), **extra)
            count, last = count + counting, batch
            bar.update(int(counting))
    bar.close()
    return count


class TokenTally:
    """Passes batches on and counts them: micro-batches, tokens computed (``input_ids``, padding included) and
    tokens the statistics may count (real ones; with ``labels``, only those with a label)."""

    def __init__(self, batches: Iterator[Mapping[str, torch.Tensor]], *, labels: bool) -> None:
        self._batches, self._labels = batches, labels
        self.micro_batches, self.tokens, self.counted_tokens = 0, 0, 0

    def __iter__(self) -> TokenTally:
        return self

    def __next__(self) -> Mapping[str, torch.Tensor]:
        batch = next(self._batches)
        mask = batch.get("attention_mask")
        counted = torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()
        if self._labels and batch.get("labels") is not None and batch["labels"].shape == counted.shape:
            counted = counted & (batch["labels"] != -100)
        self.micro_batches += 1
        self.tokens += batch["input_ids"].numel()
        self.counted_tokens += int(counted.sum())
        return batch


def _linear_weights(model: nn.Module) -> Iterator[nn.Parameter]:
    """The weight of every module with a 2-D weight but embeddings (ZeRO-3 keeps the whole shape in ds_shape)."""
    for module in model.modules():
        weight = dict(module.named_parameters(recurse=False)).get("weight")  # own, not a wrapper's property
        if weight is not None and not isinstance(module, nn.Embedding) and \
                len(getattr(weight, "ds_shape", weight.shape)) == 2:
            yield weight


def linear_parameters(model: nn.Module) -> int:
    """P of ``statistics_cost.StepShape``: the weights of every module with a 2-D weight but embeddings (a lookup
    costs no multiply-adds), whole under ZeRO-3 (``ds_numel``), this rank's shard under tensor parallelism."""
    return sum(int(getattr(weight, "ds_numel", weight.numel())) for weight in _linear_weights(model))


def model_itemsize(model: nn.Module) -> int:
    """Bytes per element of the dtype the model's linear layers compute in: the dtype of most of their weights
    (bf16 base weights beside float32 LoRA factors count as bf16; 4 for a model without linear layers)."""
    counts: dict[torch.dtype, int] = {}
    for weight in _linear_weights(model):
        counts[weight.dtype] = counts.get(weight.dtype, 0) + int(getattr(weight, "ds_numel", weight.numel()))
    return max(counts, key=counts.__getitem__).itemsize if counts else 4


def budgeted_schedule(model: nn.Module, config: FoLoRAConfig, dims: Mapping[str, int], tally: TokenTally,
                      group=None, owners: Mapping[str, int] | None = None) -> StatisticsSchedule:
    """Collective when ``config.statistics_flops_share`` is set: the training statistics' schedule, the
    configured one lowered into that share of the step (``statistics_cost.schedule_within_share``) for the
    mean calibration micro-batch over every rank (all ranks get the same schedule: the collecting forwards are
    collective), a statistics flop weighted by ``statistics_flop_cost`` and the busiest of the ``owners`` (None:
    every input on one rank). Without a share, the configured schedule."""
    requested = StatisticsSchedule(config.statistics_tokens, config.statistics_every)
    if config.statistics_flops_share is None:
        return requested
    totals = comm.all_reduce_sum(torch.tensor([tally.micro_batches, tally.tokens, tally.counted_tokens],
                                              dtype=torch.float64), group)
    batches = max(float(totals[0]), 1.0)
    imbalance = 1.0 if owners is None else owner_imbalance(owners, dims, comm.world_size(group))
    cost = statistics_flop_cost(config.statistics_flop_cost, model_itemsize(model),
                                getattr(torch, config.statistics_dtype).itemsize)
    shape = StepShape(tokens=float(totals[1]) / batches, counted_tokens=float(totals[2]) / batches,
                      input_widths=tuple(dims.values()), linear_parameters=linear_parameters(model), flop_cost=cost,
                      owner_imbalance=imbalance)
    schedule = schedule_within_share(config.statistics_flops_share, requested, shape,
                                     max_every=config.refresh_interval or None)  # every window counts something
    if comm.rank(group) == 0:
        _log.info("FoLoRA statistics: %s tokens on one micro-batch in %d, %.2f%% of the step "
                  "(statistics_flops_share %g; configured %s in %d: %.2f%%; %.0f tokens per micro-batch; a "
                  "statistics flop = %g model flops; busiest owner %.2fx the average)",
                  schedule.tokens or "all", schedule.every, 100 * statistics_share(schedule, shape),
                  config.statistics_flops_share, requested.tokens or "all", requested.every,
                  100 * statistics_share(requested, shape), shape.tokens, cost, shape.owner_imbalance)
    return schedule


@contextlib.contextmanager
def training_forward(collector: CovarianceCollector, batch: Mapping[str, torch.Tensor], config: FoLoRAConfig, *,
                     forward: int, schedule: StatisticsSchedule | None = None, replica: int | None = None,
                     group=None, read: bool = True) -> Iterator[None]:
    """Count the training forward run inside this context towards ``collector``'s "task" sums when it is one in
    ``schedule.every`` (forwards 1, 1 + n, 1 + 2n, ...), ``schedule.tokens`` tokens per input (default: the
    configured ``statistics_every`` and ``statistics_tokens``).

    The tokens are drawn with a CPU generator seeded by ``config.proxy.seed``, the replica and ``forward``, so
    replicas draw differently, the TP ranks of one replica draw the same (their row-parallel inputs are column
    blocks of the same tokens), and a resumed run (which restores the forward count) draws the same. Collective on
    N ranks when counted (each input's token rows go to its owner) and on the first forward (the labels check).

    Args:
        batch: ``attention_mask`` and, under ``task_token_mask="labels"``, ``labels`` (batch, seq); checked with
            ``labels_problem`` on every forward, counted or not.
        forward: this rank's training forwards so far, this one included (1 on the first).
        replica: this rank's data-parallel replica (default: its rank in ``group``, every rank its own replica).
        read: False when no refresh will read this window (``statistics_cost.window_is_read``): nothing counted.

    Raises:
        DistributedStatisticsError: on every rank, when any rank's first batch fails ``labels_problem``.
        ValueError: a later batch fails it (the ranks are then past their first collective check).
    """
    use_labels = config.task_token_mask == "labels"
    problem = labels_problem(batch, "training") if use_labels else None
    if forward == 1:  # collective on the first forward: every rank raises together
        raise_if_any(problem, group)
    elif problem is not None:
        raise ValueError(problem)
    if schedule is None:
        schedule = StatisticsSchedule(config.statistics_tokens, config.statistics_every)
    if not read or (forward - 1) % schedule.every != 0:
        yield
        return
    generator = None
    if schedule.tokens is not None:
        replica = comm.rank(group) if replica is None else replica
        generator = torch.Generator().manual_seed(config.proxy.seed * 1_000_003 + replica * 7_919 + forward)
    with collector.collect("task", attention_mask=batch.get("attention_mask"),
                           labels=batch.get("labels") if use_labels else None,
                           sample_tokens=schedule.tokens, generator=generator):
        yield

"""What the running C_task costs against the training step, and the schedule that keeps it under a share.

Pure arithmetic, no torch. Flops per rank and collecting micro-batch: each rank's ``n`` sampled token rows of an
input of width d go to that input's owner, which multiplies them into the (d, d) sums: 2·n·d² per rank on average
(the owner does world·2·n·d², the others none; owners are balanced by the solves' d³, not by this, so the busiest
owner can do more than the average: ``owner_imbalance`` below). The step's model flops per micro-batch of T
tokens are 4·P·T for P parameters in linear layers: the forward's 2·P·T and the backward's 2·P·T for the input
gradients (the frozen weights' gradients are not computed; LoRA's own flops are a fraction of a percent). So the
share is

    share = 2·n·Σd² / (every · 4·P·T) = n·Σd² / (2·every·P·T)

which at the default n = 64 is 1.3% for a Llama-2-7B block at 2,048 tokens per micro-batch and 10.6% at 256
(measured step ratios 1.019 and 1.20: the hooks and the gather add a fixed cost the flop count does not see).

Two weights turn it into the share of the step's *time* (``StepShape.flop_cost``, ``StepShape.owner_imbalance``):
a statistics flop (a float32 fold of a few rows) costs 2.2-2.8 flops of a bf16 model's GEMMs on a CPU with bf16
matrix units (``benchmarks/statistics_update.py``), and the step waits for the busiest owner, which folds
world·n rows of every input it owns — at 70B the d_ff input alone is 70-80% of Σd². Unweighted, a 70B block on 2
ranks fitted to 1.85% of the flops ran 1.10x plain AdamW (docs/benchmarks.md).

``schedule_within_share`` lowers n first (down to ``MIN_STATISTICS_TOKENS``: tokens of more micro-batches are
less correlated than more tokens of one, so for the same rows a smaller n every micro-batch estimates C_task
better than a larger n on fewer), then collects on one micro-batch in ``every``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

MIN_STATISTICS_TOKENS = 16
"""The fewest tokens per input and collecting micro-batch the budget lowers ``statistics_tokens`` to before it
collects less often instead."""
NARROW_MODEL_FLOP_COST = 2.5
"""What one statistics flop costs in model flops when the model computes in a narrower dtype than the statistics
(bf16 or fp16 against float32): 2.2-2.8 measured on a CPU with bf16 matrix units (docs/benchmarks.md). On a GPU
float32 without TF32 against bf16 tensor cores can be far more; ``benchmarks/statistics_update.py`` (and the GPU
check) measures it for ``statistics_flop_cost``."""


def statistics_flop_cost(configured: float | None, model_itemsize: int, statistics_itemsize: int) -> float:
    """``configured`` when set; else 1 when the model computes in the statistics' width or wider, and
    ``NARROW_MODEL_FLOP_COST`` when narrower."""
    if configured is not None:
        return float(configured)
    return 1.0 if model_itemsize >= statistics_itemsize else NARROW_MODEL_FLOP_COST


def owner_imbalance(owners: Mapping[str, int], dims: Mapping[str, int], world_size: int) -> float:
    """The busiest owner's Σd² over the average Σd² / world: how much longer than the average rank it folds
    (each owner folds every rank's rows of its inputs). 1 for one rank or a perfect balance.

    Raises:
        ValueError: an input without an owner in [0, world_size), or no inputs.
    """
    if not dims:
        raise ValueError("owner_imbalance: no inputs")
    loads = [0] * world_size
    for key, dim in dims.items():
        owner = owners.get(key)
        if not (isinstance(owner, int) and 0 <= owner < world_size):
            raise ValueError(f"owner_imbalance: input {key!r} has owner {owner!r}, not a rank in [0, {world_size})")
        loads[owner] += dim * dim
    return world_size * max(loads) / sum(loads)


@dataclass(frozen=True)
class StatisticsSchedule:
    """Which training micro-batches count towards the running C_task, and how many of their tokens.

    Attributes:
        tokens: tokens per input and collecting micro-batch, drawn from the counted ones (None = every one).
        every: collect on one micro-batch in this many (1 = every one).
    """

    tokens: int | None
    every: int

    def __post_init__(self) -> None:
        if self.tokens is not None and not (isinstance(self.tokens, int) and self.tokens >= 1):
            raise ValueError(f"StatisticsSchedule.tokens={self.tokens!r} must be None or an integer >= 1")
        if not (isinstance(self.every, int) and self.every >= 1):
            raise ValueError(f"StatisticsSchedule.every={self.every!r} must be an integer >= 1")


@dataclass(frozen=True)
class StepShape:
    """What the share depends on, per rank and micro-batch.

    Attributes:
        tokens: T, the tokens a micro-batch computes (padding included: the model runs on it).
        counted_tokens: the tokens the statistics may draw from (``task_token_mask``: labelled or real ones).
        input_widths: d of every LoRA input (modules fed the same tensor are one input).
        linear_parameters: P, the weights of the model's linear layers (the whole layer under ZeRO-3, this
            rank's shard under tensor parallelism), embeddings excluded (a lookup), the LM head included.
        flop_cost: what one statistics flop costs in model flops (``statistics_flop_cost``).
        owner_imbalance: the busiest owner's statistics over the average rank's (``owner_imbalance``).
    """

    tokens: float
    counted_tokens: float
    input_widths: tuple[int, ...]
    linear_parameters: int
    flop_cost: float = 1.0
    owner_imbalance: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_widths", tuple(self.input_widths))
        for name in ("tokens", "counted_tokens"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"StepShape.{name}={value!r} must be a finite number >= 0")
        if not self.tokens > 0:
            raise ValueError("StepShape.tokens=0: a micro-batch without tokens has no step to compare with")
        if not self.input_widths or any(not (isinstance(d, int) and d >= 1) for d in self.input_widths):
            raise ValueError(f"StepShape.input_widths={self.input_widths!r} must be widths >= 1 (one per input)")
        if not (isinstance(self.linear_parameters, int) and self.linear_parameters >= 1):
            raise ValueError(f"StepShape.linear_parameters={self.linear_parameters!r} must be an integer >= 1")
        cost, imbalance = self.flop_cost, self.owner_imbalance
        if not (isinstance(cost, (int, float)) and math.isfinite(cost) and cost > 0):
            raise ValueError(f"StepShape.flop_cost={cost!r} must be a finite number > 0")
        if not (isinstance(imbalance, (int, float)) and math.isfinite(imbalance) and imbalance >= 1):
            raise ValueError(f"StepShape.owner_imbalance={imbalance!r} must be a finite number >= 1")

    @property
    def weighted_squared_widths(self) -> float:
        """Σd² over the inputs, weighted by ``flop_cost`` and ``owner_imbalance``: the busiest rank's statistics
        in model flops per sampled row."""
        return sum(d * d for d in self.input_widths) * self.flop_cost * self.owner_imbalance

    def rows(self, schedule: StatisticsSchedule) -> float:
        """Token rows per input a collecting micro-batch counts: ``tokens``, at most the counted ones."""
        return self.counted_tokens if schedule.tokens is None else min(schedule.tokens, self.counted_tokens)


def statistics_share(schedule: StatisticsSchedule, shape: StepShape) -> float:
    """The statistics' flops over the step's model flops, averaged over micro-batches, weighted into a share of the
    busiest rank's time (module docstring)."""
    return (shape.rows(schedule) * shape.weighted_squared_widths
            / (2 * schedule.every * shape.linear_parameters * shape.tokens))


def schedule_within_share(share: float, requested: StatisticsSchedule, shape: StepShape, *,
                          max_every: int | None = None) -> StatisticsSchedule:
    """The schedule closest to ``requested`` whose ``statistics_share`` is at most ``share``: ``requested`` itself
    when it fits; else fewer tokens per micro-batch (down to ``MIN_STATISTICS_TOKENS``, or the requested count
    when that is fewer), then collecting on fewer micro-batches, at most one in ``max_every`` (a refresh window
    must count some micro-batch: the controller passes ``refresh_interval``), where the share may stay above
    ``share``. Never more tokens or more often than requested.

    Raises:
        ValueError: ``share`` is not a number in (0, 1].
    """
    if not (isinstance(share, (int, float)) and 0 < share <= 1):
        raise ValueError(f"statistics share {share!r} must be a number in (0, 1]")
    if statistics_share(requested, shape) <= share:
        return requested
    # the most rows per micro-batch, on average, that fit: n / every <= allowed
    allowed = share * 2 * shape.linear_parameters * shape.tokens / shape.weighted_squared_widths
    rows = shape.rows(requested)
    tokens = math.floor(allowed * requested.every)
    floor = min(MIN_STATISTICS_TOKENS, math.ceil(rows))
    if tokens >= floor:
        return StatisticsSchedule(tokens, requested.every)
    every = max(requested.every, math.ceil(floor / allowed))
    return StatisticsSchedule(floor, every if max_every is None else max(requested.every, min(every, max_every)))



def refresh_is_read(step: int, refresh_interval: int, total_steps: int | None) -> bool:
    """Whether a refresh after optimizer step ``step`` (1-based) would gate a later step: it is a refresh step
    (a multiple of ``refresh_interval`` > 0) before the run's last step (``total_steps``; None = unknown, always)."""
    return refresh_interval > 0 and step % refresh_interval == 0 and (total_steps is None or step < total_steps)


def window_is_read(completed_steps: int, refresh_interval: int, total_steps: int | None) -> bool:
    """Whether C_task statistics collected while optimizer step ``completed_steps`` + 1 accumulates reach a refresh
    that gates a later step. A run that knows its length (``total_steps``) collects nothing in a last window that
    ends with the run (nor, with ``refresh_interval`` = 0, ever): those statistics would feed no gate, and they are
    the step's largest FoLoRA cost after the gated update (docs/benchmarks.md)."""
    if total_steps is None:
        return True
    if refresh_interval <= 0:
        return False
    next_refresh = (completed_steps // refresh_interval + 1) * refresh_interval
    return refresh_is_read(next_refresh, refresh_interval, total_steps)

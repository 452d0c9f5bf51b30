"""``folora-ds plan``: per-rank memory, communication and solve time of a FoLoRA run, before it starts.

From a Hugging Face ``config.json`` the model is built on the meta device (no weights, seconds even for 70B), the
LoRA modules are added with peft, and one meta forward names the inputs and their widths exactly as the
collector will (modules fed the same tensor share one input). The rest is arithmetic over the code's own rules:
``assign_owners`` for the owners, ``rows_per_gather`` for the exchange buffers, DeepSpeed's ZeRO partitioning
for parameters, gradients and Adam state. ``tests/unit/training/test_plan.py`` and
``tests/distributed/test_plan.py`` hold the plan against what a run measures.

What each figure counts (bytes per rank, B = bytes per element):
- base weights: all frozen parameters × B_model, divided by the world size at ZeRO-3.
- LoRA: parameters (B_model) and gradients (B_model, fp32 at ZeRO-0) and, from ZeRO-1, an fp32 master copy; Adam
  m and v (fp32). Optimizer state is partitioned from ZeRO-1, gradients from ZeRO-2, parameters at ZeRO-3.
- statistics: (d, d) sums of the inputs this rank owns: C_pre and C_task during calibration (2 per input), then
  C_pre, the C_task EMA and the current window (3 per input). "replicated" is the design before owner
  partitioning: C_pre and C_task sums of every input on every rank.
- exchange buffers (transient): this rank's rows of one input plus, on an owner, one gather of every rank's
  rows (at most ``EXCHANGE_BUFFER_BYTES``) and its cast to the statistics dtype.
- projectors: (C̃V_k, V_k, g_k) of every input whose LoRA-A rows this rank's optimizer holds: all of them at
  ZeRO-0 and ZeRO-3, about 1/world of them at ZeRO-1/2; plus, on owners, the solver's last good projector of each
  owned input in the solve dtype (the basis kept when a re-solve fails).
- solve workspace: the owner's largest input in the solve dtype: 5 (d, d) matrices besides the inputs (Cholesky
  factor, whitened matrix, Q and ``eigh``'s 2·d² workspace; the inputs are cast one at a time inside that peak;
  ``benchmarks/eigensolve.py`` measures 3.6–4.8 at d = 2048–4096 from float32 statistics).
- tensor parallelism (``tensor_parallel`` = TP > 1; the rest of the ranks, world / TP, are data-parallel and ZeRO
  partitions over them): base weights / TP; per LoRA module on a column-parallel base (q/k/v, gate/up) A whole and
  B / TP, on a row-parallel base (o, down; ``ROW_PARALLEL_MODULES``) A / TP and B whole; projectors of row-parallel
  inputs d / TP rows; token rows sent to owners / TP (each TP rank sends its share of a column input and its column
  block of a row input); the gate's all-reduce of r × k coordinates per row-parallel LoRA-A and step over TP.
- activations (an estimate, the same with and without FoLoRA, not in ``peak``): per token and block of a Llama-style
  model, about 10·hidden + 4·d_ff saved elements in the model dtype (norm inputs and outputs, q/k/v/attention
  output with a fused attention kernel, gate/up/SiLU/product of the MLP), plus the logits in the model dtype and
  fp32 with their gradient; with activation checkpointing, one hidden state per token and block plus one block's
  full set.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from folora_ds.common.checks import require_int, require_real
from folora_ds.common.files import read_json_file
from folora_ds.distributed.ownership import assign_owners
from folora_ds.distributed.statistics import rows_per_gather
from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.covariance import CovarianceCollector
from folora_ds.method.eigensolve import solve_generalized_eigenproblem
from folora_ds.method.peft_layers import lora_layers
from folora_ds.method.solve_cost import solve_seconds, solve_workspace
from folora_ds.method.spectral import solves_top_k
from folora_ds.method.statistics_cost import (
    StatisticsSchedule,
    StepShape,
    owner_imbalance,
    schedule_within_share,
    statistics_flop_cost,
    statistics_share,
)

MODEL_CONFIGS = Path(__file__).parent.parent / "model_configs"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
ROW_PARALLEL_MODULES = frozenset({"o_proj", "down_proj", "out_proj", "dense_4h_to_h", "fc2", "w2", "c_proj"})
"""Module names Megatron splits along d_in (row-parallel; the rest of a block's linears are column-parallel)."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: parameter counts and the LoRA inputs.

    Attributes:
        base_parameters: frozen parameters. lora_parameters: trainable LoRA parameters (A and B).
        linear_parameters: weights of the linear layers, LM head included (the step's flops per token are 4×).
        inputs: width d of every LoRA input key (modules sharing an input share a key), in forward order.
        hidden_size, intermediate_size, layers, vocab_size: from the config, for the activation estimate.
        lora_modules: (d_in, d_out) of every LoRA module; row_parallel_inputs: the input keys of row-parallel
            modules (``ROW_PARALLEL_MODULES``), for tensor parallelism.
    """

    name: str
    base_parameters: int
    lora_parameters: int
    inputs: dict[str, int]
    linear_parameters: int = 0
    lora_modules: dict[str, tuple[int, int]] = field(default_factory=dict)
    row_parallel_inputs: frozenset[str] = frozenset()
    hidden_size: int = 0
    intermediate_size: int = 0
    layers: int = 0
    vocab_size: int = 0


@dataclass(frozen=True)
class PlanSettings:
    """The run being planned (validated on construction)."""

    world_size: int
    nodes: int = 1
    tensor_parallel: int = 1
    zero_stage: int = 3
    model_dtype: str = "bfloat16"
    micro_batch: int = 1
    seq_len: int = 4096
    gradient_accumulation: int = 1
    solve_seconds_per_gflop: float | None = None  # None: measured here

    def __post_init__(self) -> None:
        if not (isinstance(self.world_size, int) and self.world_size >= 1):
            raise ValueError(f"world_size={self.world_size!r} must be an integer >= 1")
        if not (isinstance(self.nodes, int) and 1 <= self.nodes <= self.world_size
                and self.world_size % self.nodes == 0):
            raise ValueError(f"nodes={self.nodes!r} must divide world_size={self.world_size}")
        if not (isinstance(self.tensor_parallel, int) and self.tensor_parallel >= 1
                and self.world_size % self.tensor_parallel == 0):
            raise ValueError(f"tensor_parallel={self.tensor_parallel!r} must be an integer >= 1 dividing "
                             f"world_size={self.world_size}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage!r} must be 0, 1, 2 or 3")
        if self.model_dtype not in DTYPE_BYTES:
            raise ValueError(f"model_dtype={self.model_dtype!r}; allowed: {sorted(DTYPE_BYTES)}")
        for name in ("micro_batch", "seq_len", "gradient_accumulation"):
            require_int(name, getattr(self, name))
        if self.solve_seconds_per_gflop is not None:  # 0 or less would print a solve time of 0 or below
            require_real("solve_seconds_per_gflop (--solve-rate)", self.solve_seconds_per_gflop, low=0.0,
                         high=math.inf, high_open=True)


@dataclass
class RankPlan:
    """Bytes held by one rank (see the module docstring for what each counts)."""

    rank: int
    inputs_owned: int
    base_weights: int
    lora_parameters: int
    lora_gradients: int
    lora_optimizer: int
    statistics_calibration: int
    statistics_training: int
    exchange_buffers: int
    projectors: int
    solver_projectors: int
    solve_workspace: int
    solve_factors: int
    solve_seconds: float
    activations: int = 0
    activations_checkpointed: int = 0

    @property
    def peak(self) -> int:
        """The most this rank holds at once (training or calibration, whichever is larger)."""
        fixed = self.base_weights + self.lora_parameters + self.lora_gradients + self.lora_optimizer
        return fixed + max(self.statistics_training + self.projectors + self.solver_projectors + self.solve_factors
                           + self.solve_workspace,
                           self.statistics_calibration) + self.exchange_buffers


@dataclass
class Plan:
    model: ModelShape
    settings: PlanSettings
    folora: FoLoRAConfig
    ranks: list[RankPlan]
    replicated_statistics: int
    bytes_per_collecting_micro_batch: int
    bytes_per_refresh: int
    bytes_per_calibration_micro_batch: int
    lora_gradient_bytes_per_step: int
    zero3_parameter_bytes_per_micro_batch: int
    tensor_parallel_gate_bytes_per_step: int
    collecting_micro_batches_per_step: float
    solve_seconds_per_gflop: float
    statistics_schedule: StatisticsSchedule
    statistics_share: float
    configured_statistics_share: float
    owners: dict[str, int] = field(repr=False)

    def to_dict(self) -> dict:
        model = asdict(self.model) | {"inputs": len(self.model.inputs), "lora_modules": len(self.model.lora_modules),
                                      "row_parallel_inputs": sorted(self.model.row_parallel_inputs)}
        return {"model": model, "settings": asdict(self.settings),
                "folora": self.folora.to_dict(), "ranks": [asdict(r) | {"peak": r.peak} for r in self.ranks],
                "replicated_statistics": self.replicated_statistics,
                "bytes_per_collecting_micro_batch": self.bytes_per_collecting_micro_batch,
                "bytes_per_refresh": self.bytes_per_refresh,
                "bytes_per_calibration_micro_batch": self.bytes_per_calibration_micro_batch,
                "lora_gradient_bytes_per_step": self.lora_gradient_bytes_per_step,
                "zero3_parameter_bytes_per_micro_batch": self.zero3_parameter_bytes_per_micro_batch,
                "tensor_parallel_gate_bytes_per_step": self.tensor_parallel_gate_bytes_per_step,
                "solve_seconds_per_gflop": self.solve_seconds_per_gflop,
                "statistics_schedule": asdict(self.statistics_schedule), "statistics_share": self.statistics_share,
                "configured_statistics_share": self.configured_statistics_share, "owners": self.owners}


def load_model_config(name_or_path: str | Path):
    """A transformers config from a shipped name (``folora_ds/model_configs/<name>.json``), a ``config.json``
    path or a model folder holding one."""

    from transformers import AutoConfig

    path = Path(name_or_path)
    shipped = MODEL_CONFIGS / f"{name_or_path}.json"
    if not path.exists() and shipped.is_file():
        path = shipped
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        known = sorted(p.stem for p in MODEL_CONFIGS.glob("*.json"))
        raise FileNotFoundError(f"model config {str(name_or_path)!r} not found: give a config.json, a model folder "
                                f"or one of {known}")
    values = read_json_file(path, what="model config")
    if not isinstance(values, dict) or "model_type" not in values:
        raise ValueError(f"{path}: no 'model_type'; is this a Hugging Face config.json?")
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        if key in values:
            require_int(key, values[key], where=f"model config {str(path)!r}: ")
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def model_shape(config, folora: FoLoRAConfig, name: str = "model") -> ModelShape:
    """Build ``config``'s causal LM on the meta device, add LoRA with ``folora``'s settings and find the inputs
    with one meta forward (the collector's own discovery)."""

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
        model = get_peft_model(model, LoraConfig(r=folora.lora_rank, lora_alpha=folora.lora_alpha,
                                                 target_modules=list(folora.target_modules)))
    collector = CovarianceCollector(model)
    with torch.no_grad(), collector.discover():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long, device="meta"))
    collector.remove()
    linear = sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    modules = {name: (layer.in_features, layer.out_features) for name, layer in lora_layers(model).items()}
    rows = frozenset(collector.key_of(name) for name in modules if name.rsplit(".", 1)[-1] in ROW_PARALLEL_MODULES)
    return ModelShape(name=name, base_parameters=frozen, lora_parameters=trainable, linear_parameters=linear,
                      inputs=collector.input_dims(), lora_modules=modules, row_parallel_inputs=rows,
                      hidden_size=int(getattr(config, "hidden_size", 0) or 0),
                      intermediate_size=int(getattr(config, "intermediate_size", 0) or 0),
                      layers=int(getattr(config, "num_hidden_layers", 0) or 0),
                      vocab_size=int(getattr(config, "vocab_size", 0) or 0))


def measure_solve_rate(dim: int = 768, repeats: int = 3, dtype: str = "float64") -> float:
    """Seconds per d³/10⁹ of FoLoRA's generalized eigensolve of width ``dim`` here, the best of ``repeats``
    (``benchmarks/eigensolve.py`` fits the same rate over d = 1024–4096)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2 * dim, dim, generator=generator, dtype=torch.float64)
    c_pre = x.T @ x / (2 * dim)
    c_task = c_pre[:, : dim // 4] @ c_pre[: dim // 4] / dim
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        solve_generalized_eigenproblem(c_task, c_pre, solve_dtype=getattr(torch, dtype), retry_float64=False)
        best = min(best, time.perf_counter() - started)
    return best / (dim ** 3 / 1e9)


def make_plan(shape: ModelShape, settings: PlanSettings, folora: FoLoRAConfig) -> Plan:
    """Per-rank memory, communication and solve time of ``folora`` on ``shape`` with ``settings``."""
    world, stage, tp = settings.world_size, settings.zero_stage, settings.tensor_parallel
    dp = world // tp  # ZeRO partitions and reduces over the data-parallel ranks
    model_bytes = DTYPE_BYTES[settings.model_dtype]
    statistics_bytes = getattr(torch, folora.statistics_dtype).itemsize
    rate = (measure_solve_rate(dtype=folora.solve_dtype) if settings.solve_seconds_per_gflop is None
            else settings.solve_seconds_per_gflop)
    solve_bytes = getattr(torch, folora.solve_dtype).itemsize
    owners = assign_owners(shape.inputs, world)
    lora = shape.lora_parameters if tp == 1 else lora_parameters_per_tp_rank(shape, folora.lora_rank, tp)
    master = 0 if stage == 0 else 4
    gradient_bytes = 4 if stage == 0 else model_bytes

    tokens = settings.micro_batch * settings.seq_len
    configured = StatisticsSchedule(folora.statistics_tokens, folora.statistics_every)
    widths = {key: shape.inputs[key] // tp if key in shape.row_parallel_inputs else shape.inputs[key]
              for key in shape.inputs}
    step = StepShape(tokens=tokens, counted_tokens=tokens, linear_parameters=max(shape.linear_parameters // tp, 1),
                     input_widths=tuple(widths.values()), owner_imbalance=owner_imbalance(owners, widths, world),
                     flop_cost=statistics_flop_cost(folora.statistics_flop_cost, model_bytes, statistics_bytes))
    schedule = (configured if folora.statistics_flops_share is None
                else schedule_within_share(folora.statistics_flops_share, configured, step,
                                           max_every=folora.refresh_interval or None))
    collected = round(step.rows(schedule))
    # proxy batches: a short prompt (a few tokens) and seq_len new ones; task calibration: training micro-batches
    calibration_tokens = max(folora.proxy.batch_size * (folora.proxy.seq_len + 8), tokens)
    widest = max(shape.inputs.values())

    def exchange_buffer(rows: int) -> int:
        if world == 1:
            return rows * widest * (model_bytes + statistics_bytes)
        block = min(rows, rows_per_gather(world, widest, model_bytes))
        return rows * widest * model_bytes + world * block * widest * model_bytes + block * widest * statistics_bytes

    def projector_bytes(dim: int, element_bytes: int = 4, rows: int | None = None) -> int:
        k = dim if folora.k is None else min(folora.k, dim)
        return (2 * (dim if rows is None else rows) * k + k) * element_bytes

    def rows_here(key: str) -> int:  # projector rows a rank's optimizer needs: d / TP for a row-parallel input
        return shape.inputs[key] // tp if key in shape.row_parallel_inputs else shape.inputs[key]

    all_projectors = sum(projector_bytes(d, rows=rows_here(key)) for key, d in shape.inputs.items())
    per_block = (10 * shape.hidden_size + 4 * shape.intermediate_size) * model_bytes
    logits = tokens * shape.vocab_size * (model_bytes + 4 + 4)
    activations = tokens * shape.layers * per_block + logits
    checkpointed = tokens * (shape.layers * shape.hidden_size * model_bytes + per_block) + logits
    ranks = []
    for rank in range(world):
        owned = [key for key, owner in owners.items() if owner == rank]
        squares = sum(shape.inputs[key] ** 2 for key in owned)
        ranks.append(RankPlan(
            rank=rank, inputs_owned=len(owned),
            base_weights=shape.base_parameters * model_bytes // tp // (dp if stage == 3 else 1),
            lora_parameters=lora * model_bytes // (dp if stage == 3 else 1),
            lora_gradients=lora * gradient_bytes // (dp if stage >= 2 else 1),
            lora_optimizer=lora * (8 + master) // (dp if stage >= 1 else 1),
            statistics_calibration=2 * squares * statistics_bytes,
            statistics_training=3 * squares * statistics_bytes,
            exchange_buffers=max(exchange_buffer(collected), exchange_buffer(calibration_tokens)),
            projectors=all_projectors if stage in (0, 3) else math.ceil(all_projectors / dp),
            solver_projectors=sum(projector_bytes(shape.inputs[key], solve_bytes) for key in owned),
            solve_workspace=max((solve_workspace(shape.inputs[key], folora) for key in owned), default=0),
            solve_factors=sum(shape.inputs[key] ** 2 * solve_bytes for key in owned
                              if solves_top_k(folora, shape.inputs[key])),
            solve_seconds=sum(solve_seconds(shape.inputs[key], folora, rate) for key in owned),
            activations=activations, activations_checkpointed=checkpointed))
    leaving = (world - 1) / world
    row_width = sum(shape.inputs.values()) / tp  # each TP rank sends 1/TP of a replica's rows (module docstring)
    row_a_rows = sum(folora.lora_rank for name in shape.lora_modules if name.rsplit(".", 1)[-1] in ROW_PARALLEL_MODULES)
    gate_coordinates = row_a_rows * (folora.k or max(shape.inputs.values()))
    gate_bytes = 0 if tp == 1 else round(gate_coordinates * 4 * 2 * (tp - 1) / tp / (dp if stage in (1, 2) else 1))
    per_refresh = sum(projector_bytes(shape.inputs[key], rows=rows_here(key)) for key in owners) * (
        (world - 1) if stage in (0, 3) else 1) // world
    return Plan(
        model=shape, settings=settings, folora=folora, ranks=ranks, owners=owners,
        replicated_statistics=2 * sum(d * d for d in shape.inputs.values()) * statistics_bytes,
        bytes_per_collecting_micro_batch=round(collected * row_width * model_bytes * leaving),
        bytes_per_refresh=per_refresh,
        bytes_per_calibration_micro_batch=round(calibration_tokens * row_width * model_bytes * leaving),
        lora_gradient_bytes_per_step=round(2 * (dp - 1) / dp * lora * model_bytes),
        tensor_parallel_gate_bytes_per_step=gate_bytes,
        zero3_parameter_bytes_per_micro_batch=round(2 * (dp - 1) / dp * shape.base_parameters / tp * model_bytes)
        if stage == 3 else 0,
        collecting_micro_batches_per_step=settings.gradient_accumulation / schedule.every,
        solve_seconds_per_gflop=rate, statistics_schedule=schedule, statistics_share=statistics_share(schedule, step),
        configured_statistics_share=statistics_share(configured, step))


def lora_parameters_per_tp_rank(shape: ModelShape, lora_rank: int, tp: int) -> int:
    """LoRA parameters one TP rank holds: on a column-parallel base A (r, d_in) whole and B (d_out / TP, r), on a
    row-parallel base (``ROW_PARALLEL_MODULES``) A (r, d_in / TP) and B (d_out, r) whole."""
    total = 0
    for name, (d_in, d_out) in shape.lora_modules.items():
        row = name.rsplit(".", 1)[-1] in ROW_PARALLEL_MODULES
        total += lora_rank * (d_in // tp if row else d_in) + (d_out if row else d_out // tp) * lora_rank
    return total


def _size(value: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def format_plan(plan: Plan) -> str:
    """The plan as text: the settings, the per-rank figures of the heaviest rank (and the spread), traffic."""
    s, f, m = plan.settings, plan.folora, plan.model
    heaviest = max(plan.ranks, key=lambda r: r.peak)
    lightest = min(plan.ranks, key=lambda r: r.peak)
    slowest = max(plan.ranks, key=lambda r: r.solve_seconds)
    top_k_inputs = [key for key, d in m.inputs.items() if solves_top_k(f, d)]
    full_bound = sum(plan.solve_seconds_per_gflop * (d / 1000) ** 3 for key, d in m.inputs.items()
                     if plan.owners[key] == slowest.rank)
    lines = [
        f"{m.name}: {m.base_parameters / 1e9:.2f} B frozen + {m.lora_parameters / 1e6:.1f} M LoRA parameters "
        f"(r={f.lora_rank}, {len(m.inputs)} inputs, widths {sorted(set(m.inputs.values()))})",
        f"{s.world_size} ranks on {s.nodes} node(s)"
        + (f" (TP {s.tensor_parallel} x DP {s.world_size // s.tensor_parallel})" if s.tensor_parallel > 1 else "")
        + f", ZeRO-{s.zero_stage}, {s.model_dtype} model, {f.statistics_dtype} "
        f"statistics, k={f.k}, micro-batch {s.micro_batch}×{s.seq_len}, statistics_tokens={f.statistics_tokens}, "
        f"statistics_every={f.statistics_every}, refresh every {f.refresh_interval} steps",
        "",
        f"per rank (heaviest rank {heaviest.rank}; lightest {lightest.rank} in brackets):",
    ]
    rows = [("base weights", "base_weights"), ("LoRA parameters", "lora_parameters"),
            ("LoRA gradients", "lora_gradients"), ("LoRA optimizer (fp32 master + Adam)", "lora_optimizer"),
            ("statistics, calibration (C_pre + C_task sums)", "statistics_calibration"),
            ("statistics, training (C_pre + EMA + window)", "statistics_training"),
            ("exchange buffers (transient)", "exchange_buffers"), ("projectors", "projectors"),
            (f"solver's kept projectors ({f.solve_dtype}, owned inputs)", "solver_projectors"),
            (f"solve workspace ({f.solve_dtype}, transient)", "solve_workspace"),
            (f"top-k solver's kept factors ({f.solve_dtype}, owned inputs)", "solve_factors")]
    for label, name in rows:
        lines.append(f"  {label:<48} {_size(getattr(heaviest, name)):>10}   ({_size(getattr(lightest, name))})")
    lines.append(f"  {'peak (without activations)':<48} {_size(heaviest.peak):>10}   ({_size(lightest.peak)})")
    lines.append(f"  {'activations, estimate (no checkpointing)':<48} {_size(heaviest.activations):>10}")
    lines.append(f"  {'activations, estimate (activation checkpointing)':<48} "
                 f"{_size(heaviest.activations_checkpointed):>10}")
    lines += [
        f"  statistics before owner partitioning: {_size(plan.replicated_statistics)} on every rank "
        f"(now at most {_size(max(r.statistics_training for r in plan.ranks))}, "
        f"{max(r.statistics_training for r in plan.ranks) / plan.replicated_statistics:.1%})",
        f"  inputs owned per rank: {min(r.inputs_owned for r in plan.ranks)}–{max(r.inputs_owned for r in plan.ranks)}",
        "",
        "communication per rank:",
        f"  token rows to owners per collecting micro-batch: {_size(plan.bytes_per_collecting_micro_batch)} "
        f"({plan.collecting_micro_batches_per_step:g} per optimizer step)",
        f"  token rows per calibration micro-batch (exact): {_size(plan.bytes_per_calibration_micro_batch)}",
        f"  projectors received per refresh: {_size(plan.bytes_per_refresh)}",
        *([f"  gate coordinates all-reduced over TP per optimizer step: "
           f"{_size(plan.tensor_parallel_gate_bytes_per_step)} (r x k per row-parallel LoRA-A)"]
          if s.tensor_parallel > 1 else []),
        f"  for scale — LoRA gradient reduction per step: {_size(plan.lora_gradient_bytes_per_step)}"
        + (f"; ZeRO-3 parameter gathers per micro-batch: {_size(plan.zero3_parameter_bytes_per_micro_batch)}"
           if plan.zero3_parameter_bytes_per_micro_batch else ""),
        "",
        f"statistics: {plan.statistics_schedule.tokens or 'every'} tokens per input on one micro-batch in "
        f"{plan.statistics_schedule.every}, {plan.statistics_share:.2%} of the step (its flops in model flops on the "
        f"busiest owner)"
        + (f" (statistics_flops_share {f.statistics_flops_share:g}; configured {f.statistics_tokens or 'every'} in "
           f"{f.statistics_every}: {plan.configured_statistics_share:.2%})" if f.statistics_flops_share is not None
           else (" (set statistics_flops_share to bound it)" if plan.statistics_share > 0.02 else "")),
        *([f"top-k solves ({f.eigensolver}, k={f.k}) for {len(top_k_inputs)} inputs: the time below is the model "
           f"beside a null space of C_task; refreshes of a full-rank C_task can take up to the full solve "
           f"({full_bound:.1f} s on rank {slowest.rank})"] if top_k_inputs else []),
        f"eigensolves per refresh: slowest owner rank {slowest.rank}, {slowest.solve_seconds:.1f} s "
        f"({f.solve_dtype}, {plan.solve_seconds_per_gflop:.3g} s per d³/1e9"
        + (", measured here; pass --solve-rate for the machine that will solve)" if s.solve_seconds_per_gflop is None
           else ")"),
    ]
    return "\n".join(lines)


def plan_from_files(model_config: str | Path, settings: PlanSettings, folora: FoLoRAConfig | Mapping) -> Plan:
    """``make_plan`` for a config.json path, a model folder or a shipped name."""
    folora = folora if isinstance(folora, FoLoRAConfig) else FoLoRAConfig(**folora)
    name = Path(str(model_config)).stem if str(model_config).endswith(".json") else Path(str(model_config)).name
    return make_plan(model_shape(load_model_config(model_config), folora, name=name), settings, folora)

"""A tiny language model of megatron-core's tensor-parallel linears with LoRA on all of them, and the plain
training loop the tensor-parallel tests run at every TP x DP (one process at TP = 1 is the reference).

    embed (frozen, whole) → per block: q/k/v column-parallel (one shared input) → gated causal mixing → o
    row-parallel → gate/up column-parallel (one shared input) → SiLU·up → down row-parallel → head (frozen)

Widths 24 (the column inputs) and 40 (down's input, split 20 | 20 at TP = 2); LoRA r = 5 with k = 5 stored
directions, so the projectors truncate. Every rank draws the same master weights and keeps its slice, so TP = 2
starts exactly where TP = 1 starts.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import SimpleNamespace

import torch
from torch import nn

from folora_ds.adapters.megatron import LoRAParallelLinear, parallel_state
from folora_ds.controller import FoLoRAController
from folora_ds.distributed import comm
from folora_ds.distributed.tensor_parallel import TensorParallelLayout
from folora_ds.method.config import FoLoRAConfig
from folora_ds.method.gated_adamw import GatedAdamW, folora_param_groups
from folora_ds.method.peft_layers import lora_layers, split_dimension

VOCAB, HIDDEN, FFN, LORA_RANK, LORA_ALPHA = 64, 24, 40, 5, 10.0
STEPS, MICRO_BATCHES, CLIP = 6, 4, 1.0
FOLORA = {"lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA, "k": 5, "refresh_interval": 4, "ema_decay": 0.5,
          "tau": 1.0, "statistics_dtype": "float64", "statistics_tokens": None}
ADAMW = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-3, "weight_decay": 0.01}


def _rms(hidden: torch.Tensor) -> torch.Tensor:
    return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)


class TinyParallelLM(nn.Module):
    """``forward(input_ids, attention_mask=None, labels=None)`` → ``.loss`` (next-token cross-entropy over the
    tokens with a label) and ``.logits``, as the controller's calibration and the training loop call it."""

    def __init__(self, tp_size: int, *, num_layers: int = 1, seed: int = 3) -> None:
        super().__init__()
        tensor_parallel = importlib.import_module("megatron.core.tensor_parallel")
        config = importlib.import_module("megatron.core").ModelParallelConfig(
            tensor_model_parallel_size=tp_size, use_cpu_initialization=True)
        torch.manual_seed(seed)

        def init(weight):
            return nn.init.normal_(weight, std=0.2)

        def column(d_in, d_out, lora_seed):
            return LoRAParallelLinear(tensor_parallel.ColumnParallelLinear(
                d_in, d_out, config=config, init_method=init, bias=False, gather_output=False),
                LORA_RANK, LORA_ALPHA, seed=lora_seed)

        def row(d_in, d_out, lora_seed):
            return LoRAParallelLinear(tensor_parallel.RowParallelLinear(
                d_in, d_out, config=config, init_method=init, bias=False, input_is_parallel=True,
                skip_bias_add=False), LORA_RANK, LORA_ALPHA, seed=lora_seed)

        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList()
        for index in range(num_layers):
            seed_base = 100 * index
            self.blocks.append(nn.ModuleDict({
                "q_proj": column(HIDDEN, HIDDEN, seed_base + 1), "k_proj": column(HIDDEN, HIDDEN, seed_base + 2),
                "v_proj": column(HIDDEN, HIDDEN, seed_base + 3), "o_proj": row(HIDDEN, HIDDEN, seed_base + 4),
                "gate_proj": column(HIDDEN, FFN, seed_base + 5), "up_proj": column(HIDDEN, FFN, seed_base + 6),
                "down_proj": row(FFN, HIDDEN, seed_base + 7)}))
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        for param in (*self.embed.parameters(), *self.head.parameters()):
            param.requires_grad_(False)

    def forward(self, input_ids, attention_mask=None, labels=None):
        hidden = self.embed(input_ids)  # (batch, seq, HIDDEN)
        positions = torch.arange(1, input_ids.shape[1] + 1, dtype=hidden.dtype).view(1, -1, 1)
        for block in self.blocks:
            x = _rms(hidden)
            q, k, v = (block[name](x)[0] for name in ("q_proj", "k_proj", "v_proj"))  # (batch, seq, HIDDEN / TP)
            mixed = (torch.tanh(q) * k).cumsum(dim=1) / positions + v  # causal, column by column
            hidden = hidden + block["o_proj"](mixed)[0]
            x = _rms(hidden)
            gated = nn.functional.silu(block["gate_proj"](x)[0]) * block["up_proj"](x)[0]
            hidden = hidden + block["down_proj"](gated)[0]
        logits = self.head(_rms(hidden))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                               ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


# ---------------------------------------------------------------------- data
def batch(seed: int) -> dict[str, torch.Tensor]:
    """Two sequences of 10 ids, one padded after 7 tokens; labels on the real tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[seed % 2, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def calibration(replica: int, replicas: int, count: int = 4) -> tuple[list, list]:
    """This replica's proxy (no labels) and task calibration batches."""
    mine = [i for i in range(count) if i % replicas == replica]
    proxy = [{k: v for k, v in batch(1000 + i).items() if k != "labels"} for i in mine]
    task = [batch(i) for i in mine]
    return proxy, task


# ---------------------------------------------------------------------- the loop
@dataclasses.dataclass(frozen=True)
class CountingLayout(TensorParallelLayout):
    """A layout whose TP sums record the shape of every tensor they all-reduce (the gate's r x k coordinates)."""

    reduces: list = dataclasses.field(default_factory=list)

    def sum_over_tp(self):
        inner = super().sum_over_tp()

        def counted(tensor):
            self.reduces.append(tuple(tensor.shape))
            return inner(tensor)

        return counted


def clip_gradients(model: nn.Module, max_norm: float, tp_group) -> None:
    """Clip the gradient norm of the trainable weights over the whole model: split weights' squares summed over
    TP, whole copies counted once (what DeepSpeed's norm does with the ``tensor_model_parallel`` attributes)."""
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    split = sum(p.grad.double().pow(2).sum() for p in params if getattr(p, "tensor_model_parallel", False))
    whole = sum(p.grad.double().pow(2).sum() for p in params if not getattr(p, "tensor_model_parallel", False))
    split = comm.all_reduce_sum(torch.as_tensor(split, dtype=torch.float64).clone(), tp_group)
    norm = float((split + whole).sqrt())
    if norm > max_norm:
        for param in params:
            param.grad.mul_(max_norm / (norm + 1e-6))


def whole_lora_weights(model: nn.Module, tp_group) -> dict[str, torch.Tensor]:
    """Every LoRA weight joined over TP (collective over ``tp_group``)."""
    weights = {}
    for name, layer in lora_layers(model).items():
        for part, tensor in (("lora_a", layer.lora_a), ("lora_b", layer.lora_b)):
            dim = split_dimension(layer, part)
            value = tensor.detach().clone()
            if dim is not None:
                value = torch.cat(comm.all_gather_objects(value, tp_group), dim=dim)
            weights[f"{name}.{part}"] = value
    return weights


def ds_config(replicas: int, stage: int = 0) -> dict:
    """The DeepSpeed config of ``train_with_engine``: MICRO_BATCHES micro-batches of 2 per step over the replicas
    (accumulated), clipping at CLIP, AdamW with ADAMW, FOLORA."""
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": MICRO_BATCHES // replicas,
            "gradient_clipping": CLIP, "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {**ADAMW, "betas": list(ADAMW["betas"])}}, "folora": FOLORA}


def train_with_engine(tp_size: int, stage: int = 0) -> dict:
    """``train``'s run through ``folora_ds.initialize(..., mpu=MegatronMpu())``: DeepSpeed reduces over the
    data-parallel group, accumulates and clips (its norm reads the tensor-parallel attributes)."""
    import folora_ds
    from folora_ds.adapters.megatron import MegatronMpu

    state = parallel_state()
    state.initialize_model_parallel(tensor_model_parallel_size=tp_size)
    try:
        replica, replicas = state.get_data_parallel_rank(), state.get_data_parallel_world_size()
        proxy, task = calibration(replica, replicas)
        engine, controller = folora_ds.initialize(TinyParallelLM(tp_size), ds_config(replicas, stage),
                                                  proxy_batches=proxy, task_batches=task, mpu=MegatronMpu())
        engine.train()
        for step in range(STEPS):
            for micro in range(replica, MICRO_BATCHES, replicas):
                data = batch(10_000 + step * MICRO_BATCHES + micro)
                with controller.track_task(data):
                    loss = engine(**data).loss
                engine.backward(loss)
                engine.step()
                controller.after_step()
        controller.check_gating()
        return {"weights": whole_lora_weights(engine.module, state.get_tensor_model_parallel_group()),
                "gated": controller.gated_step_counts(), "steps": controller.optimizer_steps,
                "refreshes": controller.refreshes, "dp": (engine.dp_world_size, replicas)}
    finally:
        state.destroy_model_parallel()


def train(tp_size: int, *, folora: dict | None = None) -> dict:
    """Build the model at TP = ``tp_size`` over this world, calibrate, solve, initialize, and train STEPS steps of
    MICRO_BATCHES micro-batches shared out over the replicas (gradients summed over DP, clipped over the whole
    model), refreshing on the way. Returns what the tests compare, from every rank."""
    state = parallel_state()
    state.initialize_model_parallel(tensor_model_parallel_size=tp_size)
    try:
        tp_group, dp_group = state.get_tensor_model_parallel_group(), state.get_data_parallel_group()
        replica, replicas = state.get_data_parallel_rank(), state.get_data_parallel_world_size()
        model = TinyParallelLM(tp_size)
        controller = FoLoRAController(model, FoLoRAConfig(**{**FOLORA, **(folora or {})}))
        controller.layout = CountingLayout(**{field.name: getattr(controller.layout, field.name)
                                              for field in dataclasses.fields(controller.layout)})
        controller.calibrate(*calibration(replica, replicas))
        controller.solve()
        controller.initialize_lora_a()
        optimizer = GatedAdamW(folora_param_groups(model, weight_decay=ADAMW["weight_decay"]), lr=ADAMW["lr"],
                               betas=ADAMW["betas"], eps=ADAMW["eps"])
        controller.attach(optimizer)
        model.train()
        for step in range(STEPS):
            for micro in range(replica, MICRO_BATCHES, replicas):
                data = batch(10_000 + step * MICRO_BATCHES + micro)
                with controller.track_task(data):
                    loss = model(**data).loss / MICRO_BATCHES
                loss.backward()
            for param in model.parameters():
                if param.requires_grad and param.grad is not None:
                    comm.all_reduce_sum(param.grad, dp_group)
            clip_gradients(model, CLIP, tp_group)
            optimizer.step()
            optimizer.zero_grad()
            controller.after_step()
        controller.check_gating()
        window = {key: (int(sums.tokens), sums.sum.clone()) for key, sums in controller.collector.sums("task").items()}
        return {"weights": whole_lora_weights(model, tp_group), "gated": controller.gated_step_counts(),
                "steps": controller.optimizer_steps, "refreshes": controller.refreshes,
                "pre": dict(controller.pre_covariances), "window": window,
                "gates": {key: projector.gates.clone() for key, projector in controller.owned_projectors.items()},
                "local_a": {name: layer.lora_a.detach().clone() for name, layer in lora_layers(model).items()},
                "reduces": controller.layout.reduces, "tp_rank": state.get_tensor_model_parallel_rank(),
                "replica": replica,
                "forgetting": controller.measured_forgetting(), "layout": controller.layout.tp_size}
    finally:
        state.destroy_model_parallel()

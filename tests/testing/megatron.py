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


def _project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A projection's output: megatron's parallel linears return ``(output, bias)``, torch's a tensor."""
    output = layer(x)
    return output[0] if isinstance(output, tuple) else output


class TinyLM(nn.Module):
    """The unsharded twin: the same module tree with ``nn.Linear`` projections (``PROJECTIONS``), on which the
    exported adapter loads with ``PeftModel.from_pretrained``; weights come from ``whole_base_weights``.

    ``forward(input_ids, attention_mask=None, labels=None)`` → ``.loss`` (next-token cross-entropy over the tokens
    with a label) and ``.logits``, as the controller's calibration and the training loop call it."""

    def __init__(self, num_layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(nn.ModuleDict({name: nn.Linear(d_in, d_out, bias=False)
                                                   for name, (d_in, d_out, _) in PROJECTIONS.items()})
                                    for _ in range(num_layers))
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, labels=None):
        hidden = self.embed(input_ids)  # (batch, seq, HIDDEN)
        positions = torch.arange(1, input_ids.shape[1] + 1, dtype=hidden.dtype).view(1, -1, 1)
        for block in self.blocks:
            x = _rms(hidden)
            q, k, v = (_project(block[name], x) for name in ("q_proj", "k_proj", "v_proj"))  # (.., HIDDEN / TP)
            mixed = (torch.tanh(q) * k).cumsum(dim=1) / positions + v  # causal, column by column
            hidden = hidden + _project(block["o_proj"], mixed)
            x = _rms(hidden)
            gated = nn.functional.silu(_project(block["gate_proj"], x)) * _project(block["up_proj"], x)
            hidden = hidden + _project(block["down_proj"], gated)
        logits = self.head(_rms(hidden))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                               ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


PROJECTIONS = {"q_proj": (HIDDEN, HIDDEN, "column"), "k_proj": (HIDDEN, HIDDEN, "column"),
               "v_proj": (HIDDEN, HIDDEN, "column"), "o_proj": (HIDDEN, HIDDEN, "row"),
               "gate_proj": (HIDDEN, FFN, "column"), "up_proj": (HIDDEN, FFN, "column"),
               "down_proj": (FFN, HIDDEN, "row")}


class TinyParallelLM(TinyLM):
    """``TinyLM`` with megatron-core's Column/RowParallelLinear projections, each adapted by ``LoRAParallelLinear``."""

    def __init__(self, tp_size: int, *, num_layers: int = 1, seed: int = 3) -> None:
        nn.Module.__init__(self)
        tensor_parallel = importlib.import_module("megatron.core.tensor_parallel")
        config = importlib.import_module("megatron.core").ModelParallelConfig(
            tensor_model_parallel_size=tp_size, use_cpu_initialization=True)
        torch.manual_seed(seed)

        def init(weight):
            return nn.init.normal_(weight, std=0.2)

        def projection(d_in, d_out, kind, lora_seed):
            base = (tensor_parallel.ColumnParallelLinear(d_in, d_out, config=config, init_method=init, bias=False,
                                                         gather_output=False) if kind == "column" else
                    tensor_parallel.RowParallelLinear(d_in, d_out, config=config, init_method=init, bias=False,
                                                      input_is_parallel=True, skip_bias_add=False))
            return LoRAParallelLinear(base, LORA_RANK, LORA_ALPHA, seed=lora_seed)

        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({name: projection(d_in, d_out, kind, 100 * index + number)
                           for number, (name, (d_in, d_out, kind)) in enumerate(PROJECTIONS.items(), start=1)})
            for index in range(num_layers))
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        for param in (*self.embed.parameters(), *self.head.parameters()):
            param.requires_grad_(False)


def whole_base_weights(model: TinyParallelLM, tp_group) -> dict[str, torch.Tensor]:
    """``model``'s frozen weights as ``TinyLM``'s state dict (the TP shards joined; collective over TP)."""
    state = {"embed.weight": model.embed.weight.detach().clone(), "head.weight": model.head.weight.detach().clone()}
    for index, block in enumerate(model.blocks):
        for name, layer in block.items():
            dim = split_dimension(layer, "base")
            state[f"blocks.{index}.{name}.weight"] = torch.cat(
                comm.all_gather_objects(layer.base.weight.detach().clone(), tp_group), dim=dim)
    return state


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
    """Every LoRA weight gathered over DP (ZeRO-3) and joined over TP (collective)."""
    weights = {}
    for name, layer in lora_layers(model).items():
        for part, tensor in (("lora_a", layer.lora_a), ("lora_b", layer.lora_b)):
            dim = split_dimension(layer, part)
            with comm.gathered([tensor]):  # ZeRO-3 partitions over DP
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


def train_with_engine(tp_size: int, stage: int = 0, *, first: int = 0, last: int = STEPS, save_to=None,
                      resume_from=None, export_to=None) -> dict:
    """``train``'s run (steps ``first``..``last`` − 1) through ``folora_ds.initialize(..., mpu=MegatronMpu())``:
    DeepSpeed reduces over the data-parallel group, accumulates and clips (its norm reads the tensor-parallel
    attributes). Optionally resumes from / saves a checkpoint and exports the adapter at the end."""
    import folora_ds
    from folora_ds.adapters.megatron import MegatronMpu

    state = parallel_state()
    state.initialize_model_parallel(tensor_model_parallel_size=tp_size)
    try:
        replica, replicas = state.get_data_parallel_rank(), state.get_data_parallel_world_size()
        model, config = TinyParallelLM(tp_size), ds_config(replicas, stage)
        if resume_from is None:
            proxy, task = calibration(replica, replicas)
            engine, controller = folora_ds.initialize(model, config, proxy_batches=proxy, task_batches=task,
                                                      mpu=MegatronMpu())
        else:
            engine, controller = folora_ds.initialize(model, config, resume_from=resume_from, mpu=MegatronMpu())
        engine.train()
        for step in range(first, last):
            for micro in range(replica, MICRO_BATCHES, replicas):
                data = batch(10_000 + step * MICRO_BATCHES + micro)
                with controller.track_task(data):
                    loss = engine(**data).loss
                engine.backward(loss)
                engine.step()
                controller.after_step()
        controller.check_gating()
        if save_to is not None:
            controller.save_checkpoint(save_to)
        if export_to is not None:
            controller.export_adapter(export_to)
        local_a = {}
        for name, layer in lora_layers(engine.module).items():
            with comm.gathered([layer.lora_a]):  # ZeRO-3 partitions over DP
                local_a[name] = layer.lora_a.detach().clone()
        return {"weights": whole_lora_weights(engine.module, state.get_tensor_model_parallel_group()),
                "gated": controller.gated_step_counts(), "steps": controller.optimizer_steps,
                "refreshes": controller.refreshes, "dp": (engine.dp_world_size, replicas),
                "pre": dict(controller.pre_covariances), "local_a": local_a, "replica": replica,
                "tp_rank": state.get_tensor_model_parallel_rank(),
                "gates": {key: projector.gates.clone() for key, projector in controller.owned_projectors.items()}}
    finally:
        state.destroy_model_parallel()


def resume_error(tp_size: int, folder) -> str:
    """What ``folora_ds.initialize`` says when resuming ``folder`` at TP = ``tp_size`` (before any engine)."""
    try:
        train_with_engine(tp_size, resume_from=folder, first=0, last=0)
    except ValueError as error:
        return str(error)
    return "not refused"


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
                "forgetting": controller.measured_forgetting(), "layout": controller.layout.tp_size,
                "twin": whole_base_weights(model, tp_group), "probe_logits": model(**batch(99)).logits.detach()}
    finally:
        state.destroy_model_parallel()

"""FoLoRA under Megatron tensor parallelism with DeepSpeed ZeRO over the data-parallel group, on CPU or GPU.

    torchrun --nproc_per_node 4 launch/megatron_tp.py --tp 2 --output out/megatron          # TP = 2 x DP = 2
    deepspeed --num_gpus 4 launch/megatron_tp.py --tp 2 --output out/megatron               # (the deepspeed launcher)
    torchrun --nproc_per_node 2 launch/megatron_tp.py --tp 2 --method plain --output out/plain

A small Llama (byte tokenizer, random weights, ``--layers`` / ``--hidden`` / ``--heads``) is built on every rank
and split over the TP group (``ParallelLlamaForCausalLM``: megatron-core's Column/RowParallelLinear, Hugging Face
Llama's math and names). Each replica samples its share of the proxy set from the model itself, calibrates on the
built-in number-words task, and trains ``--steps`` optimizer steps (``--micro-batch`` x ``--accumulation`` per
replica) with FoLoRA's gated AdamW (``--method folora``) or plain AdamW (``--method plain``, the baseline the
benchmark compares with). At the end: the gated-step check, the exported peft adapter (TP shards joined; it
loads on the unsharded Hugging Face model, checked here on rank 0), and ``summary.json`` with the step times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import folora_ds
from folora_ds.adapters.megatron import MegatronMpu, parallel_state
from folora_ds.adapters.megatron.llama import parallel_llama_from_hf
from folora_ds.controller.proxy import calibration_batches, sample_proxy
from folora_ds.distributed import comm
from folora_ds.method.config import FoLoRAConfig
from folora_ds.training.data import TaskCollator, tokenize_record
from folora_ds.training.models import build_byte_tokenizer, build_tiny_llama
from folora_ds.training.tasks import generate_number_words_records


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size (divides the world size)")
    parser.add_argument("--stage", type=int, default=1, choices=(0, 1, 2), help="ZeRO stage over data parallelism")
    parser.add_argument("--method", choices=("folora", "plain"), default="folora")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--records", type=int, default=256, help="number-words training records")
    parser.add_argument("--proxy-sequences", type=int, default=16)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    comm.init_distributed()
    world = comm.world_size()
    if world % args.tp:
        raise SystemExit(f"--tp {args.tp} does not divide the world size {world}")
    state = parallel_state()
    state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    replica, replicas, rank = state.get_data_parallel_rank(), state.get_data_parallel_world_size(), comm.rank()
    torch.manual_seed(0)
    tokenizer = build_byte_tokenizer()
    hf_model = build_tiny_llama(len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 5 // 2,
                                num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.heads // 2, seed=0,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    folora = FoLoRAConfig(lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank, k=32, refresh_interval=10,
                          proxy={"num_sequences": args.proxy_sequences, "seq_len": 48, "batch_size": 8})
    model = parallel_llama_from_hf(hf_model, lora_rank=folora.lora_rank, lora_alpha=folora.lora_alpha)
    records = generate_number_words_records(args.records, seed=0)
    examples = [tokenize_record(record, tokenizer, max_length=64) for record in records]
    collate = TaskCollator(tokenizer.pad_token_id)
    per_step = args.micro_batch * args.accumulation * replicas

    def micro_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``micro`` of this replica at ``step`` (replicas take disjoint slots of the step's batch)."""
        first = step * per_step + (micro * replicas + replica) * args.micro_batch
        return collate([examples[(first + i) % len(examples)] for i in range(args.micro_batch)])

    config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": args.accumulation,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": args.stage}, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.0}}}
    controller = None
    if args.method == "folora":
        proxy = sample_proxy(hf_model, tokenizer, folora.proxy, rank=replica, world_size=replicas)
        task = [micro_batch(-1 - i, 0) for i in range(2)]
        engine, controller = folora_ds.initialize(model, {**config, "folora": folora.to_dict()},
                                                  proxy_batches=calibration_batches(proxy, tokenizer, folora),
                                                  task_batches=task, mpu=MegatronMpu())
    else:
        import deepspeed

        trainable = [param for param in model.parameters() if param.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)  # what GatedAdamW is ungated
        plain_config = {key: value for key, value in config.items() if key != "optimizer"}
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=plain_config, mpu=MegatronMpu())
    engine.train()
    step_seconds, losses = [], []
    for step in range(args.steps):
        started = time.perf_counter()
        for micro in range(args.accumulation):
            data = micro_batch(step, micro)
            if controller is None:
                loss = engine(**data).loss
            else:
                with controller.track_task(data):
                    loss = engine(**data).loss
            engine.backward(loss)
            engine.step()
            if controller is not None:
                controller.after_step()
        step_seconds.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
        if rank == 0 and (step % 5 == 4 or step == args.steps - 1):
            print(f"[megatron_tp] step {step + 1}/{args.steps} loss {losses[-1]:.3f} "
                  f"({step_seconds[-1]:.3f} s/step)", flush=True)
    summary = {"method": args.method, "tp": args.tp, "dp": replicas, "stage": args.stage, "steps": args.steps,
               "first_loss": losses[0], "last_loss": losses[-1],
               "seconds_per_step": sorted(step_seconds[1:] or step_seconds)[len(step_seconds[1:] or step_seconds) // 2]}
    if controller is not None:
        controller.check_gating()  # every optimizer step gated on every rank, or this raises
        summary.update(gated_steps=min(controller.gated_step_counts()), refreshes=controller.refreshes,
                       relative_forgetting=controller.measured_forgetting())
        controller.export_adapter(args.output / "adapter")
        probe = micro_batch(0, 0)
        model.eval()
        with torch.no_grad():  # every TP rank runs the forward (row-parallel layers all-reduce)
            logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        if rank == 0:
            summary["adapter_check"] = check_adapter(hf_model, args.output / "adapter", logits, probe)
    if rank == 0:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary), flush=True)
    comm.barrier()
    state.destroy_model_parallel()
    comm.shutdown()
    return 0


def check_adapter(hf_model, adapter: Path, ours: torch.Tensor, data: dict[str, torch.Tensor]) -> float:
    """The exported adapter on the unsharded Hugging Face model: the largest difference of its logits from the
    tensor-parallel model's ``ours`` (whole on every TP rank), on the real tokens of ``data``."""
    from peft import PeftModel

    with torch.no_grad():
        adapted = PeftModel.from_pretrained(hf_model, str(adapter)).eval()
        theirs = adapted(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    valid = data["attention_mask"].bool()
    return float((ours - theirs)[valid].abs().max())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""DeepSpeed training step with FoLoRA ÷ the same step with plain AdamW, same ZeRO stage, same ranks, same run.

Starts ``--world`` gloo ranks on this machine (CPU) or uses the launcher's ranks when started by
``deepspeed``/``torchrun`` (GPU). Each rank builds the same Llama-style model (random weights, built from a config)
with LoRA on all linear layers, then times, alternating step by step:
  - plain: ``deepspeed.initialize`` with ``torch.optim.AdamW`` (forward + backward + step),
  - FoLoRA: ``folora_ds.initialize`` (forward with C_task hooks, token rows to owners + backward + gated step), no
    refresh inside the timed steps; one refresh (fold, solves, delivery) is timed on its own.
It also times an exact statistics pass (forward with the collector, every token) against a plain forward, and
reports the token-row bytes each rank sends per training micro-batch and the statistics each rank holds against
``folora-ds plan``'s figures.

    python benchmarks/training_step.py --stage 2 --world 2
    python benchmarks/training_step.py --stage 3 --world 2 --hidden 4096 --intermediate 11008 --heads 32 \
        --kv-heads 32 --layers 1 --batch 1 --seq 256 --steps 4 --no-pass          # one Llama-2-7B block
    torchrun --nproc_per_node 8 benchmarks/training_step.py --stage 2 --hidden 4096 --layers 4 ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from folora_ds.method.config import FoLoRAConfig


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _model(args, ds_config: dict | None = None):
    """The peft model; at ZeRO-3 (``ds_config`` given) the base is built under ``deepspeed.zero.Init``, so no rank
    ever holds it whole (as 70B models are loaded)."""
    import contextlib

    import deepspeed
    from peft import LoraConfig, get_peft_model

    from folora_ds.training.models import build_tiny_llama

    partitioned = deepspeed.zero.Init(config_dict_or_path=ds_config) if ds_config else contextlib.nullcontext()
    with partitioned:
        base = build_tiny_llama(args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads, seed=0)
    torch.manual_seed(0)
    return get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))


def _batch(args, seed: int, device):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}


def _use_synthetic_bases() -> None:
    """Replace the eigensolve by a random orthonormal (d, k) basis with gates 0.5: the training step's cost depends
    on k and d only, and a d = 28672 solve takes over an hour on 2 cores (``benchmarks/eigensolve.py`` times it)."""
    from folora_ds.method.projector import Projector
    from folora_ds.method.spectral import SolveReport, SpectralSolver

    def solve(self, key, c_task, c_pre, *, tau_scale=1.0):
        d = c_pre.shape[0]
        k = min(self.config.k or d, d)
        basis, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(d)))
        gates = torch.full((k,), 0.5)
        projector = Projector(basis, basis.clone(), gates, 1.0)
        report = SolveReport(key, torch.zeros(d), gates, 1.0, 0.0, failed=False, consecutive_failures=0, stored=k)
        self._projectors[key], self._reports[key], self._consecutive_failures[key] = projector, report, 0
        return projector, report

    SpectralSolver.solve = solve


def _bench(rank: int, world: int, args) -> None:
    import deepspeed

    import folora_ds.adapters.engine
    from folora_ds.distributed import comm
    from folora_ds.method.covariance import CovarianceCollector
    from folora_ds.training.plan import PlanSettings, make_plan, model_shape

    if args.synthetic_bases:
        _use_synthetic_bases()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    ds_config = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": args.stage}, "bf16": {"enabled": args.precision == "bf16"}}
    partitioned = ds_config if args.stage == 3 else None
    model = _model(args).to(device) if not args.no_pass else None

    # statistics pass vs plain forward (no grad), alternating
    probe = _batch(args, 1, device)
    collector = CovarianceCollector(model) if model is not None else None
    stats_times, plain_times = [], []
    with torch.no_grad():
        for repeat in range(0 if args.no_pass else args.warmup + args.steps):
            _sync()
            start = time.perf_counter()
            model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"])
            _sync()
            middle = time.perf_counter()
            with collector.collect("task", attention_mask=probe["attention_mask"]):
                model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"])
            _sync()
            if repeat >= args.warmup:
                plain_times.append(middle - start)
                stats_times.append(time.perf_counter() - middle)
    if collector is not None:
        collector.remove()
    del model, collector  # each engine gets its own copy, built from the same seed (large blocks: memory)

    plain_model = _model(args, partitioned).to(device)
    if args.stage == 0:
        plain_model = plain_model.to(dtype)
    plain_engine, *_ = deepspeed.initialize(
        model=plain_model, config=ds_config,
        optimizer=torch.optim.AdamW([p for p in plain_model.parameters() if p.requires_grad], lr=1e-4))
    folora_config = {**ds_config, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                     "folora": {"lora_rank": args.rank, "lora_alpha": 2 * args.rank, "k": args.k,
                                "refresh_interval": 0,
                                "statistics_tokens": args.statistics_tokens or None,
                                "statistics_flops_share": args.statistics_share}}
    folora_engine, controller = folora_ds.adapters.engine.initialize(
        _model(args, partitioned).to(device), folora_config, proxy_batches=[_batch(args, 100 + rank, device)],
        task_batches=[_batch(args, 200 + rank, device)])
    exchange = controller.collector._exchange
    sent_before = exchange.bytes_sent

    def step(engine, batch, track):
        _sync()
        start = time.perf_counter()
        if track:
            with controller.track_task(batch):
                loss = engine(**batch).loss
        else:
            loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        if track:
            controller.after_step()
        _sync()
        return time.perf_counter() - start

    plain_steps, folora_steps = [], []
    batches = [_batch(args, 1000 + index * world + rank, device) for index in range(args.warmup + args.steps)]
    if args.order == "phases":  # every plain step, then every FoLoRA step: as two separate runs would
        plain_steps = [step(plain_engine, batch, False) for batch in batches][args.warmup:]
        folora_steps = [step(folora_engine, batch, True) for batch in batches][args.warmup:]
    else:
        for index, batch in enumerate(batches):
            pair = (step(plain_engine, batch, False), step(folora_engine, batch, True))
            if index >= args.warmup:
                plain_steps.append(pair[0])
                folora_steps.append(pair[1])
    controller.check_gating()
    sent_per_micro_batch = (exchange.bytes_sent - sent_before) / (args.warmup + args.steps)
    statistics_held = controller.statistics_bytes()
    comm.barrier()
    _sync()
    start = time.perf_counter()
    controller._fold_task_window()
    controller.solve()
    controller._deliver()
    _sync()
    refresh_seconds = time.perf_counter() - start
    held = comm.all_gather_objects(controller.projector_bytes())
    sent = comm.all_gather_objects(sent_per_micro_batch)
    statistics_held = comm.all_gather_objects(statistics_held)
    peak_rss = comm.all_gather_objects(_peak_rss())
    if rank == 0:
        dims = controller.dims
        shape = model_shape(folora_engine.module.base_model.model.config, FoLoRAConfig(**folora_config["folora"]))
        plan = make_plan(shape, PlanSettings(world_size=world, zero_stage=args.stage, model_dtype={
            "fp32": "float32", "bf16": "bfloat16"}[args.precision], micro_batch=args.batch, seq_len=args.seq,
            solve_seconds_per_gflop=1.0), FoLoRAConfig(**folora_config["folora"]))
        plain_step, folora_step = statistics.median(plain_steps), statistics.median(folora_steps)
        print(f"device={device} world={world} ZeRO-{args.stage} {args.precision} hidden={args.hidden} "
              f"layers={args.layers} r={args.rank} k={args.k} batch={args.batch}x{args.seq} steps={args.steps} "
              f"statistics_tokens={args.statistics_tokens or 'all'}")
        fitted = controller.statistics_schedule
        print(f"statistics: {fitted.tokens or 'every'} tokens on one micro-batch in {fitted.every} "
              f"(statistics_flops_share {args.statistics_share}; plan: {plan.statistics_share:.2%} of the step, "
              f"{plan.configured_statistics_share:.2%} as configured)")
        plain_mean, folora_mean = statistics.fmean(plain_steps), statistics.fmean(folora_steps)
        print(f"training step: AdamW {plain_step * 1e3:.1f} ms, FoLoRA {folora_step * 1e3:.1f} ms, "
              f"ratio {folora_step / plain_step:.3f} (medians); means {plain_mean * 1e3:.1f} / "
              f"{folora_mean * 1e3:.1f} ms, ratio {folora_mean / plain_mean:.3f} (what a schedule that collects on "
              "one micro-batch in several costs on average)")
        if stats_times:
            print(f"exact statistics pass ÷ plain forward: "
                  f"{statistics.median(stats_times) / statistics.median(plain_times):.3f} "
                  f"({statistics.median(stats_times) * 1e3:.1f} ms vs {statistics.median(plain_times) * 1e3:.1f} ms)")
        print(f"one refresh (fold + {'synthetic bases' if args.synthetic_bases else 'solve'} + deliver): "
              f"{refresh_seconds * 1e3:.1f} ms "
              f"= {refresh_seconds / plain_step:.2f} plain steps")
        print(f"token rows sent per rank and training micro-batch: {[f'{b / 2**20:.2f} MiB' for b in sent]} "
              f"(plan: {plan.bytes_per_collecting_micro_batch / 2**20:.2f} MiB on average)")
        print(f"statistics held per rank: {[f'{b / 2**20:.1f} MiB' for b in statistics_held]} (plan: "
              f"{[f'{r.statistics_training / 2**20:.1f} MiB' for r in plan.ranks]}; replicated before: "
              f"{plan.replicated_statistics / 2**20:.1f} MiB on every rank)")
        print(f"peak resident memory per rank (both engines): {[f'{b / 2**30:.2f} GiB' for b in peak_rss]}; plan "
              f"peak of the FoLoRA engine without activations: {[f'{r.peak / 2**30:.2f} GiB' for r in plan.ranks]}")
        full_copy = sum(d * min(d, args.k or d) * 2 * 4 + min(d, args.k or d) * 4 for d in dims.values())
        print(f"projector bytes held per rank: {held} (one full copy: {full_copy}; "
              f"sum/copy = {sum(held) / full_copy:.2f})")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "device": str(device), "world": world, "stage": args.stage, "precision": args.precision,
                "hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "rank": args.rank,
                "k": args.k, "batch": args.batch, "seq": args.seq, "adamw_ms": plain_step * 1e3,
                "folora_ms": folora_step * 1e3, "ratio": folora_step / plain_step,
                "mean_ratio": folora_mean / plain_mean,
                "refresh_ms": refresh_seconds * 1e3, "statistics_share": args.statistics_share,
                "statistics_schedule": [fitted.tokens, fitted.every],
                "gated_steps": sorted(set(controller.gated_step_counts()))}, indent=1))


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _spawned(rank: int, world: int, port: int, args) -> None:
    import datetime
    import importlib

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=300))
    _bench(rank, world, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--world", type=int, default=2, help="ranks to spawn when not started by a launcher")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-pass", action="store_true", help="skip the exact statistics pass timing")
    parser.add_argument("--json", help="rank 0 also writes the step times here")
    parser.add_argument("--synthetic-bases", action="store_true", help="random orthonormal bases instead of "
                        "eigensolves (real block widths: a d = 28672 solve takes over an hour on 2 cores)")
    parser.add_argument("--statistics-tokens", type=int, default=FoLoRAConfig().statistics_tokens,
                        help="tokens per input and micro-batch counted towards C_task (0: every token, exact)")
    parser.add_argument("--order", choices=["alternate", "phases"], default="alternate",
                        help="alternate the two engines' steps on the same batches (default), or run every plain step "
                             "first and then every FoLoRA step, as two separate runs would (a check that one engine's "
                             "step does not pay for the other's)")
    parser.add_argument("--statistics-share", type=float, default=None,
                        help="statistics_flops_share: fit the statistics into this share of the step's flops")
    args = parser.parse_args()
    if "RANK" in os.environ:  # started by a launcher
        from folora_ds.distributed import comm

        comm.init_distributed()
        _bench(comm.rank(), comm.world_size(), args)
        return
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_spawned, args=(args.world, port, args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()

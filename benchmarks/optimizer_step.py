"""GatedAdamW step time ÷ torch.optim.AdamW step time, measured in the same run, at LoRA shapes.

Each "module" holds a LoRA-A (r, d) with a rank-k projector and a LoRA-B (d, r), as in every linear of a
7B-class model (d = 4096). Both optimizers step the same parameters with the same gradients; the time of
``optimizer.step()`` alone is measured (median over ``--steps`` after ``--warmup``), alternating the two
optimizers so that machine noise hits both alike.

    python benchmarks/optimizer_step.py                      # r=16, d=4096, 32 modules, k in {64, 256}
    python benchmarks/optimizer_step.py --device cuda --modules 224
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from folora_ds.method.gated_adamw import GatedAdamW
from folora_ds.method.projector import Projector


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_step(optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    optimizer.step()
    _sync(device)
    return time.perf_counter() - start


def _random_projector(d: int, k: int, device: torch.device, dtype: torch.dtype, generator: torch.Generator):
    v = torch.randn(d, k, generator=generator, device="cpu").to(device, dtype) / d**0.5
    c_tilde_v = torch.randn(d, k, generator=generator, device="cpu").to(device, dtype) / d**0.5
    gates = torch.rand(k, generator=generator, device="cpu").to(device, dtype)
    return Projector(c_tilde_v, v, gates)


def measure(*, d: int, r: int, modules: int, k: int, steps: int, warmup: int, device: torch.device,
            dtype: torch.dtype, foreach_baseline: bool) -> dict:
    """Median step seconds of AdamW and GatedAdamW (both on identical params/grads) and their ratio."""
    generator = torch.Generator().manual_seed(0)
    lora_a = [torch.randn(r, d, generator=generator).to(device, dtype) for _ in range(modules)]
    lora_b = [torch.randn(d, r, generator=generator).to(device, dtype) for _ in range(modules)]

    def make_params():
        params_a = [torch.nn.Parameter(t.clone()) for t in lora_a]
        params_b = [torch.nn.Parameter(t.clone()) for t in lora_b]
        for param in params_a + params_b:
            param.grad = torch.randn_like(param)
        return params_a, params_b

    plain_a, plain_b = make_params()
    plain = torch.optim.AdamW(plain_a + plain_b, lr=1e-4, weight_decay=0.0, foreach=foreach_baseline)
    gated_a, gated_b = make_params()
    gated = GatedAdamW([{"params": gated_a, "gated": True}, {"params": gated_b}], lr=1e-4, weight_decay=0.0)
    for param in gated_a:
        gated.set_projector(param, _random_projector(d, k, device, dtype, generator))
    plain_times, gated_times = [], []
    for step in range(warmup + steps):
        plain_seconds = _time_step(plain, device)
        gated_seconds = _time_step(gated, device)
        if step >= warmup:
            plain_times.append(plain_seconds)
            gated_times.append(gated_seconds)
    counts = set(gated.gated_step_counts().values())
    assert counts == {warmup + steps}, f"gated steps {counts} != {warmup + steps}: gating did not run every step"
    plain_median, gated_median = statistics.median(plain_times), statistics.median(gated_times)
    projector_bytes = modules * (2 * d * k + k) * torch.finfo(dtype).bits // 8
    return {"k": k, "adamw_ms": plain_median * 1e3, "gated_ms": gated_median * 1e3,
            "ratio": gated_median / plain_median, "projector_MiB": projector_bytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--modules", type=int, default=32)
    parser.add_argument("--k", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--no-foreach", action="store_true", help="baseline AdamW with foreach=False")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads) dtype={args.dtype} r={args.r} d={args.d} modules={args.modules} "
          f"steps={args.steps} baseline=AdamW(foreach={not args.no_foreach})")
    print(f"{'k':>5} {'AdamW ms':>10} {'Gated ms':>10} {'ratio':>7} {'projectors MiB':>15}")
    rows = []
    for k in args.k:
        row = measure(d=args.d, r=args.r, modules=args.modules, k=k, steps=args.steps, warmup=args.warmup,
                      device=device, dtype=dtype, foreach_baseline=not args.no_foreach)
        rows.append({**row, "d": args.d, "r": args.r, "modules": args.modules, "dtype": args.dtype,
                     "device": str(device)})
        print(f"{row['k']:>5} {row['adamw_ms']:>10.2f} {row['gated_ms']:>10.2f} {row['ratio']:>7.2f} "
              f"{row['projector_MiB']:>15.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""What one flop of the running C_task costs against one flop of the model, on this device.

The statistics budget (``statistics_flops_share``, ``method/statistics_cost.py``) counts flops: the owner of an
input of width d folds the n gathered token rows of a collecting micro-batch into its (d, d) sums, 2·n·d² flops in
``statistics_dtype`` (float32), against the model's 4·P·T flops per micro-batch. That equates a flop of a skinny
(d, n) × (n, d) update in float32 with a flop of the model's (T, d) × (d, d_out) GEMMs in their own dtype (bf16 for
the 70B rows). This script times both on the device and prints their rates and the ratio, the factor by which the
flop share understates the statistics' share of the step's time:

    python benchmarks/statistics_update.py                                  # 70B widths, rows 32 / 128 / 512
    python benchmarks/statistics_update.py --device cuda --threads 0        # a GPU (fp32 with and without TF32)

One thread by default, as each gloo rank of the training-step benchmark runs (``--threads 0``: torch's default).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _seconds(operation, repeats: int, device: str) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call."""
    operation()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        operation()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def statistics_rate(dim: int, rows: int, device: str, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of ``sums += xᵀx`` for x (rows, dim): the owner's fold of one collecting micro-batch."""
    sums = torch.zeros(dim, dim, dtype=dtype, device=device)
    rows_block = torch.randn(rows, dim, dtype=dtype, device=device)
    seconds = _seconds(lambda: sums.addmm_(rows_block.mT, rows_block), repeats, device)
    return 2 * rows * dim * dim / seconds / 1e9


def model_rate(tokens: int, dim_in: int, dim_out: int, dtype: torch.dtype, device: str, repeats: int) -> float:
    """GFLOP/s of one (tokens, dim_in) × (dim_in, dim_out) GEMM in ``dtype``: a model linear's forward."""
    weight = torch.randn(dim_out, dim_in, dtype=dtype, device=device)
    inputs = torch.randn(tokens, dim_in, dtype=dtype, device=device)
    seconds = _seconds(lambda: inputs @ weight.mT, repeats, device)
    return 2 * tokens * dim_in * dim_out / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[8192, 28672], help="input widths of the sums")
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 128, 512],
                        help="rows folded at once (statistics_tokens × ranks gathered to the owner)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per micro-batch of the model GEMM")
    parser.add_argument("--model-shape", type=int, nargs=2, default=[8192, 28672], metavar=("IN", "OUT"),
                        help="the model GEMM's weight (default: a 70B block's up projection)")
    parser.add_argument("--model-dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tf32_modes = [False, True] if args.device == "cuda" else [False]
    result: dict = {"device": args.device, "threads": torch.get_num_threads(), "model": {}, "statistics": []}
    for name in args.model_dtypes:
        rate = model_rate(args.tokens, *args.model_shape, getattr(torch, name), args.device, args.repeats)
        result["model"][name] = rate
        print(f"model GEMM {args.tokens} x {args.model_shape[0]} x {args.model_shape[1]} in {name}: {rate:.1f} GFLOP/s",
              flush=True)
    for tf32 in tf32_modes:
        if args.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
        for dim in args.dims:
            for rows in args.rows:
                rate = statistics_rate(dim, rows, args.device, args.repeats)
                ratios = {name: model / rate for name, model in result["model"].items()}
                result["statistics"].append({"dim": dim, "rows": rows, "tf32": tf32, "gflops": rate,
                                             "cost_per_flop_vs_model": ratios})
                print(f"statistics d={dim} rows={rows}{' tf32' if tf32 else ''}: {rate:.1f} GFLOP/s; one of its "
                      "flops costs " + ", ".join(f"{ratio:.2f}x a {name} model flop" for name, ratio in ratios.items()),
                      flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()

"""Generalized eigensolve time and memory (FoLoRA's solver) for d = 1024–4096, fitted as c·d³ and extrapolated.

The statistics are float32 (as the collector keeps them) and the solve runs in each dtype. Each (dtype, d) runs in a
fresh subprocess so that its peak memory is its own: time of
``solve_generalized_eigenproblem`` (Cholesky with ridge, whitening, symmetric eigendecomposition, back-substitution;
the best of ``--repeats``) and the peak resident memory the solve added, in (d, d) matrices of the solve dtype.
The fit c = Σ t·d³ / Σ d⁶ gives the seconds per d³/10⁹ that ``folora-ds plan --solve-rate`` takes.

    python benchmarks/eigensolve.py                     # CPU here
    python benchmarks/eigensolve.py --device cuda --dims 2048 4096 8192
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

EXTRAPOLATE = (8192, 14336, 28672)


def _one(dim: int, dtype_name: str, device: str, repeats: int) -> dict:
    import resource
    import time

    import torch

    from folora_ds.method.eigensolve import solve_generalized_eigenproblem

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(dim)
    x = torch.randn(2 * dim, dim, generator=generator)  # float32 statistics, as the collector keeps them
    c_pre = (x.T @ x / (2 * dim)).to(device)
    y = torch.randn(dim // 4, dim, generator=generator)  # a low-rank task covariance
    c_task = (y.T @ y / dim).to(device)
    del x, y
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        solve_generalized_eigenproblem(c_task, c_pre, solve_dtype=dtype, retry_float64=False)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    if device == "cuda":
        added = torch.cuda.max_memory_allocated() - 2 * dim * dim * 4
    else:
        added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"dim": dim, "dtype": dtype_name, "seconds": best,
            "workspace_matrices": added / (dim * dim * dtype.itemsize)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 2048, 3072, 4096])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(int(args.one[0]), args.one[1], args.device, args.repeats)))
        return
    import torch

    print(f"device={args.device} threads={torch.get_num_threads()}")
    for dtype in args.dtypes:
        rows = []
        for dim in args.dims:
            out = subprocess.run([sys.executable, __file__, "--one", str(dim), dtype, "--device", args.device,
                                  "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            row = rows[-1]
            print(f"{dtype} d={dim}: {row['seconds']:.2f} s, workspace ≈ {row['workspace_matrices']:.1f} (d, d) "
                  "matrices", flush=True)
        rate = sum(r["seconds"] * r["dim"] ** 3 for r in rows) / sum(r["dim"] ** 6 for r in rows) * 1e9
        print(f"{dtype}: fit t = {rate:.3f} s × (d/1000)³;  " + ", ".join(
            f"d={d}: {rate * (d / 1000) ** 3:,.0f} s" for d in EXTRAPOLATE) + f";  --solve-rate {rate:.3g}")


if __name__ == "__main__":
    main()

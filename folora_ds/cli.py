"""The ``folora-ds`` command.

    folora-ds train [--config ds.json] [--set tau=2.0 --set proxy.seed=3] [--model DIR] [--data FILE] ...
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero2.json ...    (the same command per rank)
    folora-ds sample-proxy --model DIR --output proxy.jsonl [--config ds.json] [--set ...]
    folora-ds plan --model-config llama-3-70b --world 64 --nodes 8 [--tp 8] [--config ds.json] [--set k=64] [--json]
    folora-ds evaluate --model smollm2-135m-instruct --adapter folora=out/folora_adapter --adapter adamw=...
    folora-ds grid smollm2 --output runs/grid [--only "plain LoRA"] [--records DIR] [--report-only |
                                       --lost-questions | --directions | --noise-floor | --probe-kl]

The run's settings come from a DeepSpeed JSON config (``--config``, alias ``--deepspeed``; a one-process ZeRO-0
default without it): DeepSpeed's keys go to the engine, the ``"folora"`` block to FoLoRA, with ``--set`` overriding
``"folora"`` fields (values parsed as JSON, else plain strings). ``--lr``, ``--weight-decay`` and ``--batch-size``
fill the config's optimizer and micro-batch keys; a flag that disagrees with the file is an error, not a silent
pick. Every user error (config, data, model, output directory, checkpoint) ends with one line naming the
setting, file or row, and exit code 2. Phase lines are logged to stderr (``-q``/``--quiet``: warnings only;
``-v``/``--verbose``: debug too); results (tables, summaries, the paths written) go to stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from folora_ds.adapters.ds_config import load_ds_config
from folora_ds.common.files import write_json
from folora_ds.controller.proxy import sample_proxy, save_proxy_jsonl
from folora_ds.distributed.phases import CollectiveTimeoutError
from folora_ds.method.config import FoLoRAConfig, MissingFoloraBlockError
from folora_ds.toolkit.evaluation import EvaluationSettings, evaluate_adapters, format_evaluation
from folora_ds.toolkit.grid import (
    collect_rows,
    direction_rows,
    export_records,
    import_records,
    load_spec,
    lost_questions,
    noise_floor,
    probe_kl,
    run_grid,
)
from folora_ds.toolkit.report import write_report
from folora_ds.training.interrupts import RunInterrupted
from folora_ds.training.models import load_model
from folora_ds.training.plan import PlanSettings, format_plan, plan_from_files
from folora_ds.training.run import DEFAULT_DS_CONFIG, RunSettings, run
from folora_ds.training.summary import format_summary

EXIT_USER_ERROR = 2
_USER_ERRORS = (ValueError, MissingFoloraBlockError, FileNotFoundError)


def _parse_overrides(pairs: Sequence[str]) -> dict:
    overrides: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = overrides
        *parents, leaf = key.strip().split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return overrides


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_folora_config(config_path: str | None, overrides: Sequence[str] = ()) -> FoLoRAConfig:
    """The FoLoRA config from a DeepSpeed JSON's ``"folora"`` block (or defaults) plus ``--set`` overrides."""
    return FoLoRAConfig.from_dict(build_run_config(config_path, overrides)["folora"])


_FLAG_KEYS = {"--lr": ("optimizer", "params", "lr"), "--weight-decay": ("optimizer", "params", "weight_decay"),
              "--batch-size": ("train_micro_batch_size_per_gpu",)}


def build_run_config(config_path: str | None, overrides: Sequence[str] = (),
                     flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's DeepSpeed config: the file (or ``DEFAULT_DS_CONFIG``), ``--set`` merged into its ``"folora"``
    block, and the flags in ``_FLAG_KEYS`` written to their keys.

    Raises:
        ValueError: a flag disagrees with the value the file sets for the same key.
        MissingFoloraBlockError: the file has no ``"folora"`` block.
    """
    ds_config = copy.deepcopy(DEFAULT_DS_CONFIG) if config_path is None else load_ds_config(config_path)
    if "folora" not in ds_config:
        raise MissingFoloraBlockError(f'the DeepSpeed config {config_path!r} has no "folora" block; add "folora": '
                                      "{} to use every default (see README, config reference)")
    ds_config["folora"] = _merge(dict(ds_config["folora"] or {}), _parse_overrides(overrides))
    for flag, value in (flags or {}).items():
        if value is None:
            continue
        *parents, leaf = _FLAG_KEYS[flag]
        target = ds_config
        for parent in parents:
            if parent == "optimizer" and "optimizer" not in target:
                target["optimizer"] = {"type": "AdamW", "params": {}}
            target = target.setdefault(parent, {})
        current = target.get(leaf)
        if config_path is not None and current is not None and current != value:
            raise ValueError(f"{flag} {value} disagrees with {'.'.join(_FLAG_KEYS[flag])}={current} in {config_path}; "
                             "set it in one place")
        target[leaf] = value
    return ds_config


def _build_parser() -> argparse.ArgumentParser:
    defaults = RunSettings()
    parser = argparse.ArgumentParser(prog="folora-ds", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    verbosity = argparse.ArgumentParser(add_help=False)  # every command takes them, after its name
    loudness = verbosity.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only (progress bars "
                          "stay; hide them with --no-progress where offered)")
    loudness.add_argument("-v", "--verbose", action="store_true", help="log debug lines too")

    train = commands.add_parser("train", parents=[verbosity],
                                help="FoLoRA under DeepSpeed (one process, or one per rank under a "
                                     "launcher), compared with plain AdamW")
    train.add_argument("--config", "--deepspeed", dest="config", metavar="CONFIG",
                       help='DeepSpeed JSON config with a "folora" block (default: one process, ZeRO-0, micro-batch '
                            "8, AdamW lr 1e-3)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one folora field, e.g. --set tau=2.0 --set proxy.num_sequences=32")
    train.add_argument("--model", default=defaults.model, help="'tiny-llama', 'smollm2-135m-instruct' (the real "
                       "pretrained model, prepared once) or a local HF model directory")
    train.add_argument("--data", default=defaults.data, help="task data: .json/.jsonl/.parquet or a saved dataset")
    train.add_argument("--output-dir", default=defaults.output_dir)
    train.add_argument("--overwrite", action="store_true", help="replace the content of a non-empty --output-dir")
    train.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    train.add_argument("--lr", type=float, help="sets optimizer.params.lr")
    train.add_argument("--weight-decay", type=float, help="sets optimizer.params.weight_decay")
    train.add_argument("--batch-size", type=int, help="sets train_micro_batch_size_per_gpu")
    train.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction)
    train.add_argument("--calibration-steps", type=int, default=defaults.calibration_steps,
                       help="the first steps' batches give the initial C_task")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--no-baseline", action="store_true", help="skip the plain AdamW comparison run")
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")
    train.add_argument("--collective-timeout", type=float, default=defaults.collective_timeout_seconds,
                       metavar="SECONDS", help="every collective fails after this long instead of hanging when a "
                                               "rank dies or hangs (default 600)")
    train.add_argument("--save-every", type=int, default=0, metavar="N",
                       help="checkpoint every N optimizer steps into OUTPUT_DIR/checkpoints (and when SIGTERM/SIGINT "
                            "stops the run), so --resume can continue it; removed when the run finishes")
    train.add_argument("--resume", action="store_true",
                       help="continue the checkpointed run in --output-dir (start it if the directory is empty: a "
                            "requeued job can run the same command)")
    train.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    sample = commands.add_parser("sample-proxy", parents=[verbosity],
                                 help="sample a pretraining-proxy calibration set to JSONL")
    sample.add_argument("--config", help='DeepSpeed JSON config with a "folora" block (defaults if omitted)')
    sample.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sample.add_argument("--model", default=defaults.model)
    sample.add_argument("--output", required=True, help="JSONL file to write")
    sample.add_argument("--no-progress", action="store_true")

    plan = commands.add_parser("plan", parents=[verbosity],
                               help="per-rank memory, communication and solve time of a run, from a "
                                    "config.json (no weights)")
    plan.add_argument("--model-config", required=True, metavar="CONFIG",
                      help="a HF config.json, a model folder, or a shipped name: llama-2-7b, llama-3-8b, llama-3-70b")
    plan.add_argument("--world", type=int, required=True, help="ranks in all (tensor x data parallel)")
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--tp", type=int, default=1, help="Megatron tensor-parallel size (divides --world)")
    plan.add_argument("--config", "--deepspeed", dest="config", metavar="CONFIG",
                      help='DeepSpeed JSON with a "folora" block: stage, micro-batch, accumulation, bf16 and FoLoRA '
                           "settings come from it")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--stage", type=int, help="ZeRO stage (default: the config's, as DeepSpeed reads it (0 without "
                      "a zero_optimization block); 3 without --config)")
    plan.add_argument("--dtype", choices=["bfloat16", "float32"], help="model dtype (default: the config's bf16 "
                      "setting, else bfloat16)")
    plan.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default: the config's, else 1)")
    plan.add_argument("--seq-len", type=int, default=4096, help="tokens per training sequence")
    plan.add_argument("--accumulation", type=int, help="micro-batches per optimizer step (default: the config's)")
    plan.add_argument("--solve-rate", type=float, metavar="S", help="seconds per d³/1e9 of a float64 eigensolve "
                      "on the solving device (default: measured here)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    evaluate = commands.add_parser("evaluate", parents=[verbosity],
                                   help="target accuracy, KL on held-out text and retention of peft "
                                        "adapters against their base model")
    evaluate.add_argument("--model", default=defaults.model, help="the base model the adapters were trained on")
    evaluate.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                          help="a peft adapter directory, e.g. --adapter folora=out/folora_adapter (repeatable)")
    evaluate.add_argument("--test-data", help="target-task test JSONL (default: the number-words test split)")
    evaluate.add_argument("--test-records", type=int, default=100)
    evaluate.add_argument("--heldout", type=int, default=48, help="held-out text passages for KL and perplexity")
    evaluate.add_argument("--device", default="cpu", help="where the models run, e.g. cuda (default: cpu)")
    evaluate.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                          help="dtype of the model weights (default: float32)")
    evaluate.add_argument("--output", help="also write the results as JSON here")
    evaluate.add_argument("--no-progress", action="store_true")

    grid = commands.add_parser("grid", parents=[verbosity],
                               help="train and measure a grid of methods x learning rates x seeds x steps "
                                    "(cached and resumable), then write the tables and plots")
    grid.add_argument("spec", help="a grid spec JSON, or a shipped grid's name (smollm2, demo, quick)")
    grid.add_argument("--output", required=True, help="the grid's folder (reused: finished runs are not redone)")
    grid.add_argument("--only", action="append", metavar="LABEL", help="run only the entries with this label "
                      "(repeatable); the report still covers every finished run")
    only_report = grid.add_mutually_exclusive_group()
    only_report.add_argument("--report-only", action="store_true", help="write the report of the finished runs, "
                             "train nothing")
    only_report.add_argument("--lost-questions", action="store_true", help="train nothing; answer the retention "
                             "questions again with every finished run (or --only's) and write lost_questions.md: "
                             "which base-correct questions each run lost, number answers apart from the rest")
    only_report.add_argument("--directions", action="store_true", help="train nothing; split every finished "
                             "adapter's change by FoLoRA's passed and attenuated directions and write "
                             "directions.md/.csv: how far each method moved along what FoLoRA lets through")
    only_report.add_argument("--noise-floor", action="store_true", help="train nothing; measure the retention "
                             "probe on random adapters (no task) at KL 0.001-0.1 and write noise_floor.md/.json: "
                             "what any change of that size costs on the probe")
    only_report.add_argument("--probe-kl", action="store_true", help="train nothing; KL of every finished run (or "
                             "--only's) on the base model's own answers to the retention questions, beside its KL "
                             "on held-out passages, written to probe_kl.md/.json: where each change sits")
    grid.add_argument("--records", metavar="DIR", help="a folder of run records (what each finished run measured, "
                      "no adapters; e.g. docs/results/records/<grid>): its finished runs count as finished in "
                      "--output, and every finished run's record is written back to it after the grid or report")
    grid.add_argument("--no-progress", action="store_true")
    return parser


def _grid(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if args.only:
        unknown = sorted(set(args.only) - {run.label for run in spec.runs})
        if unknown:
            raise ValueError(f"--only {unknown[0]!r} names no entry of the grid "
                             f"(labels: {', '.join(sorted({run.label for run in spec.runs}))})")
    if args.records and Path(args.records).exists():
        import_records(spec, args.records, args.output)
    if args.lost_questions:
        print(lost_questions(spec, args.output, labels=args.only, progress=not args.no_progress))
        return 0
    if args.directions:
        print(direction_rows(spec, args.output, labels=args.only, progress=not args.no_progress))
        return 0
    if args.noise_floor:
        print(noise_floor(spec, args.output, progress=not args.no_progress))
        return 0
    if args.probe_kl:
        print(probe_kl(spec, args.output, labels=args.only, progress=not args.no_progress))
        return 0
    if args.report_only:
        rows = collect_rows(spec, args.output)
    else:
        rows = run_grid(spec, args.output, progress=not args.no_progress, only=args.only)
    if args.records:
        export_records(spec, args.output, args.records)
    report = write_report(rows, spec, Path(args.output))
    print(report.markdown)
    print(f"tables and plots: {', '.join(str(path) for path in report.files)}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    adapters = {}
    for item in args.adapter:
        name, separator, path = item.partition("=")
        if not separator or not name or not path:
            raise ValueError(f"--adapter expects NAME=DIR, got {item!r}")
        if name in adapters or name == "base":
            raise ValueError(f"--adapter name {name!r} is used twice (or is 'base')")
        adapters[name] = path
    settings = EvaluationSettings(**({} if args.test_data is None else {"test_data": args.test_data}),
                                  test_records=args.test_records, heldout_passages=args.heldout)
    results = evaluate_adapters(args.model, adapters, settings, progress=not args.no_progress, device=args.device,
                                dtype=getattr(torch, args.dtype))
    print(format_evaluation(results))
    if args.output:
        write_json(Path(args.output), results)
    return 0


def _plan(args: argparse.Namespace) -> int:
    ds_config = build_run_config(args.config, args.overrides) if args.config else {
        "folora": _parse_overrides(args.overrides)}
    zero = ds_config.get("zero_optimization") or {}
    bf16 = bool((ds_config.get("bf16") or ds_config.get("bfloat16") or {}).get("enabled", args.config is None))
    settings = PlanSettings(
        world_size=args.world, nodes=args.nodes, tensor_parallel=args.tp,
        zero_stage=args.stage if args.stage is not None else int(zero.get("stage", 3 if args.config is None else 0)),
        model_dtype=args.dtype or ("bfloat16" if bf16 else "float32"),
        micro_batch=args.micro_batch or int(ds_config.get("train_micro_batch_size_per_gpu", 1)),
        seq_len=args.seq_len,
        gradient_accumulation=args.accumulation or int(ds_config.get("gradient_accumulation_steps", 1)),
        solve_seconds_per_gflop=args.solve_rate)
    plan = plan_from_files(args.model_config, settings, FoLoRAConfig.from_dict(ds_config["folora"]))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def _train(args: argparse.Namespace) -> int:
    settings = RunSettings(model=args.model, data=args.data, output_dir=args.output_dir, steps=args.steps,
                           eval_fraction=args.eval_fraction, calibration_steps=args.calibration_steps,
                           seed=args.seed, baseline=not args.no_baseline, overwrite=args.overwrite,
                           progress=not args.no_progress, collective_timeout_seconds=args.collective_timeout,
                           save_every=args.save_every, resume=args.resume)
    ds_config = build_run_config(args.config, args.overrides, {"--lr": args.lr, "--weight-decay": args.weight_decay,
                                                               "--batch-size": args.batch_size})
    summary = run(settings, ds_config)
    if summary is not None:
        print(format_summary(summary))
        print(f"adapters and summary: {Path(settings.output_dir)}")
    return 0


def _sample_proxy(args: argparse.Namespace) -> int:
    config = load_folora_config(args.config, args.overrides)
    model, tokenizer = load_model(args.model)
    samples = sample_proxy(model, tokenizer, config.proxy, progress=not args.no_progress)
    save_proxy_jsonl(samples, args.output, config.proxy)
    print(f"wrote {len(samples)} proxy sequences to {args.output}")
    return 0


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged, not the one of the moment it was configured (a
    program that calls ``main`` more than once, or swaps stderr in between, keeps getting its lines)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(level: int) -> None:
    """Send the package's log lines (phases, files written) at ``level`` and above to stderr, each prefixed with
    ``[folora-ds]`` and, under a launcher of several processes, the rank. Only the ``folora_ds`` logger is
    configured: DeepSpeed's and transformers' own loggers keep their settings."""
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter(f"[folora-ds] {_rank_label()}%(message)s"))
    logger = logging.getLogger("folora_ds")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``folora-ds``; returns the exit code."""
    args = _build_parser().parse_args(argv)
    configure_logging(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    try:
        return {"train": _train, "sample-proxy": _sample_proxy, "plan": _plan,
                "evaluate": _evaluate, "grid": _grid}[args.command](args)
    except _USER_ERRORS as error:
        print(f"folora-ds: {_rank_label()}error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except CollectiveTimeoutError as error:  # a rank stopped answering: named with its phase, in one line
        print(f"folora-ds: {_rank_label()}error: {error}", file=sys.stderr)
        return 1
    except RunInterrupted as error:  # SIGTERM / SIGINT: after a checkpoint where one is configured
        print(f"folora-ds: {_rank_label()}{error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # a file the user named or pointed us at: read-only, full, no permission
        if error.filename is None:
            raise
        print(f"folora-ds: {_rank_label()}error: cannot write or read {str(error.filename)!r}: "
              f"{error.strerror or error}", file=sys.stderr)
        return EXIT_USER_ERROR


def _rank_label() -> str:
    """"[rank N] " under a launcher of several processes (read from its environment: the process group may be
    gone by the time an error is printed), else ""."""
    world = os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    rank = os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    return f"[rank {rank}] " if int(world) > 1 else ""


if __name__ == "__main__":
    sys.exit(main())

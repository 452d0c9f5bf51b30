"""The ``folora-ds`` command.

    folora-ds train [--config ds.json] [--set tau=2.0 --set proxy.seed=3] [--model DIR] [--data FILE] ...
    folora-ds sample-proxy --model DIR --output proxy.jsonl [--config ds.json] [--set ...]

FoLoRA settings come from the ``"folora"`` block of a DeepSpeed JSON config (``--config``), then ``--set``
overrides (values parsed as JSON, falling back to plain strings). Every value is validated before any work.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from folora_ds.config import FoLoRAConfig


def _parse_overrides(pairs: Sequence[str]) -> dict:
    overrides: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
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
    block: dict = {}
    if config_path is not None:
        block = FoLoRAConfig.from_deepspeed_config(config_path).to_dict()
    return FoLoRAConfig.from_dict(_merge(block, _parse_overrides(overrides)))


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help='DeepSpeed JSON config with a "folora" block (defaults if omitted)')
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one folora config field, e.g. --set tau=2.0 --set proxy.num_sequences=32")


def _build_parser() -> argparse.ArgumentParser:
    from folora_ds.run import RunSettings

    defaults = RunSettings()
    parser = argparse.ArgumentParser(prog="folora-ds", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="single-process FoLoRA run compared with plain AdamW")
    _add_config_arguments(train)
    train.add_argument("--model", default=defaults.model, help="'tiny-llama' or a local HF model directory")
    train.add_argument("--data", default=defaults.data, help="task data: .json/.jsonl/.parquet or a saved dataset")
    train.add_argument("--output-dir", default=defaults.output_dir)
    train.add_argument("--steps", type=int, default=defaults.steps)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    train.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction)
    train.add_argument("--calibration-batches", type=int, default=defaults.calibration_batches)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--no-baseline", action="store_true", help="skip the plain AdamW comparison run")
    train.add_argument("--no-progress", action="store_true", help="hide progress bars")

    distributed = commands.add_parser("train-ds", help="FoLoRA under the DeepSpeed engine (run one per rank: "
                                      "deepspeed / torchrun / mpirun launch/train.py --deepspeed CONFIG)")
    distributed.add_argument("--deepspeed", required=True, metavar="CONFIG",
                             help='DeepSpeed JSON config with a "folora" block (e.g. ds_configs/zero2.json)')
    distributed.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for flag in ("--model", "--data", "--output-dir"):
        distributed.add_argument(flag, default=getattr(defaults, flag.strip("-").replace("-", "_")))
    for flag, kind in (("--steps", int), ("--eval-fraction", float), ("--calibration-batches", int),
                       ("--seed", int)):
        distributed.add_argument(flag, type=kind, default=getattr(defaults, flag.strip("-").replace("-", "_")))
    distributed.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override one folora config field")
    distributed.add_argument("--no-progress", action="store_true")
    distributed.add_argument("--collective-timeout", type=float, default=600.0, metavar="SECONDS",
                             help="every collective fails after this long instead of hanging when a rank dies or "
                                  "hangs (default 600)")

    sample = commands.add_parser("sample-proxy", help="sample a pretraining-proxy calibration set to JSONL")
    _add_config_arguments(sample)
    sample.add_argument("--model", default=defaults.model)
    sample.add_argument("--output", required=True, help="JSONL file to write")
    sample.add_argument("--no-progress", action="store_true")
    return parser


def _train_deepspeed(args: argparse.Namespace) -> int:
    import tempfile

    from folora_ds.ds_train import run_deepspeed
    from folora_ds.engine import load_ds_config
    from folora_ds.run import RunSettings

    try:
        if not args.collective_timeout > 0:
            raise ValueError(f"--collective-timeout {args.collective_timeout} must be > 0 seconds")
        ds_config = load_ds_config(args.deepspeed)
        block = FoLoRAConfig.from_deepspeed_config(ds_config).to_dict()
        ds_config["folora"] = FoLoRAConfig.from_dict(_merge(block, _parse_overrides(args.overrides))).to_dict()
        settings = RunSettings(model=args.model, data=args.data, output_dir=args.output_dir, steps=args.steps,
                               eval_fraction=args.eval_fraction, calibration_batches=args.calibration_batches,
                               seed=args.seed, baseline=False, progress=not args.no_progress)
    except (ValueError, KeyError, FileNotFoundError) as error:
        print(f"folora-ds: config error: {error}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        merged = Path(scratch) / "ds_config.json"
        merged.write_text(json.dumps(ds_config))
        run_deepspeed(settings, str(merged), collective_timeout_seconds=args.collective_timeout)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``folora-ds``; returns the exit code."""
    args = _build_parser().parse_args(argv)
    if args.command == "train-ds":
        return _train_deepspeed(args)
    try:
        config = load_folora_config(args.config, args.overrides)
    except (ValueError, KeyError, FileNotFoundError) as error:
        print(f"folora-ds: config error: {error}", file=sys.stderr)
        return 2
    if args.command == "train":
        from folora_ds.run import RunSettings, format_summary, run_comparison

        try:
            settings = RunSettings(model=args.model, data=args.data, output_dir=args.output_dir, steps=args.steps,
                                   batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                                   eval_fraction=args.eval_fraction, calibration_batches=args.calibration_batches,
                                   seed=args.seed, baseline=not args.no_baseline, progress=not args.no_progress)
        except ValueError as error:
            print(f"folora-ds: {error}", file=sys.stderr)
            return 2
        summary = run_comparison(settings, config)
        print(format_summary(summary))
        print(f"summary: {Path(settings.output_dir) / 'summary.json'}")
        return 0
    from folora_ds.models import load_model
    from folora_ds.proxy import sample_proxy, save_proxy_jsonl

    model, tokenizer = load_model(args.model)
    samples = sample_proxy(model, tokenizer, config.proxy, progress=not args.no_progress)
    save_proxy_jsonl(samples, args.output, config.proxy)
    print(f"wrote {len(samples)} proxy sequences to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

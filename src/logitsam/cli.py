"""`logitsam` command line: parse, call, print. Nothing imports this module."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

TRAIN_EPILOG = """\
Every config key can be set in the YAML recipe or as --key value (the command line wins):

{keys}

Any transformers.TrainingArguments field is accepted too (output_dir, max_steps, num_train_epochs,
per_device_train_batch_size, gradient_accumulation_steps, learning_rate, seed, save_steps, logging_steps,
eval_strategy, eval_steps, report_to, bf16, optim, resume_from_checkpoint, ...).

Examples:
  logitsam train --config recipes/smollm2_hh_dpo_logits_sam.yaml
  logitsam train --config recipes/smollm2_hh_dpo.yaml --sam logits --sam_rho 1e-3 --max_steps 50
  logitsam train --model_name_or_path smollm2-135m-instruct --dataset_name pairs.jsonl --loss_type ipo \\
      --output_dir runs/ipo --max_steps 100
"""


def _key_help() -> str:
    from .train.config import TrainConfig

    lines = []
    for f in dataclasses.fields(TrainConfig):
        if f.name == "training_args":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {f.name:<26} {f.metadata.get('help', '')} [default: {default}]")
    return "\n".join(lines)


def parse_overrides(tokens: list[str]) -> dict[str, str]:
    """['--key', 'v', '--flag', '--k2=v2'] -> {'key': 'v', 'flag': 'true', 'k2': 'v2'}."""
    out, i = {}, 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise SystemExit(f"error: expected --key value, got {tok!r}")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
            i += 2
        else:
            value, i = "true", i + 1
        out[key.replace("-", "_")] = value
    return out


def cmd_train(args, extra):
    from .train import build_config
    from .train.run import run_training

    try:
        cfg = build_config(args.config, parse_overrides(extra))
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    result = run_training(cfg)
    print(json.dumps(result, indent=2, default=str))


def cmd_bench(args, extra):
    from .bench import BenchConfig, main

    values = {k: v for k, v in vars(args).items() if k in BenchConfig.__dataclass_fields__ and v is not None}
    main(BenchConfig(**values), memory=not args.no_memory, output=args.output)


def cmd_theory(args, extra):
    from .theory import run_theory

    out = Path(args.output_dir)
    summary = run_theory(out, seeds=args.seeds, progress=True)
    print(f"figures and summary.md written to {out}")
    print(json.dumps(summary, indent=2, default=str)[:4000])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logitsam", description="Preference optimization (DPO and variants) with logits-SAM on the LM head.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a causal LM on preference pairs (DPO family, optional SAM)",
                       description="Train with a YAML recipe and/or --key value overrides.",
                       epilog=TRAIN_EPILOG.format(keys=_key_help()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe (see recipes/)")
    p.set_defaults(func=cmd_train, takes_extra=True)

    from .bench import BenchConfig

    p = sub.add_parser("bench", help="time and memory of the LM-head paths (plain/logits-SAM, dense/chunked)")
    for name, default in BenchConfig().__dict__.items():
        p.add_argument(f"--{name}", type=type(default), default=None, help=f"default: {default}")
    p.add_argument("--no_memory", action="store_true", help="skip the per-path memory measurement")
    p.add_argument("--output", help="also write the result as JSON here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("theory", help="the softmax-regression theory lab: checks and figures")
    p.add_argument("--output_dir", default="runs/theory")
    p.add_argument("--seeds", type=int, default=200, help="random problems for the sign-rule statistics")
    p.set_defaults(func=cmd_theory)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.func(args, extra)


if __name__ == "__main__":
    main(sys.argv[1:])

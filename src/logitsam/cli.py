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
    out = Path(args.output_dir)
    if args.real:
        return theory_real(out, args.real_dataset, steps=args.real_steps, rho=args.real_rho)
    from .theory import run_theory

    summary = run_theory(out, seeds=args.seeds, progress=True)
    print(f"figures and summary.md written to {out}")
    print(json.dumps(summary, indent=2, default=str)[:4000])


def theory_real(out: Path, dataset: str, *, steps: int, rho: float) -> None:
    """Fig. 1c on the embedded SmolLM2 with real HH pairs: DPO vs DPO + logits-SAM, same seed and data."""
    from .compare import Variant, run_compare
    from .report.fig1c import plot_fig1c

    overrides = {"model_name_or_path": "smollm2-135m-instruct", "dataset_name": dataset, "data_format": "hh",
                 "on_invalid": "drop", "max_samples": 2 * steps + 16, "eval_size": 16, "max_length": 96,
                 "max_prompt_length": 64, "max_steps": steps, "per_device_train_batch_size": 2,
                 "eval_strategy": "steps", "eval_steps": 2, "eval_on_start": "true", "per_device_eval_batch_size": 8,
                 "learning_rate": 1e-5, "warmup_steps": 0.1, "logging_steps": 1, "save_steps": 100000,
                 "use_cpu": "true", "report_to": "none"}
    variants = [Variant("dpo", {"sam": "none"}), Variant("dpo+logits-sam", {"sam": "logits", "sam_rho": rho})]
    result = run_compare(None, out, variants=variants, seeds=[0], overrides=overrides,
                         title="Fig. 1c analogue: SmolLM2-135M on HH")
    runs = {v.name: d for v, d in zip(variants, result["run_dirs"], strict=True)}
    summary = plot_fig1c(runs, out / "fig1c_smollm2_hh.png",
                         title=f"SmolLM2-135M-Instruct on HH-RLHF: DPO vs DPO + logits-SAM (rho={rho:g})")
    (out / "fig1c_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"figure: {out / 'fig1c_smollm2_hh.png'}; report: {result['html']}")


DATA_ARGS = (("--split", "test"), ("--data_format", "auto"), ("--max_samples", None), ("--max_length", 512),
             ("--max_prompt_length", 256), ("--truncation_mode", "keep_end"), ("--on_invalid", "drop"),
             ("--batch_size", 8))


def _add_data_args(p, split="test"):
    p.add_argument("--dataset_name", required=True, help="hub id, local dir, or a JSON/JSONL/Parquet file")
    for flag, default in DATA_ARGS:
        default = split if flag == "--split" else default
        kind = int if isinstance(default, int) else str
        if flag == "--max_samples":
            kind = int
        p.add_argument(flag, type=kind, default=default, help=f"default: {default}")


def _data_kwargs(args) -> dict:
    return {flag[2:]: getattr(args, flag[2:]) for flag, _ in DATA_ARGS}


def cmd_eval(args, extra):
    from .eval.run import evaluate

    prompts = None
    if args.prompts_file:
        prompts = [json.loads(line)["prompt"] for line in Path(args.prompts_file).read_text().splitlines() if line]
    kw = _data_kwargs(args)
    result = evaluate(args.model, ref_model_name_or_path=args.ref_model, dataset_name=args.dataset_name,
                      loss_type=args.loss_type, beta=args.beta, judges=tuple(args.judge), prompts=prompts,
                      num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, gen_batch_size=args.gen_batch_size, seed=args.seed,
                      hessian_probes=args.hessian_probes, hessian_batches=args.hessian_batches,
                      hessian_head_only=args.hessian_head_only, output_dir=args.output_dir, **kw)
    print(json.dumps(result, indent=2, default=str))
    print(f"results written to {Path(args.output_dir) / 'eval_results.json'}")


def cmd_ches(args, extra):
    from .eval.ches import run_ches

    summary = run_ches(args.model, args.dataset_name, args.output_dir, filter_top_percent=args.filter_top_percent,
                       filter_key=args.filter_key, **_data_kwargs(args))
    print(json.dumps(summary, indent=2))


def cmd_compare(args, extra):
    from .compare import DEFAULT_VARIANTS, parse_variant, rho_sweep_variants, run_compare

    variants = [parse_variant(v) for v in (args.variants or ([] if args.rho_sweep else DEFAULT_VARIANTS))]
    if args.rho_sweep:
        variants = [parse_variant("dpo:sam=none")] + variants + rho_sweep_variants(args.rho_sweep)
    eval_kwargs = None
    if args.eval_dataset_name:
        eval_kwargs = dict(dataset_name=args.eval_dataset_name, split=args.eval_split, judges=tuple(args.judge),
                           num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                           hessian_probes=args.hessian_probes, max_length=args.max_length,
                           max_prompt_length=args.max_prompt_length)
    result = run_compare(args.config, args.output_dir, variants=variants, seeds=args.seeds,
                         overrides=parse_overrides(extra), eval_kwargs=eval_kwargs, baseline=args.baseline)
    print(result["table"])
    print(f"report: {result['html']} and {result['markdown']}")


def cmd_report(args, extra):
    from .report import build_report, find_run_dirs, format_table

    dirs = [d for root in args.run_dirs for d in (find_run_dirs(root) or [Path(root)])]
    result = build_report(dirs, args.output_dir, title=args.title, baseline=args.baseline)
    print(format_table(result["summary"]))
    print(f"report: {result['html']} and {result['markdown']}")


def cmd_build_sentiment(args, extra):
    from .demo.sentiment_data import build_sentiment_dataset

    summary = build_sentiment_dataset(args.output_dir, num_prompts=args.num_prompts,
                                      samples_per_prompt=args.samples_per_prompt, temperature=args.temperature,
                                      max_new_tokens=args.max_new_tokens, min_gap=args.min_gap, seed=args.seed,
                                      batch_size=args.batch_size)
    print(json.dumps(summary, indent=2, default=str))


def cmd_demo(args, extra):
    from .demo.run import run_demo

    run_demo(args.output_dir, quick=args.quick, seed=args.seed)


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

    p = sub.add_parser("eval", help="evaluate a checkpoint: preference accuracy, log-prob shifts, win rate, flatness",
                       epilog="Example: logitsam eval --model runs/dpo --dataset_name pairs.jsonl --split train "
                              "--judge vader --num_prompts 64 --output_dir runs/dpo/eval")
    p.add_argument("--model", required=True, help="checkpoint dir, hub id or embedded name")
    p.add_argument("--ref_model", help="reference (default: the model the run started from)")
    _add_data_args(p)
    p.add_argument("--loss_type", default="sigmoid")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--judge", action="append", default=None,
                   help="'vader' or 'reward:MODEL' (repeatable; default vader)")
    p.add_argument("--prompts_file", help="JSONL with a 'prompt' field for judged generation (default: the pairs')")
    p.add_argument("--num_prompts", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--gen_batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hessian_probes", type=int, default=0, help="Hutchinson probes (0: skip the Hessian trace)")
    p.add_argument("--hessian_batches", type=int, default=1)
    p.add_argument("--hessian_head_only", action="store_true", help="trace over the LM head's parameters only")
    p.add_argument("--output_dir", default="runs/eval")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("ches", help="CHES scores per pair (Razin et al. 2025) and a filtered dataset",
                       epilog="Example: logitsam ches --model smollm2-135m-instruct --dataset_name hh.jsonl.gz "
                              "--split train --filter_top_percent 10 --output_dir runs/ches")
    p.add_argument("--model", default="smollm2-135m-instruct")
    _add_data_args(p, split="train")
    p.add_argument("--filter_top_percent", type=float, help="also write filtered.jsonl without the top-k %% pairs")
    p.add_argument("--filter_key", default="ches", choices=["ches", "ches_norm", "edit_distance"])
    p.add_argument("--output_dir", default="runs/ches")
    p.set_defaults(func=cmd_ches)

    p = sub.add_parser("compare", help="train variants x seeds from one recipe, evaluate, and write a report",
                       description="Variants are NAME:key=value,key=value (config overrides). Extra --key value "
                                   "pairs apply to every run.",
                       epilog="Example: logitsam compare --config recipes/smollm2_hh_dpo.yaml --seeds 0 1 "
                              "--variants dpo:sam=none dpo+logits-sam:sam=logits --max_steps 50 "
                              "--output_dir runs/compare",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe shared by every run")
    p.add_argument("--variants", nargs="+",
                   help="default: dpo:sam=none dpo+logits-sam:sam=logits dpo+full-sam:sam=full")
    p.add_argument("--rho_sweep", nargs="+", type=float, help="logits-SAM radii to sweep (adds a DPO baseline)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--baseline", help="variant the cost ratios refer to (default: the one without SAM)")
    p.add_argument("--eval_dataset_name", help="also run `logitsam eval` on each run with this data")
    p.add_argument("--eval_split", default="test")
    p.add_argument("--judge", action="append", default=None)
    p.add_argument("--num_prompts", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--hessian_probes", type=int, default=0)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--max_prompt_length", type=int, default=256)
    p.add_argument("--output_dir", default="runs/compare")
    p.set_defaults(func=cmd_compare, takes_extra=True)

    p = sub.add_parser("report", help="rebuild a report from finished run directories",
                       epilog="Example: logitsam report runs/compare/runs --output_dir runs/compare")
    p.add_argument("run_dirs", nargs="+", help="run directories, or folders holding them")
    p.add_argument("--title", default="logitsam report")
    p.add_argument("--baseline")
    p.add_argument("--output_dir", default="runs/report")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("data", help="build datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("build-sentiment", help="the on-policy sentiment preference dataset (VADER judge)")
    q.add_argument("--output_dir", default="runs/sentiment-data")
    q.add_argument("--num_prompts", type=int)
    q.add_argument("--samples_per_prompt", type=int, default=4)
    q.add_argument("--temperature", type=float, default=1.0)
    q.add_argument("--max_new_tokens", type=int, default=48)
    q.add_argument("--min_gap", type=float, default=0.3)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--batch_size", type=int, default=32)
    q.set_defaults(func=cmd_build_sentiment)

    p = sub.add_parser("demo", help="DPO vs DPO + logits-SAM on the embedded model and data, with a report")
    p.add_argument("--output_dir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a one-minute version (used by the tests)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("theory", help="the softmax-regression theory lab: checks and figures")
    p.add_argument("--output_dir", default="runs/theory")
    p.add_argument("--seeds", type=int, default=200, help="random problems for the sign-rule statistics")
    p.add_argument("--real", action="store_true",
                   help="instead: Fig. 1c on the embedded SmolLM2 with real HH pairs (minutes on a CPU)")
    p.add_argument("--real_dataset", default="../shared/data/hh-rlhf/harmless-base-test.jsonl.gz")
    p.add_argument("--real_steps", type=int, default=24)
    p.add_argument("--real_rho", type=float, default=1e-3)
    p.set_defaults(func=cmd_theory)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "judge", "unset") is None:
        args.judge = ["vader"]
    args.func(args, extra)


if __name__ == "__main__":
    main(sys.argv[1:])

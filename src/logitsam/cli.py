"""`logitsam` command line: parse, call, print. Nothing imports this module."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path

from ._atomic import write_json

TRAIN_EPILOG = """\
Every key above can be set in the YAML recipe (--config) or as --key value; the command line wins over the
recipe, the recipe over the defaults. A true/false key may stand alone (--use_cpu) or be negated (--no_use_cpu);
a list key takes several values (--loss_type sigmoid sft) or a YAML list ("[sigmoid, sft]").
resume_from_checkpoint takes last (or true: the newest complete checkpoint in output_dir) or a folder.

TRL 1.x spellings accepted: {aliases}.
TRL keys refused with a reason: {removed}.

Examples:
  logitsam train --config recipes/smollm2_hh_dpo_logits_sam.yaml
  logitsam train --config recipes/smollm2_hh_dpo.yaml --sam logits --sam_rho 1e-3 --max_steps 50
  logitsam train --model_name_or_path smollm2-135m-instruct --dataset_name pairs.jsonl --loss_type ipo \\
      --output_dir runs/ipo --max_steps 100
"""


DEBUG_HELP = "on an input error, show the full traceback too (same as LOGITSAM_DEBUG=1)"


def _int_at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)  # a ValueError here becomes argparse's "invalid value" message
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not >= {low}")
        return value

    parse.__name__ = "integer"
    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


def _eval_judge_spec(text: str) -> str:
    """``eval`` and ``compare --judge``: ``vader``, ``reward:MODEL``, or ``llm:MODEL``, a chat model asked which
    response is better."""
    if text.startswith("llm:") and text[len("llm:"):].strip():
        return text
    if text != "vader" and not (text.startswith("reward:") and len(text) > len("reward:")):
        raise argparse.ArgumentTypeError(f"{text!r} is not 'vader' or 'reward:MODEL' (a reward model) or "
                                         "'llm:MODEL' (a chat model as judge)")
    return text


def _positive_float(text: str) -> float:
    value = float(text)  # a ValueError here becomes argparse's "invalid value" message
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not > 0")
    return value


def _model_id(text: str) -> str:
    """``--export_generator``: a name the answer files can be called by (no path separators)."""
    if not text.strip() or any(c in text for c in "/\\") or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file name (it names the answer file)")
    return text


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
    return text


# `logitsam train`'s device, dtype and head-chunking keys, for the commands that load models (eval, ches): the
# same names and values (TrainConfig.dtype / sam_chunk_size / sam_vocab_chunk_size, TrainingArguments.use_cpu)
DTYPES = ("float32", "bfloat16", "float16", "auto")  # TrainConfig.dtype's values (a test keeps them equal)
TRUE, FALSE = ("true", "yes", "y", "t", "1"), ("false", "no", "n", "f", "0")  # transformers' string_to_bool


def _dtype(text: str) -> str:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(DTYPES)}")
    return text


def _positive_int_or(text: str, *, auto: bool, what: str) -> int | str | None:
    """An integer >= 1, null (None), or (when ``auto``) the string auto; else an error naming ``what`` null means."""
    if text in ("null", "none", "None"):
        return None
    if auto and text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        allowed = f", null ({what}) or auto" if auto else f" or null ({what})"
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 1{allowed}")
    return value


def _chunk_size(text: str) -> int | str | None:
    """``--sam_chunk_size``: an integer >= 1, null (the dense head) or auto."""
    return _positive_int_or(text, auto=True, what="dense head")


def _vocab_chunk_size(text: str) -> int | None:
    """``--sam_vocab_chunk_size``: an integer >= 1, or null (the whole vocabulary in one slice)."""
    return _positive_int_or(text, auto=False, what="the whole vocabulary")


def _true_false(text: str) -> bool:
    if text.lower() not in TRUE + FALSE:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return text.lower() in TRUE


def _add_placement_args(p, *, what: str, chunking: bool) -> None:
    """--device, --use_cpu and --dtype (and the head chunking keys), as `logitsam train` spells them."""
    p.add_argument("--device", type=_device, help=f"where the {what} run (default: cuda when available, else cpu)")
    p.add_argument("--use_cpu", nargs="?", const=True, default=False, type=_true_false, metavar="{true,false}",
                   help="run on the CPU even with a GPU (alone: true); as train's use_cpu")
    p.add_argument("--dtype", type=_dtype, default="float32", metavar="{" + ",".join(DTYPES) + "}",
                   help="dtype the weights are loaded in (auto: the checkpoint's own; default: float32)")
    if chunking:
        p.add_argument("--sam_chunk_size", type=_chunk_size, default="auto", metavar="{INT,null,auto}",
                       help="LM-head token chunk: an int (chunked head), null (dense (n, V) logits) or auto "
                            "(default: chunked when one batch's fp32 logits exceed 1 GiB); the same numbers")
        p.add_argument("--sam_vocab_chunk_size", type=_vocab_chunk_size, default=8192, metavar="{INT,null}",
                       help="vocabulary slice of the chunked head (default: 8192)")


def _placement(args) -> str | None:
    """The device --device and --use_cpu ask for (None: the command's default, cuda when available)."""
    from .train.config import ConfigError

    if not args.use_cpu:
        return args.device
    if args.device is not None and args.device.split(":")[0] != "cpu":
        raise ConfigError(f"--use_cpu true and --device {args.device} conflict; keep one")
    return "cpu"


def _existing_path(text: str) -> str:
    if not Path(text).expanduser().exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    return text


class _TrainHelp(argparse.Action):
    """``logitsam train --help``: every config key with its type, help and default (``config_parser``)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .train.config import ALIASES, REMOVED_KEYS, config_parser

        epilog = TRAIN_EPILOG.format(aliases=", ".join(f"{a} -> {k}" for a, k in ALIASES.items()),
                                     removed=", ".join(REMOVED_KEYS))
        keys = config_parser.__wrapped__(  # a fresh table: --config is added to it below
            prog=parser.prog, epilog=epilog, usage=f"{parser.prog} [--config RECIPE.yaml] [--debug] [--KEY VALUE ...]",
            description="Train with a YAML recipe and/or --key value overrides.")
        keys.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe (see recipes/)")
        print(keys.format_help())
        parser.exit()


def parse_overrides(tokens: list[str]) -> dict[str, str | list[str]]:
    """['--key', 'v', '--flag', '--k2=v2', '--loss_type', 'a', 'b'] -> {'key': 'v', 'flag': 'true', 'k2': 'v2',
    'loss_type': ['a', 'b']}.

    A bare ``--flag`` means true, for true/false keys only: a bare ``--max_steps`` is an error, not
    silently ignored. A list key takes every value up to the next ``--key``. A key given twice is an error.
    The values stay strings; ``build_config`` reads them with each key's type.

    Raises:
        ConfigError: naming the token or the key.
    """
    from .train.config import ALIASES, ConfigError, bool_keys, known_keys, list_keys

    lists = list_keys()
    out: dict[str, str | list[str] | None] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"expected --key value, got {tok!r}")
        key, value, i = tok[2:], None, i + 1
        if "=" in key:
            key, value = key.split("=", 1)
        key = key.replace("-", "_")
        if value is None:
            values = []
            while i < len(tokens) and not tokens[i].startswith("--") and (not values or key in lists):
                values.append(tokens[i])
                i += 1
            value = values[0] if len(values) == 1 else (values or None)
        if key in out:
            raise ConfigError(f"--{key} is given twice on the command line; keep one")
        out[key] = value
    bare = [key for key, value in out.items() if value is None]
    if bare:
        flags, known = bool_keys(), set(known_keys()) | set(ALIASES)
        for key in bare:
            if key in known and key not in flags:  # an unknown key is left to build_config's suggestion
                raise ConfigError(f"--{key} needs a value (e.g. --{key} VALUE); only true/false keys may stand alone")
            out[key] = "true"
    return out


def check_before_loading(cfg) -> None:
    """The checks of `logitsam train` that need no model: TrainingArguments, data sources and rows, model paths.

    A mistake in a local data file then costs no model load; `run_training` repeats the same checks.
    """
    from .data import DataError, check_source, load_preference_examples
    from .models import EMBEDDED_MODELS, resolve_model_path
    from .train.config import ConfigError
    from .train.run import build_training_args

    try:
        build_training_args(cfg)
    except ValueError as err:  # every TrainingArguments value here came from the user's config
        raise ConfigError(f"TrainingArguments: {err}") from err
    if not cfg.dataset_name:
        raise ConfigError("config key 'dataset_name' is required (a hub id, a local dir, or a JSON/JSONL/Parquet file)")
    for name in (cfg.model_name_or_path, cfg.ref_model_name_or_path):
        if name is not None and name not in EMBEDDED_MODELS:
            resolve_model_path(name)
    for source, split in ((cfg.dataset_name, cfg.dataset_split), (cfg.eval_dataset_name, cfg.eval_dataset_split)):
        if source is None:
            continue
        check_source(source)
        if Path(source).exists():  # local data is cheap to read twice; a hub set is checked when it is loaded
            examples, report = load_preference_examples(source, split=split, data_format=cfg.data_format,
                                                        on_invalid=cfg.on_invalid, max_samples=cfg.max_samples)
            if not examples:
                raise DataError(f"{report}: no valid preference pairs left")
            report.log_summary()


def cmd_train(args, extra):
    from .train import build_config

    cfg = build_config(args.config, parse_overrides(extra))
    check_before_loading(cfg)
    from .train.run import run_training

    ok = False
    try:
        result = run_training(cfg)
        ok = True
    finally:
        _close_process_group(wait=ok)
    print(json.dumps(result, indent=2, default=str))


def _close_process_group(*, wait: bool) -> None:
    """Tear torch.distributed down before the interpreter exits: left to process exit, a gloo/FSDP worker thread
    can abort the process ("terminate called without an active exception") after the run has finished. After a
    failure there is no barrier: the other ranks may never reach it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def cmd_bench(args, extra):
    from .bench import BenchConfig, main

    values = {k: v for k, v in vars(args).items() if k in BenchConfig.__dataclass_fields__ and v is not None}
    main(BenchConfig(**values), memory=not args.no_memory, output=args.output)


def cmd_simulate(args, extra):
    from .simulate import HEADS, PRECISIONS, TRAINERS
    from .simulate.report import markdown_report, run
    from .simulate.step import Batch

    heads = HEADS if "all" in args.head else tuple(dict.fromkeys(args.head))
    precisions = PRECISIONS if "all" in args.precision else tuple(dict.fromkeys(args.precision))
    trainers = TRAINERS if "all" in args.trainer else tuple(t for t in TRAINERS if t in args.trainer)
    if args.fsdp and trainers != ("ours",):
        raise SystemExit("logitsam simulate: --trainer trl / trl-subclass (a live reference model) is simulated in "
                         "one process only; drop --fsdp")
    batch = Batch(pairs=args.pairs, seq_len=args.seq_len, completion_fraction=args.completion_fraction)
    result = run(args.models, heads=heads, precisions=precisions, batch=batch, world_size=args.fsdp,
                 gradient_checkpointing=not args.no_gradient_checkpointing, trainers=trainers)
    print(markdown_report(result))
    if args.output:
        write_json(args.output, result, indent=2)


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
    write_json(out / "fig1c_summary.json", summary, indent=2)
    print(json.dumps(summary, indent=2))
    print(f"figure: {out / 'fig1c_smollm2_hh.png'}; report: {result['html']}")


# tokenisation as in training (TRL 1.16's defaults; see README "Tokenisation")
DATA_ARGS = (("--split", "test"), ("--data_format", "auto"), ("--max_samples", None), ("--max_length", 1024),
             ("--max_prompt_length", None), ("--truncation_mode", "keep_start"), ("--chat_rendering", "trl"),
             ("--apply_chat_template", None), ("--on_invalid", "drop"), ("--batch_size", 8))
INT_DATA_ARGS = ("--max_samples", "--max_length", "--max_prompt_length", "--batch_size")


def _optional_bool(text: str) -> bool | None:
    value = {"true": True, "false": False, "null": None, "none": None}.get(text.lower(), "bad")
    if value == "bad":
        raise argparse.ArgumentTypeError(f"{text!r} is not one of true, false, null")
    return value


def _add_data_args(p, split="test"):
    p.add_argument("--dataset_name", required=True, help="hub id, local dir, or a JSON/JSONL/Parquet file")
    for flag, default in DATA_ARGS:
        default = split if flag == "--split" else default
        kind = _int_at_least(1) if flag in INT_DATA_ARGS else _optional_bool if flag == "--apply_chat_template" \
            else str
        p.add_argument(flag, type=kind, default=default, help=f"default: {default}")


def _data_kwargs(args) -> dict:
    return {flag[2:]: getattr(args, flag[2:]) for flag, _ in DATA_ARGS}


def _export_questions(args) -> list | None:
    """The questions `eval --export` answers (read and checked before any model loads); None: the dataset's."""
    from .eval.export import read_questions
    from .train.config import ConfigError

    for flag in ("export_questions", "export_generator"):
        if getattr(args, flag) is not None and args.export is None:
            raise ConfigError(f"--{flag} {getattr(args, flag)} needs --export alpaca_eval|mt_bench|arena_hard")
    if args.export in ("mt_bench", "arena_hard") and args.export_questions is None:
        raise ConfigError(f"--export {args.export} needs --export_questions PATH (its question.jsonl)")
    return read_questions(args.export, args.export_questions) if args.export_questions else None


# `eval`'s LLM-judge flags; each is None unless given, so the judge's own defaults (LLMJudgeConfig) apply
JUDGE_FLAGS = ("judge_template", "judge_against", "judge_base_url", "judge_api_key", "judge_orders",
               "judge_concurrency", "judge_timeout", "judge_max_retries", "judge_max_tokens", "judge_cache")


def _llm_judge_settings(args) -> dict | None:
    """The --judge_* flags as ``LLMJudgeConfig`` fields (None without an ``llm:MODEL`` judge), checked before any
    model loads: the openai package, the template, an API key or a server, the opponent."""
    from .eval.llm_judge import load_template
    from .train.config import ConfigError

    llm = [spec for spec in args.judge if spec.startswith("llm:")]
    if not llm:
        given = [f"--{flag}" + ("" if flag == "judge_api_key" else f" {getattr(args, flag)}")  # no key on screen
                 for flag in JUDGE_FLAGS if getattr(args, flag) is not None]
        if given or args.no_judge_cache:
            raise ConfigError(f"{(given or ['--no_judge_cache'])[0]} needs an LLM judge: add --judge llm:MODEL")
        return None
    try:
        import openai  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"--judge {llm[0]} needs the OpenAI client: pip install 'logitsam[judge]'") from err
    try:
        load_template(args.judge_template or "dpo_dialogue")
    except ValueError as err:  # an unknown name, a missing file, or a malformed header: named in the message
        raise ConfigError(f"--judge_template {args.judge_template}: {err}") from err
    if not (args.judge_api_key or os.environ.get("OPENAI_API_KEY") or args.judge_base_url
            or os.environ.get("OPENAI_BASE_URL")):
        raise ConfigError(f"--judge {llm[0]} needs an API key: set OPENAI_API_KEY (or --judge_api_key), or point "
                          "--judge_base_url at a local OpenAI-compatible server")
    against = args.judge_against
    if against not in (None, "reference", "chosen") and not Path(against).expanduser().is_file():
        what = "a directory (name its eval_samples.jsonl)" if Path(against).expanduser().is_dir() else "no such file"
        raise ConfigError(f"--judge_against {against}: not reference, chosen or a samples file ({what})")
    if against == "chosen" and args.prompts_file:
        raise ConfigError(f"--judge_against chosen compares with the dataset's chosen responses, but --prompts_file "
                          f"{args.prompts_file} holds prompts only; drop --prompts_file to judge the dataset's prompts")
    if args.judge_cache is not None and args.no_judge_cache:
        raise ConfigError(f"--judge_cache {args.judge_cache} and --no_judge_cache conflict; keep one")
    settings = {"template": args.judge_template, "base_url": args.judge_base_url, "api_key": args.judge_api_key,
                "both_orders": None if args.judge_orders is None else args.judge_orders == "both", "seed": args.seed,
                "concurrency": args.judge_concurrency, "timeout": args.judge_timeout,
                "max_retries": args.judge_max_retries, "max_tokens": args.judge_max_tokens,
                "cache_dir": args.judge_cache, "use_cache": False if args.no_judge_cache else None}
    return {key: value for key, value in settings.items() if value is not None}


def _judge_request_failed(err: Exception) -> bool:
    """Whether ``err`` is the LLM judge's report of a request the server refused or never answered (a bad key,
    an unknown model, no server), as opposed to a bug."""
    openai = sys.modules.get("openai")
    return isinstance(err, RuntimeError) and openai is not None and isinstance(err.__cause__, openai.APIError)


def cmd_eval(args, extra):
    from .data import check_source
    from .eval.run import evaluate, load_prompts
    from .train.config import ConfigError

    device = _placement(args)
    prompts = load_prompts(args.prompts_file) if args.prompts_file else None
    questions = _export_questions(args)
    llm_judge = _llm_judge_settings(args)
    check_source(args.dataset_name)
    kw = _data_kwargs(args)
    try:
        result = evaluate(args.model, ref_model_name_or_path=args.ref_model, dataset_name=args.dataset_name,
                          loss_type=args.loss_type, beta=args.beta, judges=tuple(args.judge), prompts=prompts,
                          num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, gen_batch_size=args.gen_batch_size,
                          seed=args.seed, hessian_probes=args.hessian_probes, hessian_batches=args.hessian_batches,
                          hessian_head_only=args.hessian_head_only, output_dir=args.output_dir,
                          device=device, dtype=args.dtype, chunk_size=args.sam_chunk_size,
                          vocab_chunk_size=args.sam_vocab_chunk_size, export=args.export, export_questions=questions,
                          export_model_id=args.export_generator, llm_judge=llm_judge,
                          judge_against=args.judge_against or "reference", **kw)
    except RuntimeError as err:
        if not _judge_request_failed(err):
            raise
        raise ConfigError(f"--judge: {err}") from err
    print(json.dumps(result, indent=2, default=str))
    print(f"results written to {Path(args.output_dir) / 'eval_results.json'}")
    if args.export:
        print(f"{args.export} answers written to {result['export']['file']}")
    for spec in (s for s in args.judge if f"winrate/{s}/requests" in result):
        usage = {k: result[f"winrate/{spec}/{k}"] for k in ("requests", "cached", "prompt_tokens", "completion_tokens")}
        print(f"judge {spec}: {usage['requests']} requests sent ({usage['cached']} answered from the cache), "
              f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens; every request in "
              f"{Path(args.output_dir) / 'judgments.jsonl'}")


def cmd_ches(args, extra):
    from .data import check_source
    from .eval.ches import run_ches

    device = _placement(args)
    check_source(args.dataset_name)
    summary = run_ches(args.model, args.dataset_name, args.output_dir, filter_top_percent=args.filter_top_percent,
                       filter_key=args.filter_key, device=device, dtype=args.dtype, **_data_kwargs(args))
    print(json.dumps(summary, indent=2))


def cmd_compare(args, extra):
    from .compare import DEFAULT_VARIANTS, parse_variant, rho_sweep_variants, run_compare
    from .train.config import ConfigError

    try:
        variants = [parse_variant(v) for v in (args.variants or ([] if args.rho_sweep else DEFAULT_VARIANTS))]
    except ValueError as err:  # a malformed NAME:key=value spec, named in the message
        raise ConfigError(f"--variants: {err}") from err
    if args.rho_sweep:
        variants = [parse_variant("dpo:sam=none")] + variants + rho_sweep_variants(args.rho_sweep)
    eval_kwargs = None
    if args.eval_dataset_name:
        # compare judges the dataset's prompts (no --prompts_file); an LLM judge's random order uses seed 0
        llm_judge = _llm_judge_settings(argparse.Namespace(**{**vars(args), "seed": 0, "prompts_file": None}))
        eval_kwargs = dict(dataset_name=args.eval_dataset_name, split=args.eval_split, judges=tuple(args.judge),
                           num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                           hessian_probes=args.hessian_probes, max_length=args.max_length,
                           max_prompt_length=args.max_prompt_length, llm_judge=llm_judge,
                           judge_against=args.judge_against or "reference")
    elif any(spec.startswith("llm:") for spec in args.judge):
        llm = next(spec for spec in args.judge if spec.startswith("llm:"))
        raise ConfigError(f"--judge {llm} judges each run's samples: add --eval_dataset_name")
    try:
        result = run_compare(args.config, args.output_dir, variants=variants, seeds=args.seeds,
                             overrides=parse_overrides(extra), eval_kwargs=eval_kwargs, baseline=args.baseline)
    except RuntimeError as err:
        if not _judge_request_failed(err):
            raise
        raise ConfigError(f"--judge: {err}") from err
    print(result["table"])
    print(f"report: {result['html']} and {result['markdown']}")


REPORT_DIR = "runs/report"  # `logitsam report`'s --output_dir for run directories


def cmd_report(args, extra):
    from .report import build_report, find_run_dirs, format_table

    if len(args.run_dirs) == 1 and (Path(args.run_dirs[0]) / "study.yaml").is_file():  # a `logitsam study` folder
        return study_report(Path(args.run_dirs[0]), args.output_dir)
    dirs = [d for root in args.run_dirs for d in (find_run_dirs(root) or [Path(root)])]
    result = build_report(dirs, args.output_dir or REPORT_DIR, title=args.title, baseline=args.baseline)
    print(format_table(result["summary"]))
    print(f"report: {result['html']} and {result['markdown']}")


def study_report(study_dir: Path, output_dir: str | Path | None = None) -> None:
    """The study's summary and figures, into ``output_dir`` (default: the study folder itself)."""
    from .study import build_study_report
    from .train.config import ConfigError

    try:
        result = build_study_report(study_dir, output_dir)
    except ValueError as err:  # no finished run in the folder: the user's folder, not a bug
        raise ConfigError(str(err)) from err
    print(result["markdown"])
    print("written: " + ", ".join(result["files"]))


def cmd_study(args, extra):
    from .study import dry_run_table, load_study, run_study
    from .study.runner import check_train_configs, select
    from .train.config import ConfigError

    if args.report_only:
        if not (args.output_dir or args.config):
            raise ConfigError("--report_only needs --output_dir (the study folder) or --config")
        out = Path(args.output_dir) if args.output_dir else Path("docs/study") / load_study(args.config).name
        return study_report(out)
    if not args.config:
        raise ConfigError("--config (a study recipe, see recipes/study/) is required unless --report_only")
    plan = load_study(args.config)
    out = Path(args.output_dir or Path("docs/study") / plan.name)
    runs = select(plan, args.only)
    check_train_configs(runs)
    if args.dry_run:
        print(dry_run_table(plan, runs, out))
        for run in runs[:1]:
            print(f"\nfirst run's training config ({run.run_id}):\n" + json.dumps(run.train, indent=2, default=str))
            print(f"its eval: {json.dumps(run.eval, default=str)}")
        return None
    done = run_study(plan, out, only=args.only, commit=args.commit, keep_scratch=args.keep_scratch,
                     scratch_dir=args.scratch_dir)
    print(f"finished {len(done)} run(s) now: {', '.join(done) or 'none (all were finished)'}")
    study_report(out)


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


def _add_train(add_parser, common) -> None:
    p = add_parser("train", help="train a causal LM on preference pairs (DPO family, optional SAM)", add_help=False)
    p.add_argument("-h", "--help", action=_TrainHelp, help="every config key with its type, help and default")
    p.add_argument("--config", help="YAML recipe (see recipes/)")
    p.set_defaults(func=cmd_train, takes_extra=True)



def _add_bench(add_parser, common) -> None:
    from .bench import BenchConfig

    p = add_parser("bench", help="time and memory of the LM-head paths (plain/logits-SAM, dense/chunked)")
    for name, default in BenchConfig().__dict__.items():
        p.add_argument(f"--{name}", type=type(default), default=None, help=f"default: {default}")
    p.add_argument("--no_memory", action="store_true", help="skip the per-path memory measurement")
    p.add_argument("--output", help="also write the result as JSON here")
    p.set_defaults(func=cmd_bench)



def _add_simulate(add_parser, common) -> None:
    from .simulate import DEFAULT_MODELS, HEADS, MODELS, PRECISIONS, TRAINERS

    p = add_parser("simulate", help="peak memory of one training step at real model shapes, simulated (no GPU)",
                   epilog="Example: logitsam simulate --models qwen2.5-7b --fsdp 8 --head all --output sim.json")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS), metavar="NAME",
                   help=f"model shapes, of {', '.join(MODELS)} (default: all but tiny-llama)")
    p.add_argument("--fsdp", type=_int_at_least(0), default=0, help="FSDP2 world size (0: one process)")
    p.add_argument("--head", nargs="+", choices=[*HEADS, "all"], default=["all"],
                   help="auto: chunked when one micro-batch's fp32 logits exceed 1 GiB (sam_chunk_size: auto)")
    p.add_argument("--precision", nargs="+", choices=[*PRECISIONS, "all"], default=[PRECISIONS[0]],
                   help="bf16-autocast: float32 master weights under bf16 autocast; bf16: bf16 weights")
    p.add_argument("--trainer", nargs="+", choices=[*TRAINERS, "all"], default=[TRAINERS[0]],
                   help="ours: logitsam's trainer, precomputed reference; trl-subclass: LogitsSAMDPOTrainer at its "
                        "defaults (rho 1e-4, sam_chunk_size from --head, auto its default); trl: TRL's DPOTrainer "
                        "at its defaults (fused head); both TRL ones with TRL's live reference model. One process")
    p.add_argument("--pairs", type=_int_at_least(1), default=8, help="preference pairs per device (TRL: 8)")
    p.add_argument("--seq_len", type=_int_at_least(2), default=1024, help="tokens per row (TRL's max_length)")
    p.add_argument("--completion_fraction", type=_fraction, default=0.5, help="share of each row that is completion")
    p.add_argument("--no_gradient_checkpointing", action="store_true")
    p.add_argument("--output", help="also write every run as JSON here")
    p.set_defaults(func=cmd_simulate)


def _add_eval(add_parser, common) -> None:
    p = add_parser("eval", help="evaluate a checkpoint: preference accuracy, log-prob shifts, win rate, flatness",
                   epilog="Examples: logitsam eval --model runs/dpo --dataset_name pairs.jsonl --split train "
                          "--judge vader --num_prompts 64 --output_dir runs/dpo/eval; at 7B on a GPU: "
                          "logitsam eval --model runs/7b --dataset_name pairs.jsonl --dtype bfloat16 "
                          "--sam_chunk_size auto --output_dir runs/7b/eval; the DPO paper's win rate vs chosen: "
                          "logitsam eval --model runs/dpo --dataset_name pairs.jsonl --judge llm:gpt-4o-mini "
                          "--judge_against chosen --max_new_tokens 256 --output_dir runs/dpo/eval")
    p.add_argument("--model", required=True, help="checkpoint dir, hub id or embedded name")
    p.add_argument("--ref_model", "--ref_model_name_or_path", dest="ref_model",
                   help="reference (default: the run's ref_model_name_or_path, else the model it started from)")
    _add_placement_args(p, what="models, the batches and reward judges", chunking=True)
    _add_data_args(p)
    p.add_argument("--loss_type", default="sigmoid")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--judge", action="append", default=None, type=_eval_judge_spec,
                   help="'vader', 'reward:MODEL' or 'llm:MODEL', a chat model over an OpenAI-compatible server "
                        "(repeatable; default vader)")
    _add_llm_judge_args(p)
    p.add_argument("--prompts_file", type=_existing_path,
                   help="JSONL with a 'prompt' field for judged generation (default: the pairs')")
    p.add_argument("--num_prompts", type=_int_at_least(0), default=64, help="judged prompts (0: skip the win rate)")
    p.add_argument("--max_new_tokens", type=_int_at_least(1), default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--gen_batch_size", type=_int_at_least(1), default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hessian_probes", type=_int_at_least(0), default=0,
                   help="Hutchinson probes (0: skip the Hessian trace)")
    p.add_argument("--hessian_batches", type=_int_at_least(1), default=1)
    p.add_argument("--hessian_head_only", action="store_true", help="trace over the LM head's parameters only")
    p.add_argument("--export", choices=("alpaca_eval", "mt_bench", "arena_hard"),
                   help="also write the model's answers for that benchmark's official tool to OUTPUT_DIR/export/ "
                        "(sampled with --max_new_tokens, --temperature, --top_p, --gen_batch_size, --seed)")
    p.add_argument("--export_questions", metavar="PATH",
                   help="the benchmark's questions: AlpacaEval's eval set (JSON list or JSONL with 'instruction'; "
                        "default: the dataset's single-turn prompts), MT-Bench's or Arena-Hard's question.jsonl")
    p.add_argument("--export_generator", type=_model_id, metavar="NAME",
                   help="the model's name in the answers (AlpacaEval generator, model_id, file name; "
                        "default: the --model path's last part)")
    p.add_argument("--output_dir", default="runs/eval")
    p.set_defaults(func=cmd_eval)



def _add_llm_judge_args(p) -> None:
    """The settings of `eval`'s ``llm:MODEL`` judges (``logitsam.eval.llm_judge.LLMJudgeConfig``)."""
    g = p.add_argument_group("LLM judge (--judge llm:MODEL)")
    g.add_argument("--judge_template", metavar="NAME|PATH",
                   help="dpo_dialogue (default), dpo_summary, mt_bench_pair, arena_hard, alpaca_eval, or a "
                        "template file")
    g.add_argument("--judge_against", metavar="reference|chosen|PATH",
                   help="the opponent: the reference's samples (default; 'vs SFT'), the dataset's chosen response "
                        "('vs chosen'), or a previous eval's eval_samples.jsonl / judgments.jsonl (its policy)")
    g.add_argument("--judge_base_url", metavar="URL",
                   help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (default $OPENAI_BASE_URL, else "
                        "OpenAI's)")
    g.add_argument("--judge_api_key", metavar="KEY",
                   help="default $OPENAI_API_KEY (prefer it: a key here shows in the process list); never written "
                        "to any output")
    g.add_argument("--judge_orders", choices=("both", "random"),
                   help="ask each pair in both orders (default; a disagreement is a tie) or in one order drawn from "
                        "--seed")
    g.add_argument("--judge_concurrency", type=_int_at_least(1), metavar="N", help="requests in flight (default 8)")
    g.add_argument("--judge_timeout", type=_positive_float, metavar="SECONDS", help="per request (default 120)")
    g.add_argument("--judge_max_retries", type=_int_at_least(0), metavar="N",
                   help="retries on 429, 5xx, timeouts, with exponential backoff (default 5)")
    g.add_argument("--judge_max_tokens", type=_int_at_least(1), metavar="N",
                   help="answer budget (default: the template's)")
    g.add_argument("--judge_cache", metavar="DIR",
                   help="request cache (default: $LOGITSAM_CACHE/judge, else ~/.cache/logitsam/judge)")
    g.add_argument("--no_judge_cache", action="store_true", help="neither read nor write the request cache")


def _add_ches(add_parser, common) -> None:
    p = add_parser("ches", help="CHES scores per pair (Razin et al. 2025) and a filtered dataset",
                   epilog="Example: logitsam ches --model smollm2-135m-instruct --dataset_name hh.jsonl.gz "
                          "--split train --filter_top_percent 10 --dtype bfloat16 --output_dir runs/ches")
    p.add_argument("--model", default="smollm2-135m-instruct")
    # CHES reads the final hidden states only: no LM head, nothing to chunk
    _add_placement_args(p, what="model and the batches", chunking=False)
    _add_data_args(p, split="train")
    p.add_argument("--filter_top_percent", type=float, help="also write filtered.jsonl without the top-k %% pairs")
    p.add_argument("--filter_key", default="ches", choices=["ches", "ches_norm", "edit_distance"])
    p.add_argument("--output_dir", default="runs/ches")
    p.set_defaults(func=cmd_ches)



def _add_compare(add_parser, common) -> None:
    p = add_parser("compare", help="train variants x seeds from one recipe, evaluate, and write a report",
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
    p.add_argument("--judge", action="append", default=None, type=_eval_judge_spec,
                   help="vader (default), reward:MODEL or llm:MODEL (see `logitsam eval`); repeatable")
    _add_llm_judge_args(p)
    p.add_argument("--num_prompts", type=_int_at_least(0), default=32)
    p.add_argument("--max_new_tokens", type=_int_at_least(1), default=48)
    p.add_argument("--hessian_probes", type=_int_at_least(0), default=0)
    p.add_argument("--max_length", type=_int_at_least(1), default=1024, help="of each run's eval (default: TRL's)")
    p.add_argument("--max_prompt_length", type=_int_at_least(1), default=None)
    p.add_argument("--output_dir", default="runs/compare")
    p.set_defaults(func=cmd_compare, takes_extra=True)



def _add_report(add_parser, common) -> None:
    p = add_parser("report", help="rebuild a report from finished run directories",
                   epilog="Example: logitsam report runs/compare/runs --output_dir runs/compare")
    p.add_argument("run_dirs", nargs="+", type=_existing_path, help="run directories, or folders holding them")
    p.add_argument("--title", default="logitsam report")
    p.add_argument("--baseline")
    p.add_argument("--output_dir", help=f"where the report goes, created if missing (default: {REPORT_DIR}; for a "
                   "study folder, the folder itself)")
    p.set_defaults(func=cmd_report)



def _add_study(add_parser, common) -> None:
    p = add_parser("study", help="a resumable rho x seed study from a study recipe, run by run, with its report",
                   description="Expands recipes/study/*.yaml into runs (ids like rho1e-2_seed1), trains and evaluates "
                               "them one at a time in fresh processes, keeps each run's small files under "
                               "--output_dir (never weights) and skips finished runs on the next call.",
                   epilog="Examples:\n  logitsam study --config recipes/study/sentiment.yaml --dry_run\n"
                          "  logitsam study --config recipes/study/sentiment.yaml --commit\n"
                          "  logitsam study --config recipes/study/hh.yaml --only rho0_seed1 rho1e-2_seed1\n"
                          "  logitsam report docs/study/sentiment",
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="study recipe (recipes/study/*.yaml)")
    p.add_argument("--output_dir", help="where the small result files go (default: docs/study/<name>)")
    p.add_argument("--only", nargs="+", metavar="RUN_ID", help="run just these runs (finished ones are still skipped)")
    p.add_argument("--dry_run", action="store_true", help="list the runs, their status and time estimate; run nothing")
    p.add_argument("--commit", action="store_true", help="git add + git commit each run's small files and the report")
    p.add_argument("--report_only", action="store_true", help="rebuild the table and figure from finished runs")
    p.add_argument("--scratch_dir", help="where weights and logs go while a run trains (default: runs/study/<name>)")
    p.add_argument("--keep_scratch", action="store_true", help="keep each run's weights in the scratch dir")
    p.set_defaults(func=cmd_study)



def _add_data(add_parser, common) -> None:
    p = add_parser("data", help="build datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("build-sentiment", parents=[common],
                            help="the on-policy sentiment preference dataset (VADER judge)")
    q.add_argument("--output_dir", default="runs/sentiment-data")
    q.add_argument("--num_prompts", type=_int_at_least(1))
    q.add_argument("--samples_per_prompt", type=_int_at_least(2), default=4)
    q.add_argument("--temperature", type=float, default=1.0)
    q.add_argument("--max_new_tokens", type=_int_at_least(1), default=48)
    q.add_argument("--min_gap", type=float, default=0.3)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--batch_size", type=_int_at_least(1), default=32)
    q.set_defaults(func=cmd_build_sentiment)



def _add_demo(add_parser, common) -> None:
    p = add_parser("demo", help="DPO vs DPO + logits-SAM on the embedded model and data, with a report")
    p.add_argument("--output_dir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a one-minute version (used by the tests)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)



def _add_theory(add_parser, common) -> None:
    p = add_parser("theory", help="the softmax-regression theory lab: checks and figures")
    p.add_argument("--output_dir", default="runs/theory")
    p.add_argument("--seeds", type=_int_at_least(1), default=200, help="random problems for the sign-rule statistics")
    p.add_argument("--real", action="store_true",
                   help="instead: Fig. 1c on the embedded SmolLM2 with real HH pairs (minutes on a CPU)")
    p.add_argument("--real_dataset", default="../shared/data/hh-rlhf/harmless-base-test.jsonl.gz")
    p.add_argument("--real_steps", type=_int_at_least(1), default=24)
    p.add_argument("--real_rho", type=float, default=1e-3)
    p.set_defaults(func=cmd_theory)


_COMMANDS = (_add_train, _add_bench, _add_simulate, _add_eval, _add_ches, _add_compare, _add_report, _add_study,
             _add_data, _add_demo, _add_theory)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logitsam", description="Preference optimization (DPO and variants) with logits-SAM on the LM head.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # --debug also after the command name; SUPPRESS keeps the subcommand from resetting it to False
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = functools.partial(sub.add_parser, parents=[common])
    for add in _COMMANDS:  # one function per command, in the order `logitsam -h` lists them
        add(add_parser, common)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """The exception types that mean a mistake in the user's input (or a run that stopped as configured,
    like ``on_nonfinite: stop``), not a bug in logitsam."""
    from .data import DataError
    from .models import ModelError
    from .study.runner import StudyCommitError
    from .train.config import ConfigError
    from .train.trainer import NonFiniteLossError

    return ConfigError, DataError, ModelError, NonFiniteLossError, StudyCommitError


def main(argv: list[str] | None = None) -> None:
    """Run one command. A user mistake ends in one line on stderr and exit code 2; a bug keeps its traceback.

    ``--debug`` (or LOGITSAM_DEBUG=1) shows the traceback of a user mistake too.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "judge", "unset") is None:
        args.judge = ["vader"]
    debug = getattr(args, "debug", False) or os.environ.get("LOGITSAM_DEBUG", "") not in ("", "0")
    try:
        args.func(args, extra)
    except Exception as err:
        if debug or not isinstance(err, _user_errors()):
            raise
        message = " ".join(line.strip() for line in str(err).splitlines())  # one line, whatever it holds
        print(f"logitsam {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])

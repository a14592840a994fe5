"""Side by side with TRL: seconds per step and peak memory of TRL's DPOTrainer and logitsam's trainers.

    python benchmarks/bench_trl.py --precompute --preference-trainer   # SmolLM2-135M-Instruct on HH pairs
    python benchmarks/bench_trl.py --tiny           # a random 2-layer Llama: checks the script in seconds
    python benchmarks/bench_trl.py --device cuda --bf16 --preference-trainer --output bench_trl.json
    python benchmarks/bench_trl.py --precompute --preference-trainer --profile --profile-dir prof/

Variants. Every one gets the same model, pairs, tokens, batches (same sampler seed: the driver checks a digest
of every step's batch) and TrainingArguments:

    trl        trl.DPOTrainer (plain DPO): the baseline of every ratio
    ours       logitsam.trl.LogitsSAMDPOTrainer, sam_rho = 0 (plain DPO through logitsam's head)
    ours-sam   logitsam.trl.LogitsSAMDPOTrainer, sam_rho = --rho
    pt         logitsam's PreferenceTrainer, sam = none (plain DPO), on TRL's tokens    (with --preference-trainer)
    pt-sam     logitsam's PreferenceTrainer, sam = logits, rho = --rho, on TRL's tokens (with --preference-trainer)

How it measures:
  * One fresh process per (round, variant). A Trainer's ``train()`` runs the whole loop, so steps of several
    trainers cannot be interleaved in one process without rewriting the loop we want to measure, five policies
    with their AdamW states would not fit side by side on a small machine, and a process's peak memory (CPU: peak
    RSS, reset at train begin; CUDA: ``max_memory_allocated``) would carry allocator caches over from the
    variant before. So every run starts clean and its peak memory is that variant's alone. At train begin every
    run also collects garbage and, on a CPU, returns glibc's free heap to the OS (``malloc_trim``), so memory a
    setup freed (a deleted reference) does not count in the training loop's peak.
  * ``--repeats`` rounds, alternated: round 1 runs the variants in order, round 2 in reverse, and so on
    (ABCDE EDCBA ...), so a slow drift of the machine (another job, heat) is spread over all variants instead
    of landing on whichever ran last.
  * In each run the first ``--warmup`` of the ``--steps`` optimizer steps are left out (lazy allocation, AdamW
    state, first-call kernels); the run's value is the median of the remaining steps. Per variant the table gives
    the median, min and max of those per-run medians, the ratio of the median to ``trl``'s, and the median of the
    per-round ratios (the variant against ``trl`` of the same round: robust to drift between rounds).
    A step is timed from ``on_step_begin`` to ``on_step_end``: forward, backward, clipping, optimizer step
    (the batch is loaded before; logging comes after).
  * With ``--precompute`` no reference model is alive during training, for every variant: TRL and the subclass
    get ``ref_model=None`` (TRL 1.16 then precomputes with the untrained policy and keeps no reference; a
    ``ref_model`` passed with ``precompute_ref_log_probs=True`` would be kept, prepared in accelerate's model
    list); the PreferenceTrainer is built as ``logitsam train`` builds it (``train/run.py``): ``ref_model=None``,
    then ``ReferencePrecompute`` at train begin with a deep-copied reference that is dropped before step 1. Each run
    reports the live ``PreTrainedModel`` objects and accelerate's ``_models`` at its first step, and the driver refuses
    a run that kept a reference.

Printed: one line per run as it finishes, then the summary table; ``--output`` writes everything (settings,
environment, every run's step durations, the summary, the profiles) as JSON.

Flags beyond the model / data / TrainingArguments ones:
  --repeats N          rounds (fresh processes per variant and round; default 3)
  --steps N            optimizer steps per run, warm-up included (default 7)
  --warmup N           first steps of each run left out (default 2)
  --variants a,b,...   a subset of the variants above (``trl`` is needed for the ratios)
  --threads N          torch.set_num_threads in every run (default: torch's own)
  --profile            instead of timing: one process per variant, ``--warmup`` steps, then one step under
                       torch.profiler; prints the top 15 ops by self CPU time
                       (``key_averages().table(sort_by="self_cpu_time_total", row_limit=15)``)
  --profile-dir DIR    also save each variant's table (DIR/<variant>.txt) and Chrome trace (DIR/<variant>.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

VARIANTS = ("trl", "ours", "ours-sam", "pt", "pt-sam")
PT_VARIANTS = ("pt", "pt-sam")
LABELS = {
    "trl": "TRL DPOTrainer (plain DPO)",
    "ours": "LogitsSAMDPOTrainer, rho 0",
    "ours-sam": "LogitsSAMDPOTrainer, logits-SAM",
    "pt": "PreferenceTrainer, plain DPO",
    "pt-sam": "PreferenceTrainer, logits-SAM",
}
HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
WORDS = ["good", "bad", "fine", "great", "awful", "nice", "poor", "kind", "rude", "calm"]
PROFILE_ROWS = 15


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="hub id, local dir or embedded name")
    p.add_argument("--tiny", action="store_true", help="a random 2-layer Llama with the model's tokenizer")
    p.add_argument("--data", default=str(HH), help="HH-style .jsonl(.gz) (chosen/rejected transcripts); "
                   "synthetic pairs when the file is missing")
    p.add_argument("--pairs", type=int, default=16, help="pairs read from --data (or made up)")
    p.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    p.add_argument("--max-length", type=int, default=256, help="DPOConfig max_length")
    p.add_argument("--steps", type=int, default=7, help="optimizer steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of its median")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each variant runs once per round, in a fresh "
                   "process, the order reversed every other round")
    p.add_argument("--rho", type=float, default=1e-3, help="sam_rho of the SAM runs")
    p.add_argument("--chunk-size", type=int, default=None, help="sam_chunk_size of logitsam's head (None: dense)")
    p.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs (no reference model kept)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast over float32 weights (TRL's own default)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="(TRL's own default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preference-trainer", action="store_true",
                   help="also run logitsam's PreferenceTrainer: pt (plain DPO) and pt-sam (logits-SAM)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: trl,ours,ours-sam, "
                        "plus pt,pt-sam with --preference-trainer)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every run")
    p.add_argument("--profile", action="store_true", help="profile one step of each variant instead of timing")
    p.add_argument("--profile-dir", default=None, help="with --profile: save tables and Chrome traces here")
    p.add_argument("--output", default=None, help="write all results as JSON here")
    p.add_argument("--worker", default=None, choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.steps <= opts.warmup and not opts.profile:
        p.error(f"--steps {opts.steps} leaves no step after --warmup {opts.warmup}")
    if opts.repeats < 1:
        p.error("--repeats must be >= 1")
    return opts


def selected_variants(opts) -> list[str]:
    if opts.variants:
        names = [v.strip() for v in opts.variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"bench_trl: unknown --variants {unknown}; choose from {list(VARIANTS)}")
        return [v for v in VARIANTS if v in names]
    return [v for v in VARIANTS if v not in PT_VARIANTS or opts.preference_trainer]


def round_order(variants: list[str], round_index: int) -> list[str]:
    """ABCDE, EDCBA, ABCDE, ...: every other round reversed, so a linear drift hits all variants alike."""
    return list(variants) if round_index % 2 == 0 else list(reversed(variants))


# ---- one run (in a worker process) ---------------------------------------------------------------
def load(opts):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from logitsam.models import load_model, load_tokenizer

    tok = load_tokenizer(opts.model)
    if opts.tiny:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                          tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        model = LlamaForCausalLM(cfg).float()
    else:
        model = load_model(opts.model, dtype="float32")
    model.config.use_cache = False
    return tok, model


def pairs(opts):
    from datasets import Dataset

    if Path(opts.data).exists():
        from logitsam.data import DropReport, load_rows

        rows = load_rows(opts.data, max_samples=opts.pairs, report=DropReport(source=opts.data, on_invalid="drop"))
        rows = [{"chosen": r["chosen"], "rejected": r["rejected"]} for _, r in rows]  # TRL finds the prompt
    else:
        print(f"{opts.data} not found: synthetic pairs", file=sys.stderr)
        rows = [{"prompt": f"Say something {i}: " + " ".join(WORDS) * 4, "chosen": f" {WORDS[i % 10]} day" * 8,
                 "rejected": f" {WORDS[(3 * i + 1) % 10]} night" * 9} for i in range(opts.pairs)]
    return Dataset.from_list(rows)


def steps_of(opts) -> int:
    return opts.warmup + 1 if opts.profile else opts.steps


def settings(opts, out):
    return dict(output_dir=out, per_device_train_batch_size=opts.batch_size, max_steps=steps_of(opts),
                learning_rate=5e-7, lr_scheduler_type="constant", max_length=opts.max_length, beta=0.1,
                precompute_ref_log_probs=opts.precompute, bf16=opts.bf16,
                gradient_checkpointing=opts.gradient_checkpointing, use_cpu=opts.device == "cpu",
                report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                dataloader_num_workers=0, seed=0)


def batch_digest(batch) -> str:
    """The unpadded tokens and completion positions of every row of a collated batch, hashed: the same for TRL's
    collator (``completion_mask``) and logitsam's (``labels != -100``) when the pairs are the same."""
    import hashlib

    import torch

    ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
    completion = batch["completion_mask"].cpu().bool() if "completion_mask" in batch \
        else (batch["labels"].cpu() != -100)
    h = hashlib.blake2b(digest_size=8)
    for r in range(ids.shape[0]):
        h.update(ids[r][mask[r]].to(torch.int64).numpy().tobytes())
        h.update(b"|" + completion[r][mask[r]].to(torch.uint8).numpy().tobytes() + b";")
    return h.hexdigest()


class RecordBatches:
    """Wraps a collator; keeps a digest of every batch it makes (accelerate collates one batch ahead)."""

    def __init__(self, collate):
        self.collate, self.digests = collate, []

    def __call__(self, features):
        batch = self.collate(features)
        self.digests.append(batch_digest(batch))
        return batch


def live_models() -> int:
    """Outermost ``PreTrainedModel`` objects alive in this process (1, the policy, when no reference is kept)."""
    import gc

    from transformers import PreTrainedModel

    gc.collect()
    models = [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
    inner = {id(m) for o in models for m in o.modules() if m is not o}  # a CausalLM's own backbone is one too
    return sum(1 for o in models if id(o) not in inner)


def release_free_heap() -> int | None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``); the RSS bytes released, None without glibc.

    A setup that freed a lot (the PreferenceTrainer's deep-copied reference, ~0.4 GiB of SmolLM2-135M's 0.5 GiB
    stays in glibc's heap after ``del``) would otherwise start the training loop with a higher RSS than a setup
    that never allocated it; called at train begin in every CPU run, so each starts from its live memory only.
    """
    import ctypes

    from logitsam._memory import current_rss_bytes

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    before = current_rss_bytes()
    trim(0)
    return before - current_rss_bytes()


def step_timer(opts):
    import torch
    from transformers import TrainerCallback

    from logitsam._memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    cuda = opts.device == "cuda"

    class StepTimer(TrainerCallback):
        """Seconds per optimizer step, the training loop's peak memory, what is alive at the first step, and (with
        --profile) a torch.profiler trace of the first step after the warm-up."""

        def __init__(self):
            self.durations, self.start, self.begin_bytes, self.peak_reset, self.trimmed_bytes = [], None, 0, None, None
            self.trainer, self.models_alive, self.accelerate_models, self.profiler, self.profile = None, None, None, \
                None, None
            self.begun = False

        def begin(self):
            """At the first step (after every train-begin callback, e.g. logitsam's reference precompute, which
            drops its reference there)."""
            self.begun = True
            self.models_alive = live_models()  # (collects garbage first: the same clean start for every variant)
            if self.trainer is not None:
                self.accelerate_models = len(self.trainer.accelerator._models)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                self.begin_bytes = torch.cuda.memory_allocated()
            else:
                self.trimmed_bytes = release_free_heap()
            self.peak_reset = reset_peak_rss()
            if not cuda:
                self.begin_bytes = current_rss_bytes()

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.begun:
                self.begin()
            if cuda:
                torch.cuda.synchronize()
            if opts.profile and state.global_step == opts.warmup:
                from torch.profiler import ProfilerActivity, profile

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                self.profiler = profile(activities=activities)
                self.profiler.__enter__()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.durations.append(time.perf_counter() - self.start)
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                self.profile, self.profiler = self.profiler, None

        def peak(self):
            return torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()

    return StepTimer()


def logitsam_rows(trl_dataset, max_length):
    """TRL's tokens (prompt_ids, chosen_ids, rejected_ids; keep_start truncation) in logitsam's columns."""
    def row(ex):
        out = {}
        for side in ("chosen", "rejected"):
            ids = (ex["prompt_ids"] + ex[f"{side}_ids"])[:max_length]
            labels = ([-100] * len(ex["prompt_ids"]) + ex[f"{side}_ids"])[:max_length]
            out[f"{side}_input_ids"], out[f"{side}_labels"] = ids, labels
        return out

    return trl_dataset.map(row, remove_columns=trl_dataset.column_names)


def preference_trainer(opts, tok, model, data, out, timer):
    """PreferenceTrainer (plain DPO or logits-SAM) on the tokens TRL's pipeline makes from the same pairs, built
    as ``logitsam train`` builds it (``train/run.py``): with --precompute, no live reference in the trainer and the
    reference log-probs filled at train begin (``ReferencePrecompute``) from a reference dropped afterwards."""
    from transformers import TrainingArguments
    from trl import DPOConfig, DPOTrainer

    from logitsam.data import PreferenceCollator
    from logitsam.models import load_reference
    from logitsam.train.reference import ReferenceLookup, ReferencePrecompute, model_identity, with_reference_rows
    from logitsam.train.trainer import PreferenceTrainer

    cfg = DPOConfig(**settings(opts, out))
    # TRL's own preparation (prompt extraction, EOS, tokenisation, drop rule); it reads only `_tokenizer`
    tokens = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), data, tok, cfg, "train")
    dataset = logitsam_rows(tokens, opts.max_length)
    collate = PreferenceCollator(tok.pad_token_id)
    args = TrainingArguments(**{k: v for k, v in settings(opts, out).items()
                                if k not in ("max_length", "beta", "precompute_ref_log_probs")},
                             remove_unused_columns=False)
    ref = load_reference(model, None, device=args.device)  # a frozen deep copy, on the training device
    sam = "logits" if opts.worker == "pt-sam" else "none"
    if opts.precompute:
        # as run_training: the values are looked up by row, filled at train begin from the prepared reference,
        # which is dropped then; the on-disk cache goes to this run's temporary directory (this worker process
        # runs one training), so every run computes its own (as TRL does) and nothing is left in ~/.cache
        os.environ["LOGITSAM_CACHE"] = out
        dataset, _ = with_reference_rows(dataset)
        collate = ReferenceLookup(collate)
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                                data_collator=collate, callbacks=[timer], loss_type="sigmoid", beta=0.1, sam=sam,
                                sam_rho=opts.rho, chunk_size=opts.chunk_size,
                                ref_model=None if opts.precompute else ref,
                                precompute_ref_model=ref if opts.precompute else None)
    if opts.precompute:
        trainer.add_callback(ReferencePrecompute(trainer, collate, source="reference", identity=model_identity(ref),
                                                 chunk_size=opts.chunk_size))
    del ref
    return trainer


def build_trainer(opts, tok, model, data, out, timer):
    import copy

    from trl import DPOConfig, DPOTrainer

    from logitsam.trl import LogitsSAMConfig, LogitsSAMDPOTrainer

    if opts.worker in PT_VARIANTS:
        return preference_trainer(opts, tok, model, data, out, timer)
    # precompute: ref_model=None, so TRL precomputes with the (untrained) policy and keeps no reference; a
    # ref_model passed along would stay in the trainer and in accelerate's model list for the whole run
    ref = None if opts.precompute else copy.deepcopy(model).eval()
    if opts.worker == "trl":
        return DPOTrainer(model=model, ref_model=ref, args=DPOConfig(**settings(opts, out)), train_dataset=data,
                          processing_class=tok, callbacks=[timer])
    config = LogitsSAMConfig(**settings(opts, out), sam_rho=opts.rho if opts.worker == "ours-sam" else 0.0,
                             sam_chunk_size=opts.chunk_size)
    return LogitsSAMDPOTrainer(model=model, ref_model=ref, args=config, train_dataset=data, processing_class=tok,
                               callbacks=[timer])


def worker(opts) -> dict:
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    load_avg = os.getloadavg()[0]
    t0 = time.perf_counter()
    tok, model = load(opts)
    data, timer = pairs(opts), step_timer(opts)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(opts, tok, model, data, out, timer)
        setup_seconds = time.perf_counter() - t0
        timer.trainer = trainer
        trainer.data_collator = recorder = RecordBatches(trainer.data_collator)
        trainer.train()
    steps = timer.durations[opts.warmup:]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    result = {
        "variant": opts.worker, "round": opts.round, "step_seconds": timer.durations, "steps_timed": len(steps),
        "seconds_per_step": statistics.median(steps) if steps else None,
        "peak_memory_bytes": timer.peak(), "train_begin_memory_bytes": timer.begin_bytes,
        "heap_released_at_train_begin_bytes": timer.trimmed_bytes,
        "peak_reset": timer.peak_reset, "setup_seconds": setup_seconds, "device": opts.device,
        "threads": torch.get_num_threads(), "load_average_1m": load_avg,
        "first_loss": losses[0] if losses else None,
        "batch_digest": "-".join(recorder.digests[:steps_of(opts)]),
        "reference_kept": getattr(trainer, "ref_model", None) is not None,
        "models_alive_at_train_begin": timer.models_alive,
        "accelerate_models_at_train_begin": timer.accelerate_models,
    }
    if timer.profile is not None:
        result["profile_table"] = timer.profile.key_averages().table(sort_by="self_cpu_time_total",
                                                                     row_limit=PROFILE_ROWS)
        if opts.profile_dir:
            trace = Path(opts.profile_dir) / f"{opts.worker}.json"
            trace.parent.mkdir(parents=True, exist_ok=True)
            timer.profile.export_chrome_trace(str(trace))
            result["profile_trace"] = str(trace)
    return result


# ---- the driver ------------------------------------------------------------------------------------
def driver_argv(argv) -> list[str]:
    """The invocation's own flags, minus --output (workers never write it)."""
    args = list(argv if argv is not None else sys.argv[1:])
    out = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--output":
            skip = True
            continue
        if a.startswith("--output="):
            continue
        out.append(a)
    return out


def run_one(opts, argv, variant: str, round_index: int) -> dict:
    cmd = [sys.executable, __file__, *driver_argv(argv), "--worker", variant, "--round", str(round_index)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-6000:])
        raise SystemExit(f"bench_trl: run {variant!r} (round {round_index + 1}) failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len("RESULT "):])
    if opts.precompute and (result["reference_kept"] or (result["models_alive_at_train_begin"] or 0) > 1):
        raise SystemExit(f"bench_trl: run {variant!r} kept a reference model with --precompute "
                         f"(trainer.ref_model set: {result['reference_kept']}, "
                         f"PreTrainedModel objects alive: {result['models_alive_at_train_begin']}, "
                         f"accelerate models: {result['accelerate_models_at_train_begin']})")
    return result


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize(variants, runs, base="trl") -> list[dict]:
    """Per variant: min/median/max over rounds of the per-run median step time and of the peak memory, and the
    ratios to ``base`` (of the medians, and the median of the same-round ratios)."""
    by = {v: sorted((r for r in runs if r["variant"] == v), key=lambda r: r["round"]) for v in variants}
    base_runs = {r["round"]: r for r in by.get(base, [])}
    base_time = spread([r["seconds_per_step"] for r in by.get(base, [])])["median"]
    base_mem = spread([r["peak_memory_bytes"] for r in by.get(base, [])])["median"]
    rows = []
    for v in variants:
        time_s = spread([r["seconds_per_step"] for r in by[v]])
        mem = spread([r["peak_memory_bytes"] for r in by[v]])
        paired = [r["seconds_per_step"] / base_runs[r["round"]]["seconds_per_step"]
                  for r in by[v] if r["round"] in base_runs and base_runs[r["round"]]["seconds_per_step"]]
        mem_paired = [r["peak_memory_bytes"] / base_runs[r["round"]]["peak_memory_bytes"]
                      for r in by[v] if r["round"] in base_runs and base_runs[r["round"]]["peak_memory_bytes"]]
        first = [r["first_loss"] for r in by[v] if r["first_loss"] is not None]
        rows.append({
            "variant": v, "label": LABELS[v], "runs": len(by[v]),
            "steps_timed": sum(r["steps_timed"] for r in by[v]),
            "seconds_per_step": time_s, "peak_memory_bytes": mem,
            "time_ratio": time_s["median"] / base_time if base_time and time_s["median"] is not None else None,
            "time_ratio_paired": spread(paired),
            "memory_ratio": mem["median"] / base_mem if base_mem and mem["median"] is not None else None,
            "memory_ratio_paired": spread(mem_paired),
            "first_loss": first[0] if first else None,
        })
    return rows


def format_table(rows) -> str:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    head = (f"{'variant':9s} {'label':32s} {'s/step med':>10s} {'[min, max]':>17s} {'x trl':>6s} "
            f"{'paired x trl [min, max]':>24s} {'peak MiB':>9s} {'[min, max]':>13s} {'x trl':>6s} {'first loss':>10s}")
    lines = [head]
    for r in rows:
        t, m, p = r["seconds_per_step"], r["peak_memory_bytes"], r["time_ratio_paired"]
        mib = {k: None if v is None else v / 2**20 for k, v in m.items()}
        lines.append(
            f"{r['variant']:9s} {r['label']:32s} {num(t['median'], '10.3f')} "
            f"{'[' + num(t['min'], '.3f') + ', ' + num(t['max'], '.3f') + ']':>17s} {num(r['time_ratio'], '6.2f')} "
            f"{num(p['median'], '.2f') + ' [' + num(p['min'], '.2f') + ', ' + num(p['max'], '.2f') + ']':>24s} "
            f"{num(mib['median'], '9.0f')} {'[' + num(mib['min'], '.0f') + ', ' + num(mib['max'], '.0f') + ']':>13s} "
            f"{num(r['memory_ratio'], '6.2f')} {num(r['first_loss'], '10.5f')}")
    return "\n".join(lines)


def environment() -> dict:
    import torch
    import transformers
    import trl

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "cpus": os.cpu_count(), "platform": platform.platform(),
            "load_average_at_start": os.getloadavg()}


def pairs_kept(opts) -> tuple[int, int]:
    """(pairs TRL's preparation keeps at --max-length, pairs read): TRL drops a pair whose completion is cut off."""
    from trl import DPOConfig, DPOTrainer

    from logitsam.models import load_tokenizer

    tok, data = load_tokenizer(opts.model), pairs(opts)
    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(**settings(opts, out))
        tokens = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), data, tok, cfg, "train")
    return len(tokens), len(data)


def check_batches(runs) -> bool:
    digests = {r["batch_digest"] for r in runs}
    if len(digests) > 1:
        which = sorted({(r["variant"], r["batch_digest"][:23]) for r in runs})
        print(f"bench_trl: WARNING: the variants did not train on the same batches: {which}", file=sys.stderr)
        return False
    return True


def profile_all(opts, argv, variants) -> dict:
    tables = {}
    for v in variants:
        result = run_one(opts, argv, v, 0)
        tables[v] = result
        print(f"\n== {v}: {LABELS[v]}, step {opts.warmup + 1} ({result['step_seconds'][-1]:.3f} s under the profiler)"
              f", top {PROFILE_ROWS} by self CPU time ==")
        print(result.get("profile_table", "(no profile)"), flush=True)
        if opts.profile_dir:
            path = Path(opts.profile_dir) / f"{v}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(result.get("profile_table", "") + "\n")
    check_batches(list(tables.values()))
    return tables


def main(argv=None):
    opts = parse_args(argv)
    try:
        import trl  # noqa: F401
    except ImportError:
        print("bench_trl: skipped, TRL is not installed (pip install 'logitsam[trl]')")
        return 0
    if opts.worker:
        print("RESULT " + json.dumps(worker(opts)), flush=True)
        return 0
    variants = selected_variants(opts)
    env = environment()
    kept, read = pairs_kept(opts)
    if kept < opts.batch_size:
        raise SystemExit(f"bench_trl: TRL keeps {kept} of {read} pairs at --max-length {opts.max_length} (it drops "
                         "pairs whose completion is cut off); raise --max-length or --pairs")
    what = "tiny random Llama" if opts.tiny else opts.model
    header = (f"{what}, {kept} pairs ({read} read), {opts.batch_size} pairs/step, max_length {opts.max_length}, "
              f"{opts.device}"
              f"{', bf16' if opts.bf16 else ''}{', cached reference' if opts.precompute else ', reference model'}, "
              f"rho {opts.rho:g}; load average at start {env['load_average_at_start'][0]:.2f} on {env['cpus']} CPUs")
    if opts.profile:
        print(header + f"; profiling step {opts.warmup + 1} of each variant", flush=True)
        profiles = profile_all(opts, argv, variants)
        if opts.output:
            Path(opts.output).write_text(json.dumps({"settings": vars(opts), "environment": env,
                                                     "profile": profiles}, indent=2) + "\n")
        return 0
    if "trl" not in variants:
        raise SystemExit("bench_trl: --variants must include trl (the baseline of every ratio)")
    print(header + f"; {opts.repeats} rounds x {opts.steps} steps, the first {opts.warmup} of each run left out",
          flush=True)
    runs = []
    for rnd in range(opts.repeats):
        for v in round_order(variants, rnd):
            r = run_one(opts, argv, v, rnd)
            runs.append(r)
            print(f"  round {rnd + 1}/{opts.repeats} {v:9s} {r['seconds_per_step']:.3f} s/step "
                  f"(median of {r['steps_timed']}; all: {', '.join(f'{s:.2f}' for s in r['step_seconds'])}), "
                  f"peak {r['peak_memory_bytes'] / 2**20:.0f} MiB, load {r['load_average_1m']:.2f}", flush=True)
    same_batches = check_batches(runs)
    rows = summarize(variants, runs)
    print()
    print(format_table(rows))
    print(f"(s/step: median over {opts.repeats} rounds of each run's median step; paired: the variant / trl of "
          f"the same round; peak memory: {'CUDA max_memory_allocated' if opts.device == 'cuda' else 'peak RSS'} "
          f"from train begin; load average at end {os.getloadavg()[0]:.2f})")
    if opts.output:
        Path(opts.output).write_text(json.dumps({
            "settings": vars(opts), "pairs_kept": kept, "environment": {**env, "load_average_at_end": os.getloadavg()},
            "same_batches": same_batches, "summary": rows, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

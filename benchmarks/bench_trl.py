"""Side by side with TRL: seconds per step and peak memory of TRL's DPOTrainer and logitsam's trainers.

    python benchmarks/bench_trl.py                  # SmolLM2-135M-Instruct on HH pairs (minutes on a CPU)
    python benchmarks/bench_trl.py --tiny           # a random 2-layer Llama: checks the script in seconds
    python benchmarks/bench_trl.py --device cuda --bf16 --preference-trainer --output bench_trl.json

Every run gets the same model, pairs, tokens and TrainingArguments, and runs in its own process (a CPU
peak RSS is per process):

    trl        trl.DPOTrainer
    ours       logitsam.trl.LogitsSAMDPOTrainer, sam_rho = 0 (plain DPO through logitsam's head)
    ours-sam   logitsam.trl.LogitsSAMDPOTrainer, sam_rho = --rho
    pt-sam     logitsam's PreferenceTrainer, sam = logits (with --preference-trainer), on TRL's tokens

Printed: seconds per optimizer step (median after --warmup steps) and the peak memory of the training
loop (CUDA: max_memory_allocated; CPU: peak RSS from train begin), each also as a ratio to ``trl``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

RUNS = ("trl", "ours", "ours-sam", "pt-sam")
HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
WORDS = ["good", "bad", "fine", "great", "awful", "nice", "poor", "kind", "rude", "calm"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="hub id, local dir or embedded name")
    p.add_argument("--tiny", action="store_true", help="a random 2-layer Llama with the model's tokenizer")
    p.add_argument("--data", default=str(HH), help="HH-style .jsonl(.gz) (chosen/rejected transcripts); "
                   "synthetic pairs when the file is missing")
    p.add_argument("--pairs", type=int, default=16, help="pairs read from --data (or made up)")
    p.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    p.add_argument("--max-length", type=int, default=256, help="DPOConfig max_length")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the median")
    p.add_argument("--rho", type=float, default=1e-3, help="sam_rho of the SAM runs")
    p.add_argument("--chunk-size", type=int, default=None, help="sam_chunk_size of logitsam's head (None: dense)")
    p.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs (no reference model kept)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast over float32 weights (TRL's own default)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="(TRL's own default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preference-trainer", action="store_true", help="also run logitsam's PreferenceTrainer")
    p.add_argument("--output", default=None, help="write all results as JSON here")
    p.add_argument("--worker", default=None, choices=RUNS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


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


def settings(opts, out):
    return dict(output_dir=out, per_device_train_batch_size=opts.batch_size, max_steps=opts.steps,
                learning_rate=5e-7, lr_scheduler_type="constant", max_length=opts.max_length, beta=0.1,
                precompute_ref_log_probs=opts.precompute, bf16=opts.bf16,
                gradient_checkpointing=opts.gradient_checkpointing, use_cpu=opts.device == "cpu",
                report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                dataloader_num_workers=0, seed=0)


def step_timer():
    import torch
    from transformers import TrainerCallback

    from logitsam._memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    class StepTimer(TrainerCallback):
        """Seconds per optimizer step and the training loop's peak memory."""

        def __init__(self):
            self.durations, self.start, self.rss0 = [], None, 0

        def on_train_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            reset_peak_rss()
            self.rss0 = current_rss_bytes()

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.durations.append(time.perf_counter() - self.start)

        def peak(self):
            if torch.cuda.is_available():
                return torch.cuda.max_memory_allocated()
            return peak_rss_bytes()

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


def preference_trainer(opts, tok, model, ref, data, out, timer):
    """PreferenceTrainer with logits-SAM on the tokens TRL's pipeline makes from the same pairs."""
    import torch
    from transformers import TrainingArguments
    from trl import DPOConfig, DPOTrainer

    from logitsam.core import shift_labels
    from logitsam.data import PreferenceCollator
    from logitsam.train.trainer import PreferenceTrainer

    cfg = DPOConfig(**settings(opts, out))
    # TRL's own preparation (prompt extraction, EOS, tokenisation, drop rule); it reads only `_tokenizer`
    tokens = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), data, tok, cfg, "train")
    dataset = logitsam_rows(tokens, opts.max_length)
    collate = PreferenceCollator(tok.pad_token_id)
    ref = ref.to("cuda" if opts.device == "cuda" else "cpu")
    args = TrainingArguments(**{k: v for k, v in settings(opts, out).items()
                                if k not in ("max_length", "beta", "precompute_ref_log_probs")},
                             remove_unused_columns=False)
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                                callbacks=[timer], loss_type="sigmoid", beta=0.1, sam="logits", sam_rho=opts.rho,
                                chunk_size=opts.chunk_size, ref_model=ref)
    if opts.precompute:  # like TRL: one reference pass over the data, then no reference model
        chosen, rejected = [], []
        for i in range(0, len(dataset), opts.batch_size):
            batch = trainer._prepare_inputs(collate([dataset[j] for j in range(i, min(i + opts.batch_size,
                                                                                        len(dataset)))]))
            c, r = trainer._reference_logps(batch, shift_labels(batch["labels"]))
            chosen += c.tolist()
            rejected += r.tolist()
        trainer.train_dataset = dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps",
                                                                                           rejected)
        trainer.ref_model = None
        del ref
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return trainer


def worker(opts) -> dict:
    import torch
    from trl import DPOConfig, DPOTrainer

    from logitsam.trl import LogitsSAMConfig, LogitsSAMDPOTrainer

    torch.manual_seed(0)
    tok, model = load(opts)
    ref = None if opts.precompute and opts.worker != "pt-sam" else copy.deepcopy(model).eval()
    data, timer = pairs(opts), step_timer()
    with tempfile.TemporaryDirectory() as out:
        if opts.worker == "pt-sam":
            trainer = preference_trainer(opts, tok, model, ref, data, out, timer)
        else:
            config = DPOConfig if opts.worker == "trl" else LogitsSAMConfig
            extra = {} if opts.worker == "trl" else {"sam_rho": opts.rho if opts.worker == "ours-sam" else 0.0,
                                                     "sam_chunk_size": opts.chunk_size}
            cls = DPOTrainer if opts.worker == "trl" else LogitsSAMDPOTrainer
            trainer = cls(model=model, ref_model=ref, args=config(**settings(opts, out), **extra),
                          train_dataset=data, processing_class=tok, callbacks=[timer])
        trainer.train()
    steps = timer.durations[opts.warmup:] or timer.durations
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"run": opts.worker, "seconds_per_step": statistics.median(steps), "steps_timed": len(steps),
            "peak_memory_bytes": timer.peak(), "device": opts.device, "first_loss": losses[0] if losses else None}


# ---- the driver ------------------------------------------------------------------------------------
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
    runs = [r for r in RUNS if r != "pt-sam" or opts.preference_trainer]
    results = []
    for run in runs:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", run]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"bench_trl: run {run!r} failed (exit {proc.returncode})")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    base = results[0]
    what = "tiny random Llama" if opts.tiny else opts.model
    print(f"{what}, {opts.batch_size} pairs/step, max_length {opts.max_length}, {opts.steps} steps "
          f"(median after {opts.warmup}), {opts.device}{', bf16' if opts.bf16 else ''}"
          f"{', cached reference' if opts.precompute else ', reference model'}, rho {opts.rho:g}")
    print(f"{'run':10s} {'s/step':>9s} {'x trl':>7s} {'peak MiB':>10s} {'x trl':>7s} {'first loss':>11s}")
    for r in results:
        r["time_ratio"] = r["seconds_per_step"] / base["seconds_per_step"]
        r["memory_ratio"] = r["peak_memory_bytes"] / base["peak_memory_bytes"]
        loss = "" if r["first_loss"] is None else f"{r['first_loss']:.5f}"
        print(f"{r['run']:10s} {r['seconds_per_step']:9.3f} {r['time_ratio']:7.2f} "
              f"{r['peak_memory_bytes'] / 2**20:10.0f} {r['memory_ratio']:7.2f} {loss:>11s}")
    if opts.output:
        Path(opts.output).write_text(json.dumps({"settings": vars(opts), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The GPU check: one prepared run on one CUDA GPU, no network, models built from configs with random weights.

    python benchmarks/gpu_check.py --out OUT_DIR            # on the GPU machine (about 5-8 minutes)
    python benchmarks/gpu_check.py --out /tmp/gc --tiny     # the same plumbing on a CPU, toy sizes, seconds

Writes ``OUT_DIR/gpu_check.json`` with:
  - ``head_bench``: ``logitsam bench`` in bf16 and fp32 at Qwen2.5-0.5B head shapes (d=896, V=151,936,
    8,192 tokens): the four paths' seconds and peak extra memory, and their ratios;
  - ``first_order_ratio``: logits-SAM's ``r`` for bf16 weights and bf16 autocast on the GPU (should be ~1);
  - ``train``: DPO vs DPO + logits-SAM training steps (``dtype: float32`` + ``bf16: true``) on a
    Qwen2.5-0.5B-shaped model with random weights: seconds per step and peak memory, their ratios, the
    device the reference precompute ran on, and the logged ``sam/first_order_ratio``;
  - ``fsdp2``: a world-size-1 FSDP2 run through the Trainer (return code and the tail of its log).
Each part records its own error instead of stopping the others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import string
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

SHAPES = {  # random-weight models, built from a config (no download)
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, vocab_size=1000, tie_word_embeddings=True),
}


def char_tokenizer():
    """A character-level tokenizer with a pad/eos and a chat template (no files, no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(string.printable))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<unk>")


def build_model_dir(shape: str, path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(SHAPES[shape])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, max_position_embeddings=4096, pad_token_id=0,
                                  bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def write_pairs(path: Path, n: int, length: int) -> Path:
    import random

    rng = random.Random(0)
    words = ["good", "bad", "fine", "great", "awful", "nice", "poor", "kind", "rude", "calm", "warm", "cold"]
    with path.open("w") as f:
        for i in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(length // 10))
            f.write(json.dumps({"prompt": f"Q{i}: {prompt}", "chosen": " " + " ".join(rng.choice(words[:6])
                                for _ in range(length // 12)), "rejected": " " + " ".join(
                                rng.choice(words[6:]) for _ in range(length // 12))}) + "\n")
    return path


def part(results: dict, name: str, fn):
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception:  # a failed part is recorded, the others still run
        results[name] = {"error": traceback.format_exc()[-3000:]}
    results.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
    print(f"[gpu_check] {name}: {time.perf_counter() - t0:.0f} s", flush=True)


def head_bench(device: str, tiny: bool) -> dict:
    from logitsam.bench import BenchConfig, run_bench

    out = {}
    for dtype in ("bfloat16", "float32"):
        cfg = BenchConfig(hidden_size=64 if tiny else 896, vocab_size=1000 if tiny else 151936,
                          tokens=256 if tiny else 8192, repeats=1 if tiny else 3, device=device, dtype=dtype)
        out[dtype] = run_bench(cfg, memory=True, progress=False)
    return out


def first_order(device: str, tiny: bool) -> dict:
    import torch.nn.functional as F

    from logitsam.core import first_order_ratio, logits_sam

    vocab, d, tokens = (1000, 32, 128) if tiny else (151936, 896, 4096)
    out = {}
    for name, w_dtype, ac in (("bf16 weights", torch.bfloat16, None), ("bf16 autocast", torch.float32,
                                                                        torch.bfloat16)):
        g = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(4, tokens // 4, d, generator=g, device=device).to(w_dtype)
        head = torch.nn.Linear(d, vocab, bias=False, device=device)
        head.weight.data = (torch.randn(vocab, d, generator=g, device=device) * 0.02).to(w_dtype)
        labels = torch.randint(0, vocab, (4, tokens // 4), generator=g, device=device)
        ref = torch.full((4,), -9.0 * tokens / 4, device=device)

        def loss_fn(o, ref=ref):
            lr = o.logps - ref
            return -F.logsigmoid(0.1 * (lr[:2] - lr[2:])).mean()

        for chunk in (None, 1024):
            for rho in (1e-4, 1e-3):
                ctx = torch.autocast(device.split(":")[0], dtype=ac) if ac else contextlib.nullcontext()
                with ctx:
                    _, st = logits_sam(hidden, head, labels, loss_fn, rho, chunk_size=chunk)
                key = f"{name} / {'dense' if chunk is None else 'chunked'} / rho {rho:g}"
                out[key] = first_order_ratio(st["loss_pre"], st["loss_post"], st["first_order"])
    return out


def _train(model_dir, data, out_dir, sam, device, tiny, extra=(), launcher=()):
    cmd = [*launcher] if launcher else [sys.executable, "-m", "logitsam.cli"]
    cmd += ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--sam", sam,
            "--sam_rho", "1e-3", "--max_steps", "3" if tiny else "12", "--per_device_train_batch_size", "4",
            "--max_length", "128" if tiny else "1024", "--max_prompt_length", "64" if tiny else "512",
            "--learning_rate", "1e-6", "--eval_size", "0", "--logging_steps", "1", "--save_strategy", "no",
            "--output_dir", str(out_dir), "--report_to", "none", "--disable_tqdm", "true",
            "--dtype", "float32", *extra]
    if device.startswith("cuda"):
        cmd += ["--bf16", "true"]
    else:
        cmd += ["--use_cpu", "true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    result = {"returncode": proc.returncode, "log_tail": log[-2500:]}
    info = Path(out_dir) / "run_info.json"
    if info.exists():
        result["run_info"] = json.loads(info.read_text())
    metrics = Path(out_dir) / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        result["first_order_ratio"] = [r["sam/first_order_ratio"] for r in rows if "sam/first_order_ratio" in r]
    found = re.findall(r"computing \d+ on (\S+)", log)
    result["reference_precompute_device"] = found[0] if found else None
    return result


def train_steps(device: str, tiny: bool, work: Path) -> dict:
    model_dir = build_model_dir("tiny" if tiny else "qwen2.5-0.5b", work / "model")
    data = write_pairs(work / "pairs.jsonl", 64 if tiny else 256, 100 if tiny else 1600)
    runs = {sam: _train(model_dir, data, work / f"train-{sam}", sam, device, tiny) for sam in ("none", "logits")}
    try:
        a, b = (runs[s]["run_info"] for s in ("none", "logits"))
        runs["ratios"] = {
            "seconds_per_step logits / none": b["seconds_per_step"] / a["seconds_per_step"],
            "peak_memory logits / none": b["peak_memory_bytes"] / a["peak_memory_bytes"],
        }
    except (KeyError, TypeError, ZeroDivisionError):
        runs["ratios"] = None
    return runs


def fsdp2(device: str, tiny: bool, work: Path) -> dict:
    model_dir = work / "model"
    data = work / "pairs.jsonl"
    fsdp_cfg = work / "fsdp2.json"
    fsdp_cfg.write_text(json.dumps({"fsdp_version": 2, "reshard_after_forward": True}))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "logitsam.cli"]
    return _train(model_dir, data, work / "train-fsdp2", "logits", device, tiny, launcher=torchrun,
                  extra=("--fsdp", "full_shard auto_wrap", "--fsdp_config", str(fsdp_cfg)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="toy sizes (plumbing check, e.g. on a CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/logitsam_gpu_check"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LOGITSAM_CACHE", str(work / "cache"))
    results = {"torch": torch.__version__, "device": a.device, "tiny": a.tiny,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    part(results, "first_order_ratio", lambda: first_order(a.device, a.tiny))
    part(results, "head_bench", lambda: head_bench(a.device, a.tiny))
    part(results, "train", lambda: train_steps(a.device, a.tiny, work))
    part(results, "fsdp2", lambda: fsdp2(a.device, a.tiny, work))
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps({k: v for k, v in results.items() if k != "head_bench"}, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()

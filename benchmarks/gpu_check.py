"""The GPU check: one prepared run on one CUDA GPU, no network, models built from configs with random weights.

    python benchmarks/gpu_check.py --out OUT_DIR            # on the GPU machine (about 7-8 minutes on an H200)
    python benchmarks/gpu_check.py --out /tmp/gc --tiny     # the same plumbing on a CPU, toy sizes
    python benchmarks/gpu_check.py --out OUT_DIR --parts head_memory_7b,host_syncs   # a subset, e.g. a rerun

Writes ``OUT_DIR/gpu_check.json`` (rewritten after every part, so a run cut short keeps what it finished) with:
  - ``first_order_ratio``: logits-SAM's ``r`` for bf16 weights and bf16 autocast on the GPU (should be ~1);
  - ``head_memory_7b``: peak ``max_memory_allocated`` above the inputs of ONE head step (clean pass + perturbed
    pass + backward into hidden and weight) at Qwen2.5-7B head shapes (V=152,064, d=3,584, 8 pairs x 1,024
    tokens = 8,192 completion tokens), bf16 autocast over float32 weights, for the dense and the chunked head
    (512 tokens x 8,192 vocabulary per block), DPO and logits-SAM, with logits-SAM's extra over DPO per head,
    the seconds per step, the analytic sizes behind them and the simulator's figure where it has one
    (``simulated``: null with a note while ``logitsam.simulate`` simulates whole training steps only). The
    dense head (~5 GB per float32 logits copy, several alive) is guarded: skipped when it cannot fit, an OOM
    is recorded, not raised;
  - ``host_syncs``: host syncs counted with ``torch.cuda.set_sync_debug_mode("warn")`` (one warning each), for
    the head step alone (dense/chunked x DPO/logits-SAM x bf16 autocast/float32, ``index`` given: expected 0;
    a control without ``index`` must show some), and for ``PreferenceTrainer`` optimizer steps on a small
    Qwen-shaped random model with gradient_accumulation_steps 4: syncs per optimizer step, per micro-batch and
    per phase (prefetch, micro-batches, optimizer, logging), with the source lines that issued them. On a CPU
    sync debug mode does not exist; a stand-in counts host reads (``.item()``, ``.tolist()``, ``bool()``,
    ``int()``, ``float()``, ``nonzero``) through a TorchFunctionMode, so the bookkeeping is exercised;
  - ``head_profile``: ``torch.profiler`` (CPU + CUDA) of one logits-SAM chunked head step at the 7B head shapes
    under bf16 autocast: total device time, the share of GEMM kernels, the top 10 kernels (on a CPU: aten
    ops' self CPU time stand in for kernels);
  - ``head_bench``: ``logitsam bench`` in bf16 and fp32 at Qwen2.5-0.5B head shapes (d=896, V=151,936,
    8,192 tokens): the four paths' seconds and peak extra memory, and their ratios;
  - ``train``: DPO vs DPO + logits-SAM training steps (``dtype: float32`` + ``bf16: true``) on a
    Qwen2.5-0.5B-shaped model with random weights: seconds per step and peak memory, their ratios, the
    device the reference precompute ran on, and the logged ``sam/first_order_ratio``;
  - ``fsdp2``: a world-size-1 FSDP2 run through the Trainer (return code and the tail of its log);
  - ``tf32_ratio``: logits-SAM's ``r`` with float32 weights under reduced-precision float32 matmuls (CUDA's
    ``allow_tf32``; ``set_float32_matmul_precision("high")``, the only one on a CPU), dense and chunked, rho 1e-4
    and 1e-3: within 5 % of 1 (the head keeps eps apart: ``head.reduced_fp32_matmul``), with controls (exact
    float32; the fused path forced, as before the fix) and the flags restored after;
  - ``bf16_step0_margins``: one ``logitsam train`` DPO step, float32 weights under bf16 autocast, with the
    precomputed and with the live reference: the first record's ``rewards/margins`` exactly 0, ``loss`` ln 2;
  - ``zero3_skip``: ``--on_nonfinite skip`` under DeepSpeed ZeRO-3 is refused with a message naming the key
    (skipped without DeepSpeed or a GPU);
  - ``fsdp2_efficient_loading``: 2-rank FSDP2 with ``cpu_ram_efficient_loading``, one DPO step: every cached
    reference log-prob against a 1-process ``compute_reference_logps`` (max abs diff; skipped under 2 GPUs).
Each part records its own error instead of stopping the others, and runs under a time cap (``PARTS``; on a
GPU the whole run also under ``--budget`` seconds): a part cut short records a timeout error.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import re
import signal
import statistics
import string
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

SHAPES = {  # random-weight models, built from a config (no download)
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # host_syncs' trainer steps: Qwen2.5's vocabulary (19 vocabulary slices of 8,192), a small backbone
    "qwen-small": dict(model_type="qwen2", hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
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


class PartTimeout(Exception):
    """A part ran past its time cap (raised by SIGALRM in the main thread)."""


_DEADLINE = {"part": float("inf"), "run": float("inf")}  # time.monotonic() deadlines of the running part / run


def time_left() -> float:
    """Seconds until the running part's cap (for subprocess timeouts)."""
    return min(_DEADLINE["part"], _DEADLINE["run"]) - time.monotonic()


def _on_alarm(signum, frame):
    raise PartTimeout(f"time cap reached ({time.monotonic() - _DEADLINE['start']:.0f} s into the part)")


def part(results: dict, name: str, fn, cap_s: float, write=None):
    """Run one part under a time cap; its result or its error goes into ``results[name]``, then ``write()``."""
    t0 = time.perf_counter()
    left = _DEADLINE["run"] - time.monotonic()
    if left < 15:
        results[name] = {"error": f"skipped: the run's --budget was spent ({left:.0f} s left)"}
    else:
        cap = min(cap_s, left)
        _DEADLINE.update(start=time.monotonic(), part=time.monotonic() + cap)
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, cap)
        try:
            results[name] = fn()
        except Exception:  # a failed part is recorded, the others still run
            results[name] = {"error": traceback.format_exc()[-3000:]}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            _DEADLINE["part"] = float("inf")
    results.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
    left = _DEADLINE["run"] - time.monotonic()
    print(f"[gpu_check] {name}: {time.perf_counter() - t0:.0f} s" + (f" ({left:.0f} s of the budget left)"
          if left < float("inf") else ""), flush=True)
    if write:
        write()


def run_cmd(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a new session: on a timeout (or a part's time cap) its whole process group is killed,
    torchrun's workers included. ``env``: variables set on top of this process's environment."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **env} if env else None)
    try:
        out, err = proc.communicate(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, -9, out, (err or "") + f"\n[gpu_check] killed after {timeout:.0f} s")
    except BaseException:  # the part's time cap: kill the group, let the part record the timeout
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def head_bench(device: str, tiny: bool) -> dict:
    from logitsam.bench import BenchConfig, run_bench

    out = {}
    for dtype in ("bfloat16", "float32"):
        cfg = BenchConfig(hidden_size=64 if tiny else 896, vocab_size=1000 if tiny else 151936,
                          tokens=256 if tiny else 8192, repeats=1 if tiny else 3, device=device, dtype=dtype)
        out[dtype] = run_bench(cfg, memory=True, progress=False)
    return out


def sam_ratios(device: str, tiny: bool, w_dtype: torch.dtype, autocast: torch.dtype | None) -> dict[str, float]:
    """logits-SAM's first-order ratio ``r`` of one head step (DPO loss) with ``w_dtype`` weights under ``autocast``
    (None: none), for the dense and the chunked head at rho 1e-4 and 1e-3: {"dense / rho 0.0001": r, ...}."""
    import torch.nn.functional as F

    from logitsam.core import first_order_ratio, logits_sam

    vocab, d, tokens = (1000, 32, 128) if tiny else (151936, 896, 4096)
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(4, tokens // 4, d, generator=g, device=device).to(w_dtype)
    head = torch.nn.Linear(d, vocab, bias=False, device=device)
    head.weight.data = (torch.randn(vocab, d, generator=g, device=device) * 0.02).to(w_dtype)
    labels = torch.randint(0, vocab, (4, tokens // 4), generator=g, device=device)
    ref = torch.full((4,), -9.0 * tokens / 4, device=device)

    def loss_fn(o):
        lr = o.logps - ref
        return -F.logsigmoid(0.1 * (lr[:2] - lr[2:])).mean()

    out = {}
    for chunk in (None, 1024):
        for rho in (1e-4, 1e-3):
            ctx = torch.autocast(device.split(":")[0], dtype=autocast) if autocast else contextlib.nullcontext()
            with ctx:
                _, st = logits_sam(hidden, head, labels, loss_fn, rho, chunk_size=chunk)
            out[f"{'dense' if chunk is None else 'chunked'} / rho {rho:g}"] = float(
                first_order_ratio(st["loss_pre"], st["loss_post"], st["first_order"]))
    del hidden, head
    _free(device)
    return out


def first_order(device: str, tiny: bool) -> dict:
    out = {}
    for name, w_dtype, ac in (("bf16 weights", torch.bfloat16, None), ("bf16 autocast", torch.float32,
                                                                        torch.bfloat16)):
        out.update({f"{name} / {k}": r for k, r in sam_ratios(device, tiny, w_dtype, ac).items()})
    return out


def _lengths(tiny: bool) -> tuple[int, int]:
    """(max_length, max_prompt_length) of the ``_train`` runs."""
    return (128, 64) if tiny else (1024, 512)


def _train(model_dir, data, out_dir, sam, device, tiny, extra=(), launcher=(), timeout=None, max_steps=None,
           bf16=None, env=None, find=None):
    """``logitsam train`` in a subprocess. ``bf16``: bf16 autocast over the float32 weights (default: on CUDA only;
    True also on a CPU); ``env``: extra environment variables; ``find``: a string looked for in the whole log
    (``found``), not only in its tail."""
    cmd = [*launcher] if launcher else [sys.executable, "-m", "logitsam.cli"]
    max_length, max_prompt_length = _lengths(tiny)
    cmd += ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--sam", sam,
            "--sam_rho", "1e-3", "--max_steps", str(max_steps or (3 if tiny else 12)),
            "--per_device_train_batch_size", "4", "--max_length", str(max_length),
            "--max_prompt_length", str(max_prompt_length),
            "--learning_rate", "1e-6", "--eval_size", "0", "--logging_steps", "1", "--save_strategy", "no",
            "--output_dir", str(out_dir), "--report_to", "none", "--disable_tqdm", "true",
            "--dtype", "float32", *extra]
    if device.startswith("cuda") or bf16:
        cmd += ["--bf16", "true"]
    if not device.startswith("cuda"):
        cmd += ["--use_cpu", "true"]
    proc = run_cmd(cmd, timeout=time_left() - 5 if timeout is None else timeout, env=env)
    log = proc.stdout + proc.stderr
    result = {"returncode": proc.returncode, "log_tail": log[-2500:]}
    if find is not None:
        result["found"] = find in log
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
    runs = {"none": _train(model_dir, data, work / "train-none", "none", device, tiny, timeout=time_left() / 2)}
    runs["logits"] = _train(model_dir, data, work / "train-logits", "logits", device, tiny)
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


# ---- checks of the precision and sharding fixes (tf32_ratio, bf16_step0_margins, zero3_skip, fsdp2_efficient_loading)

RATIO_TOL = 0.05  # |r - 1| allowed for logits-SAM's first-order ratio
ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",  # tests/train/test_deepspeed
         "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                               "stage3_gather_16bit_weights_on_model_save": True}}
ZERO3_SKIP_MESSAGE = "config key 'on_nonfinite' = 'skip' cannot run with DeepSpeed"


def _read_flag(read):
    try:
        return read()
    except (AttributeError, RuntimeError):  # torch >= 2.9 may refuse to read a flag after the APIs were mixed
        return None


@contextlib.contextmanager
def fp32_matmul(*, allow_tf32: bool | None = None, precision: str | None = None):
    """Sets torch's float32 matmul flags (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.set_float32_matmul_precision``) for the block; both are restored after, whatever happens."""
    saved_precision = _read_flag(torch.get_float32_matmul_precision)
    saved_tf32 = _read_flag(lambda: torch.backends.cuda.matmul.allow_tf32)
    try:
        if precision is not None:
            torch.set_float32_matmul_precision(precision)
        if allow_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        yield
    finally:
        torch.set_float32_matmul_precision(saved_precision or "highest")
        if saved_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = saved_tf32


@contextlib.contextmanager
def _fused_fp32():
    """The heads as before the fix: float32 weights always take the fused ``H (W + eps)^T``, whatever the matmul
    precision (``split_compute`` for half dtypes only), so a control shows what the check would catch."""
    from logitsam.core import head as head_mod
    from logitsam.core import sam as sam_mod

    saved = head_mod.split_compute, sam_mod.split_compute

    def half_only(dtype, device=None):
        return dtype in head_mod.HALF_DTYPES

    head_mod.split_compute = sam_mod.split_compute = half_only
    try:
        yield
    finally:
        head_mod.split_compute, sam_mod.split_compute = saved


def tf32_ratio(device: str, tiny: bool) -> dict:
    """logits-SAM's ``r`` with float32 weights, no autocast, under reduced-precision float32 matmuls (TF32 on CUDA:
    ``allow_tf32``; ``set_float32_matmul_precision("high")``): the head keeps eps apart there
    (``head.reduced_fp32_matmul`` / ``split_compute``), so r stays within 5 % of 1. Controls: exact float32
    ("highest", the fused path) and the fused path forced under "high" (as before the fix; on a CPU float32 matmuls
    stay exact, so it stays ~1 there, on a GPU with TF32 it is expected far from 1)."""
    from logitsam.core.head import reduced_fp32_matmul

    cuda = device.startswith("cuda")
    modes = {"matmul_precision high": dict(precision="high")}
    if cuda:
        modes = {"allow_tf32": dict(allow_tf32=True), **modes}
    out: dict = {"weights": "float32, no autocast", "tolerance": f"|r - 1| < {RATIO_TOL}", "cases": {},
                 "reduced_fp32_matmul": {}, "controls": {}}
    for mode, flags in modes.items():
        with fp32_matmul(**flags):
            out["reduced_fp32_matmul"][mode] = reduced_fp32_matmul(device)
            out["cases"].update({f"{mode} / {k}": r for k, r in sam_ratios(device, tiny, torch.float32, None).items()})
    with fp32_matmul(allow_tf32=False, precision="highest"):
        out["controls"].update({f"highest (exact float32, fused) / {k}": r
                                for k, r in sam_ratios(device, tiny, torch.float32, None).items()})
    control = "allow_tf32" if cuda else "matmul_precision high"
    with fp32_matmul(**modes[control]), _fused_fp32():
        out["controls"].update({f"{control}, fused as before the fix / {k}": r
                                for k, r in sam_ratios(device, tiny, torch.float32, None).items()})
    out["flags_after"] = {"float32_matmul_precision": _read_flag(torch.get_float32_matmul_precision),
                          "cuda.matmul.allow_tf32": _read_flag(lambda: torch.backends.cuda.matmul.allow_tf32)}
    out["max_abs_r_minus_1"] = max(abs(r - 1) for r in out["cases"].values())
    out["pass"] = out["max_abs_r_minus_1"] < RATIO_TOL and all(out["reduced_fp32_matmul"].values())
    return out


def _fix_model(work: Path, tiny: bool) -> tuple[Path, Path]:
    """The model (random weights; "tiny", or "qwen-small" on a GPU: Qwen2.5's vocabulary, a small backbone) and the
    pairs the fixes' training runs share, built once per shape."""
    shape = "tiny" if tiny else "qwen-small"
    root = work / f"fixes-{shape}"
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    if not (model_dir / "tokenizer_config.json").exists():  # written last by build_model_dir
        build_model_dir(shape, model_dir)
    data = root / "pairs.jsonl"
    if not data.exists():
        write_pairs(data, 32, 100 if tiny else 400)
    return model_dir, data


def _first_record(out_dir: Path) -> dict | None:
    metrics = Path(out_dir) / "metrics.jsonl"
    if not metrics.exists():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return next((r for r in rows if "rewards/margins" in r), None)


def bf16_step0_margins(device: str, tiny: bool, work: Path) -> dict:
    """``logitsam train`` one DPO step (``--sam none``), float32 weights under bf16 autocast (``--bf16 true``; on a
    CPU with ``--use_cpu``), with the precomputed reference (the default) and with the live one
    (``--precompute_ref_log_probs false``): at step 0 the policy is the reference, so the first logged record's
    ``rewards/margins`` is exactly 0 and ``loss`` ln 2 with both. (Before the fix the precompute ran outside the
    autocast: margins -0.02, loss 0.704 on SmolLM2.)"""
    import math
    import shutil

    model_dir, data = _fix_model(work, tiny)
    root = work / "bf16-margins"
    shutil.rmtree(root, ignore_errors=True)  # a fresh reference cache: the precompute must run, not be read
    env = {"LOGITSAM_CACHE": str(root / "cache")}
    ln2 = math.log(2)
    out: dict = {"model": "tiny" if tiny else "qwen-small", "expected": {"rewards/margins": 0.0, "loss": ln2}}
    runs = (("precomputed reference", ()), ("live reference", ("--precompute_ref_log_probs", "false")))
    for i, (name, extra) in enumerate(runs):
        run_dir = root / name.split()[0]
        res = _train(model_dir, data, run_dir, "none", device, tiny, extra=extra, max_steps=1, bf16=True, env=env,
                     timeout=time_left() / (len(runs) - i) - 5)
        rec = _first_record(run_dir)
        row: dict = {"returncode": res["returncode"],
                     "reference_precompute_device": res["reference_precompute_device"]}
        if rec is None:
            row.update(error="no logged record with rewards/margins", log_tail=res["log_tail"])
        else:
            margins, loss = rec["rewards/margins"], rec.get("loss")
            # transformers 4.x rounds the logged loss to 4 decimals (5.x does not)
            rounded = loss is not None and loss == round(loss, 4)
            tol = 5e-5 if rounded else 1e-6
            row.update({"rewards/margins": margins, "loss": loss, "loss - ln2": None if loss is None else loss - ln2,
                        "loss_tolerance": tol, "rewards/chosen": rec.get("rewards/chosen"),
                        "rewards/rejected": rec.get("rewards/rejected"),
                        "pass": margins == 0 and loss is not None and abs(loss - ln2) <= tol})
            if rounded:
                row["note"] = "the logged loss is rounded to 4 decimals by this transformers version"
            if res["returncode"] != 0:
                row["log_tail"] = res["log_tail"]
        out[name] = row
    out["pass"] = all(out[name].get("pass", False) for name, _ in runs)
    return out


def zero3_skip(device: str, tiny: bool, work: Path) -> dict:
    """``logitsam train --on_nonfinite skip`` under DeepSpeed ZeRO-3 (one process on the GPU) must be refused with
    a message naming the key (the engine steps inside backward, before a skip could be decided)."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return {"skipped": "deepspeed not installed"}
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    if gpus < 1:
        return {"skipped": "needs a GPU, found 0 (ZeRO-3 on CPU processes: tests/train/test_deepspeed.py)"}
    model_dir, data = _fix_model(work, tiny)
    cfg = work / "zero3.json"
    cfg.write_text(json.dumps(ZERO3))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "logitsam.cli"]
    res = _train(model_dir, data, work / "zero3-skip", "logits", device, tiny, launcher=torchrun, max_steps=1,
                 extra=("--deepspeed", str(cfg), "--on_nonfinite", "skip"), find=ZERO3_SKIP_MESSAGE)
    found = res["found"]
    out = {"returncode": res["returncode"], "message": ZERO3_SKIP_MESSAGE, "message_found": found,
           "pass": res["returncode"] != 0 and found}
    if not out["pass"]:
        out["log_tail"] = res["log_tail"]
    return out


def fsdp2_efficient_loading(device: str, tiny: bool, work: Path) -> dict:
    """2-rank FSDP2 with ``cpu_ram_efficient_loading`` (only rank 0 is sure to load real weights; FSDP2 broadcasts
    them at preparation), one DPO step with the precomputed reference: every cached reference log-prob must equal a
    1-process ``compute_reference_logps`` of the same rows (under the run's precision). Needs 2 GPUs: NCCL cannot put
    two ranks on one GPU."""
    import shutil

    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    if gpus < 2:
        return {"skipped": f"needs 2 GPUs, found {gpus}"}
    from logitsam.data import build_preference_dataset
    from logitsam.models import load_model, load_tokenizer
    from logitsam.train.reference import compute_reference_logps

    model_dir, data = _fix_model(work, tiny)
    root = work / "fsdp2-efficient"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cache = root / "cache"
    cfg = root / "fsdp2.json"
    cfg.write_text(json.dumps({"fsdp_version": 2, "cpu_ram_efficient_loading": True, "reshard_after_forward": True}))
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "LOGITSAM_CACHE": str(cache)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "logitsam.cli"]
    res = _train(model_dir, data, root / "run", "none", device, tiny, launcher=torchrun, max_steps=1, env=env,
                 extra=("--fsdp", "full_shard auto_wrap", "--fsdp_config", str(cfg)))
    files = sorted((cache / "ref_logps").glob("*.pt"))
    out: dict = {"gpus": gpus, "returncode": res["returncode"], "cache_files": [f.name for f in files]}
    if res["returncode"] != 0 or len(files) != 1:
        out.update(error="the run failed or did not leave exactly one reference cache file", log_tail=res["log_tail"])
        return out
    saved = torch.load(files[0], weights_only=True)
    rows = (~saved["chosen"].isnan() & ~saved["rejected"].isnan()).nonzero().flatten().tolist()
    tokenizer = load_tokenizer(model_dir)
    max_length, max_prompt_length = _lengths(tiny)
    dataset, _ = build_preference_dataset(str(data), tokenizer, max_length=max_length,
                                          max_prompt_length=max_prompt_length)
    model = load_model(model_dir, dtype="float32").to(device)
    chosen, rejected = compute_reference_logps(  # under the run's precision: bf16 autocast over float32 weights
        model, dataset, rows, pad_token_id=tokenizer.pad_token_id, batch_size=4,
        autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    del model
    _free(device)
    cached = torch.cat([saved["chosen"][rows], saved["rejected"][rows]]).float()
    ours = torch.cat([chosen, rejected]).float()
    diff = (cached - ours).abs()
    out.update({"rows": len(rows), "dataset_rows": len(dataset), "max_abs_diff": float(diff.max()),
                "max_rel_diff": float((diff / ours.abs().clamp_min(1e-6)).max()),
                "mean_abs_logp": float(ours.abs().mean()), "tolerance": "max_rel_diff < 1e-2 (bf16 autocast; other "
                "batch compositions; a rank with unloaded weights is off by O(1))"})
    out["pass"] = len(rows) >= 8 and out["max_rel_diff"] < 1e-2
    return out


# ---- head step at given shapes (head_memory_7b, host_syncs, head_profile) ----------------------------------

HEAD_7B = dict(vocab_size=152064, hidden_size=3584, pairs=8, seq_len=1024, completion=512)  # Qwen2.5-7B, TRL batch
HEAD_TINY = dict(vocab_size=1000, hidden_size=32, pairs=2, seq_len=64, completion=32)
CHUNKS = {"dense": (None, None), "chunked": (512, 8192)}  # (chunk_size, vocab_chunk_size)
CHUNKS_TINY = {"dense": (None, None), "chunked": (32, 256)}  # several token chunks and vocabulary slices
RHO = 1e-3


def head_inputs(device: str, *, vocab_size: int, hidden_size: int, pairs: int, seq_len: int, completion: int,
                seed: int = 0):
    """``bench._inputs`` (float32 hidden (2B, T, d) and head, filled in place) with the simulator's label layout:
    each row's last ``completion`` predicting positions are labels (``simulate.step.host_batch``), so there are
    n = 2B x completion of them; ``index`` = their ``completion_index``, found here, before any counted step."""
    from logitsam.bench import BenchConfig, _inputs
    from logitsam.core.head import IGNORE_INDEX, completion_index

    cfg = BenchConfig(hidden_size=hidden_size, vocab_size=vocab_size, tokens=2 * pairs * seq_len, rows=2 * pairs,
                      device=device, dtype="float32", seed=seed)
    hidden, head, labels, ref = _inputs(cfg)
    labels[:, : seq_len - 1 - completion] = IGNORE_INDEX
    labels[:, -1] = IGNORE_INDEX  # the last position predicts nothing
    index = completion_index(labels)
    _sync(device)
    return hidden, head, labels, ref, index


def head_step(hidden, head, labels, index, ref, *, sam: bool, chunk_size, vocab_chunk_size, autocast=torch.bfloat16):
    """One training-step head, as the trainer runs it: the loss (DPO, or logits-SAM) under autocast with
    ``index=``, then backward into hidden and weight outside autocast (``bench.run_path`` plus ``index`` and
    the autocast the Trainer puts around the forward only)."""
    from logitsam.bench import _dpo
    from logitsam.core import logits_sam, sequence_logps

    hidden.grad = head.weight.grad = None
    loss_fn = _dpo(ref)
    ctx = torch.autocast(hidden.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    chunks = {"chunk_size": chunk_size, "vocab_chunk_size": vocab_chunk_size}
    with ctx:
        if sam:
            loss, _ = logits_sam(hidden, head, labels, loss_fn, RHO, index=index, **chunks)
        else:
            loss = loss_fn(sequence_logps(hidden, head, labels, index=index, **chunks))
    loss.backward()


class PeakMeter:
    """Peak bytes above what is allocated at ``start`` (the inputs). CUDA: ``max_memory_allocated``. CPU (toy
    sizes): the CPU allocator's live bytes from ``torch.profiler`` memory events (``profile_memory``), as
    ``tests/test_simulate.py`` counts them."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.base, self.prof = 0, None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()

    def stop(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            return {"peak_extra_bytes": torch.cuda.max_memory_allocated() - self.base,
                    "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
        self.prof.__exit__(None, None, None)
        live = peak = 0
        for event in self.prof.profiler.kineto_results.events():  # in the order the allocator reported them
            if event.name() == "[memory]":
                live += event.nbytes()
                peak = max(peak, live)
        return {"peak_extra_bytes": peak}


def simulated_head_step(**shapes) -> tuple[dict | None, str]:
    """The simulator's figure for ONE head step at these shapes, if ``logitsam.simulate`` offers one."""
    try:
        from logitsam.simulate import step as sim
    except Exception as e:  # noqa: BLE001 (the simulator is optional here)
        return None, f"logitsam.simulate is not importable here: {type(e).__name__}: {e}"
    offered = sorted(n for n in dir(sim) if n.startswith("simulate") and callable(getattr(sim, n)))
    return None, (f"logitsam.simulate offers {offered}: a whole training step at a model shape (backbone, head, "
                  "backward, AdamW), whose peak includes the backbone's activations, weights and optimizer state; "
                  "it has no head-step-only function at given (V, d, n), so no figure comparable with this "
                  "head-only measurement. Compare `logitsam simulate --models qwen2.5-7b --head dense chunked` "
                  "extra-over-DPO with `extra_over_dpo` here instead.")


def head_memory(device: str, tiny: bool) -> dict:
    """Peak memory above the inputs of one head step at 7B head shapes: dense/chunked x DPO/logits-SAM."""
    shapes = HEAD_TINY if tiny else HEAD_7B
    chunks = CHUNKS_TINY if tiny else CHUNKS
    hidden, head, labels, ref, index = head_inputs(device, **shapes)
    n, V, d = index.numel(), shapes["vocab_size"], shapes["hidden_size"]
    logits_bytes = n * V * 4
    out = {"shapes": {**shapes, "completion_tokens": n, "rows": 2 * shapes["pairs"], "rho": RHO,
                      "precision": "float32 weights, bf16 autocast", "chunks": chunks},
           "analytic_bytes": {"fp32_logits_copy (n V 4)": logits_bytes, "eps_bf16_unit (V d 2)": V * d * 2,
                              "weight_grad_fp32 (V d 4)": V * d * 4, "hidden_grad_fp32": hidden.numel() * 4,
                              "chunk_block_fp32": min(512, n) * 8192 * 4 if not tiny else 32 * 256 * 4},
           "meter": "torch.cuda.max_memory_allocated above the inputs" if device.startswith("cuda") else
                    "CPU allocator's live bytes above the inputs (torch.profiler memory events; toy sizes)"}
    sim_value, sim_note = simulated_head_step(**shapes)
    meter = PeakMeter(device)
    for kind, (chunk, vchunk) in chunks.items():
        row: dict = {}
        if kind == "dense" and device.startswith("cuda"):
            free = torch.cuda.mem_get_info()[0]
            need = 6 * logits_bytes  # clean logits, log-softmax, statistics' temporaries, perturbed pass, grads
            row["guard"] = {"free_bytes": free, "estimated_need_bytes": need}
            if need > free:
                row["skipped"] = "the dense head's float32 logits would not fit in free memory"
                out[kind] = row
                continue
        for loss, sam in (("dpo", False), ("logits_sam", True)):
            rec: dict = {}
            try:
                head_step(hidden, head, labels, index, ref, sam=sam, chunk_size=chunk, vocab_chunk_size=vchunk)
                hidden.grad = head.weight.grad = None
                _free(device)
                meter.start()
                head_step(hidden, head, labels, index, ref, sam=sam, chunk_size=chunk, vocab_chunk_size=vchunk)
                rec.update(meter.stop())
                times = []
                for _ in range(1 if tiny else 2):
                    _sync(device)
                    t0 = time.perf_counter()
                    head_step(hidden, head, labels, index, ref, sam=sam, chunk_size=chunk, vocab_chunk_size=vchunk)
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                rec["seconds"] = statistics.median(times)
            except torch.OutOfMemoryError as e:
                rec.update(oom=True, error=str(e)[:600])
            hidden.grad = head.weight.grad = None
            _free(device)
            rec["simulated"] = sim_value
            row[loss] = rec
        a, b = row.get("dpo", {}), row.get("logits_sam", {})
        if "peak_extra_bytes" in a and "peak_extra_bytes" in b:
            row["extra_over_dpo_bytes"] = b["peak_extra_bytes"] - a["peak_extra_bytes"]
            row["extra_over_dpo_ratio"] = b["peak_extra_bytes"] / max(a["peak_extra_bytes"], 1)
            if "seconds" in a and "seconds" in b:
                row["time_ratio_over_dpo"] = b["seconds"] / a["seconds"]
        out[kind] = row
    out["simulated_note"] = sim_note
    return out


# ---- host syncs ----------------------------------------------------------------------------------------------

SYNC_WARNING = "synchronizing CUDA operation"  # torch's sync debug mode: "called a synchronizing CUDA operation"
STANDIN_WARNING = "host read (cpu stand-in for a CUDA sync)"


class _HostReads(torch.overrides.TorchFunctionMode):
    """CPU stand-in for sync debug mode: a warning at each Tensor method that reads values back to Python or has a
    data-dependent shape (what would be a host sync on a GPU), located at the first caller outside torch."""

    NAMES = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy"})
    _torch_dir = os.path.dirname(torch.__file__)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            f = sys._getframe(1)
            while f is not None and (f.f_code.co_filename.startswith(self._torch_dir)
                                     or f.f_code.co_filename == __file__):
                f = f.f_back
            where = (f.f_code.co_filename, f.f_lineno) if f is not None else ("?", 0)
            warnings.warn_explicit(f"{STANDIN_WARNING}: Tensor.{name}", UserWarning, *where)
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """Counts host syncs while active: ``torch.cuda.set_sync_debug_mode("warn")`` on CUDA (each sync emits a
    warning, recorded by ``warnings.catch_warnings(record=True)``), the ``_HostReads`` stand-in on a CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.method = ("torch.cuda.set_sync_debug_mode('warn')" if self.cuda else
                       "CPU: set_sync_debug_mode needs CUDA (not run); stand-in: host reads (.item, .tolist, bool, "
                       "int, float, nonzero) counted through a TorchFunctionMode")
        self.log: list = []
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        self.log = self._stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")  # every sync, not once per source line
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            self._stack.callback(torch.cuda.set_sync_debug_mode, "default")
        else:
            self._stack.enter_context(_HostReads())
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def mark(self) -> int:
        return len(self.log)

    def _syncs(self, start: int = 0, stop: int | None = None):
        key = SYNC_WARNING if self.cuda else STANDIN_WARNING
        return [w for w in self.log[start:stop] if key in str(w.message)]

    def count(self, start: int = 0, stop: int | None = None) -> int:
        return len(self._syncs(start, stop))

    def sites(self, start: int = 0, stop: int | None = None, top: int | None = 12) -> dict[str, int]:
        """The source lines that issued the syncs (Python's caller of the op), most first."""
        c = collections.Counter(f"{_short(w.filename)}:{w.lineno}" for w in self._syncs(start, stop))
        return dict(c.most_common(top))


def _short(path: str) -> str:
    for anchor in ("site-packages/", "/src/", "/benchmarks/"):
        if anchor in path:
            return path.split(anchor, 1)[1]
    return path


def head_syncs(device: str, tiny: bool) -> dict:
    """Syncs of the head step alone (``index`` given): first call and a second (steady) call of each variant."""
    shapes = HEAD_TINY if tiny else dict(vocab_size=152064, hidden_size=512, pairs=2, seq_len=512, completion=256)
    chunks = CHUNKS_TINY if tiny else CHUNKS
    hidden, head, labels, ref, index = head_inputs(device, **shapes)
    out: dict = {"shapes": {**shapes, "completion_tokens": index.numel(), "chunks": chunks}}
    for precision, autocast in (("bf16 autocast", torch.bfloat16), ("float32", None)):
        for kind, (chunk, vchunk) in chunks.items():
            for loss, sam in (("dpo", False), ("logits_sam", True)):
                counts = []
                with SyncCounter(device) as counter:
                    for _ in range(2):
                        m = counter.mark()
                        head_step(hidden, head, labels, index, ref, sam=sam, chunk_size=chunk, vocab_chunk_size=vchunk,
                                  autocast=autocast)
                        counts.append(counter.count(m))
                    sites = counter.sites()
                out[f"{precision} / {kind} / {loss}"] = {"first_call": counts[0], "steady": counts[1],
                                                         **({"sites": sites} if sites else {})}
    # the control: without index the head finds the completion positions itself (nonzero, label range check)
    with SyncCounter(device) as counter:
        head_step(hidden, head, labels, None, ref, sam=False, chunk_size=None, vocab_chunk_size=None)
        out["control: bf16 autocast / dense / dpo / no index (expected > 0)"] = {
            "count": counter.count(), "sites": counter.sites()}
    return out


def random_pairs(n: int, vocab: int, prompt: int, completion: int, seed: int = 0) -> list[dict]:
    """Tokenised preference pairs as the collator takes them, with precomputed reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        row = {"index": i, "ref_chosen_logps": float(-50 * torch.rand(1, generator=g)),
               "ref_rejected_logps": float(-50 * torch.rand(1, generator=g))}
        p = torch.randint(5, vocab, (prompt,), generator=g).tolist()
        for side in ("chosen", "rejected"):
            c = torch.randint(5, vocab, (completion - int(torch.randint(0, completion // 4, (1,), generator=g)),),
                              generator=g).tolist()
            row[f"{side}_input_ids"] = p + c
            row[f"{side}_labels"] = [-100] * len(p) + c
        rows.append(row)
    return rows


def _marks_callback(counter: SyncCounter):
    from transformers import TrainerCallback

    class Marks(TrainerCallback):
        """Where each Trainer event fell in the counter's log (first in the callback list: before logitsam's own
        ``on_pre_optimizer_step``, the non-finite check, so that check counts in the optimizer phase)."""

        def __init__(self):
            self.events: list[tuple[str, int, int]] = []

        def _mark(self, name, state):
            self.events.append((name, state.global_step, counter.mark()))

        def on_train_begin(self, args, state, control, **kw):
            self._mark("train_begin", state)

        def on_step_begin(self, args, state, control, **kw):
            self._mark("step_begin", state)

        def on_substep_end(self, args, state, control, **kw):
            self._mark("substep_end", state)

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self._mark("pre_optimizer", state)

        def on_step_end(self, args, state, control, **kw):
            self._mark("step_end", state)

        def on_log(self, args, state, control, **kw):
            self._mark("log", state)

        def on_train_end(self, args, state, control, **kw):
            self._mark("train_end", state)

    return Marks()


def _per_step(events, counter: SyncCounter) -> list[dict]:
    """Per optimizer step: syncs while prefetching its micro-batches (before ``on_step_begin``), in each
    micro-batch (the last one until ``on_pre_optimizer_step``, so it holds the gradient clipping), in the
    optimizer phase (non-finite check, ``optimizer.step``, scheduler, zero_grad) and in logging after it."""
    steps, prev, cur = [], 0, None
    for name, _, pos in events:
        if name == "train_begin":
            prev = pos
        elif name == "step_begin":
            cur = {"prefetch": counter.count(prev, pos), "micro_batches": [], "_at": pos}
        elif name in ("substep_end", "pre_optimizer") and cur is not None:
            cur["micro_batches"].append(counter.count(cur["_at"], pos))
            cur["_at"] = pos
        elif name == "step_end" and cur is not None:
            cur["optimizer"] = counter.count(cur.pop("_at"), pos)
            cur["total"] = cur["prefetch"] + sum(cur["micro_batches"]) + cur["optimizer"]
            cur["logging"] = 0
            steps.append(cur)
            cur, prev = None, pos
        elif name == "log" and steps and cur is None:  # this step's log, then (last step) the run's summary
            steps[-1]["logging"] += counter.count(prev, pos)
            prev = pos
    return steps


def trainer_syncs(device: str, tiny: bool, work: Path, sam: str, chunk_size, vocab_chunk_size) -> dict:
    """``PreferenceTrainer.train`` on a small Qwen-shaped random model: 4 optimizer steps (3 with ``tiny``) of 4
    micro-batches of 2 pairs, logging every 2 steps, precomputed reference log-probs (no reference model), the CLI's
    Trainer defaults otherwise (bf16 autocast over float32 weights on CUDA)."""
    from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

    from logitsam.data import PreferenceCollator
    from logitsam.train.trainer import PreferenceTrainer

    cfg = dict(SHAPES["tiny" if tiny else "qwen-small"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, max_position_embeddings=4096, pad_token_id=0,
                                  bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ga, steps = 4, 3 if tiny else 4
    data = random_pairs(2 * ga * steps, config.vocab_size, prompt=24 if tiny else 48, completion=24 if tiny else 80)
    cuda = device.startswith("cuda")
    args = TrainingArguments(str(work / f"syncs-{sam}-{chunk_size}"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=ga, max_steps=steps, logging_steps=2, learning_rate=1e-6,
                             save_strategy="no", report_to="none", disable_tqdm=True, remove_unused_columns=False,
                             bf16=cuda, use_cpu=not cuda, seed=0)
    counter = SyncCounter(device)
    marks = _marks_callback(counter)
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=data, data_collator=PreferenceCollator(0),
                                callbacks=[marks], sam=sam, sam_rho=RHO, chunk_size=chunk_size,
                                vocab_chunk_size=vocab_chunk_size)
    with counter:
        trainer.train()
    per_step = _per_step(marks.events, counter)
    steady = per_step[1:]  # the first step also builds the optimizer state
    begins = [p for n, _, p in marks.events if n == "step_begin"]
    ends = [p for n, _, p in marks.events if n == "step_end"]
    return {
        "gradient_accumulation_steps": ga, "optimizer_steps": steps, "logging_steps": 2,
        "per_optimizer_step (steady, no logging)": [s["total"] for s in steady],
        "per_micro_batch (steady)": [c for s in steady for c in s["micro_batches"]],
        "logging_extra": [s["logging"] for s in per_step],
        "per_step": per_step,
        "total": counter.count(),
        "events": len(marks.events),
        # the micro-batches and optimizer phases of the steps after the first (no prefetch, no logging)
        "sites_steady": _sum_sites(counter, list(zip(begins[1:], ends[1:], strict=True))),
        "sites_all": counter.sites(),
    }


def _sum_sites(counter: SyncCounter, spans) -> dict[str, int]:
    total = collections.Counter()
    for a, b in spans:
        total.update(counter.sites(a, b, top=None))
    return dict(total.most_common(12))


def host_syncs(device: str, tiny: bool, work: Path) -> dict:
    counter = SyncCounter(device)
    out: dict = {"method": counter.method, "head_step": None, "trainer": {}}
    try:
        out["head_step"] = head_syncs(device, tiny)
    except Exception:  # the trainer runs below still run
        out["head_step"] = {"error": traceback.format_exc()[-3000:]}
    chunks = CHUNKS_TINY if tiny else CHUNKS
    runs = (("logits", "chunked"),) if tiny else (("logits", "chunked"), ("logits", "dense"), ("none", "chunked"))
    for sam, kind in runs:
        key = f"sam={sam} / {kind}"
        try:
            out["trainer"][key] = trainer_syncs(device, tiny, work, sam, *chunks[kind])
        except Exception:
            out["trainer"][key] = {"error": traceback.format_exc()[-3000:]}
        _free(device)
    out["summary"] = _sync_summary(out)
    return out


def _sync_summary(out: dict) -> dict:
    head = out.get("head_step") or {}
    steady = {k: v["steady"] for k, v in head.items() if isinstance(v, dict) and "steady" in v}
    control = next((v.get("count") for k, v in head.items() if k.startswith("control")), None)
    trainer = {k: {"per_optimizer_step": v.get("per_optimizer_step (steady, no logging)"),
                   "per_micro_batch": sorted(set(v.get("per_micro_batch (steady)", []))),
                   "logging_extra": v.get("logging_extra")} for k, v in out["trainer"].items() if "error" not in v}
    return {"head_step_steady_max (expected 0)": max(steady.values()) if steady else None,
            "head_step_first_call_max": max((v["first_call"] for v in head.values()
                                             if isinstance(v, dict) and "first_call" in v), default=None),
            "control_without_index (expected > 0)": control, "trainer": trainer}


# ---- head profile -----------------------------------------------------------------------------------------------

GEMM = re.compile(r"gemm|matmul|cutlass|sm90|xmma|ampere|cublas|nvjet|(?<![a-z])(?:add|b|baddb)?mm(?![a-z])", re.I)


def kernel_times(prof, cuda: bool) -> tuple[list[tuple[str, float, int]], str]:
    """(name, microseconds, calls) per kernel name: CUDA device events, or on a CPU the aten ops' self CPU time."""
    from torch.autograd import DeviceType

    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    if cuda:
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                totals[e.name][0] += e.device_time_total
                totals[e.name][1] += 1
        source = "CUDA kernel events (memcpy/memset included)"
        if not totals:  # no device events came back (e.g. CUPTI unavailable): the ops' own device time
            for e in prof.key_averages():
                if e.self_device_time_total > 0:
                    totals[e.key] = [e.self_device_time_total, e.count]
            source = "no CUDA kernel events: aten ops' self device time instead"
    else:
        for e in prof.key_averages():
            if e.key.startswith("aten::") and e.self_cpu_time_total > 0:
                totals[e.key] = [e.self_cpu_time_total, e.count]
        source = "CPU: aten ops' self CPU time stand in for kernels"
    rows = sorted(((k, v[0], v[1]) for k, v in totals.items()), key=lambda r: -r[1])
    return rows, source


def head_profile(device: str, tiny: bool) -> dict:
    """Device time of one logits-SAM chunked head step at 7B head shapes: GEMM kernels vs everything else."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    shapes = HEAD_TINY if tiny else HEAD_7B
    chunk, vchunk = (CHUNKS_TINY if tiny else CHUNKS)["chunked"]
    hidden, head, labels, ref, index = head_inputs(device, **shapes)

    def step():
        head_step(hidden, head, labels, index, ref, sam=True, chunk_size=chunk, vocab_chunk_size=vchunk)

    step()  # warm-up: cuBLAS handles, allocator
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    wall = time.perf_counter() - t0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    t0 = time.perf_counter()
    rows, source = kernel_times(prof, cuda)
    parse = time.perf_counter() - t0
    total = sum(r[1] for r in rows)
    gemm = sum(r[1] for r in rows if GEMM.search(r[0]))
    return {
        "shapes": {**shapes, "completion_tokens": index.numel(), "chunk_size": chunk, "vocab_chunk_size": vchunk,
                   "precision": "float32 weights, bf16 autocast", "rho": RHO},
        "source": source,
        "step_seconds_unprofiled": wall,
        "profile_parse_seconds": parse,
        "device_time_ms": total / 1e3,
        "gemm_ms": gemm / 1e3,
        "gemm_share": gemm / total if total else None,
        "other_ms": (total - gemm) / 1e3,
        "kernels": len(rows),
        "launches": sum(r[2] for r in rows),
        "top10": [{"name": name[:240], "ms": us / 1e3, "calls": calls, "share": us / total if total else None,
                   "gemm": bool(GEMM.search(name))} for name, us, calls in rows[:10]],
    }


# name -> (function of (device, tiny, work), time cap in seconds), in run order: the head checks first, the
# subprocess trainings last, the fixes' checks (tf32_ratio .. fsdp2_efficient_loading) early since they are short.
# Expected on an H200 (not yet measured): first_order_ratio ~15 s, tf32_ratio ~10 s, bf16_step0_margins ~40 s (two
# 1-step CLI runs), zero3_skip ~0 s without DeepSpeed (~35 s with it), fsdp2_efficient_loading ~0 s on one GPU
# (~60 s on two), head_memory_7b ~40 s, head_profile ~30 s, host_syncs ~60 s, head_bench ~90 s (8 fresh processes
# for memory), train ~120 s, fsdp2 ~60 s: ~7.8 minutes on one GPU without DeepSpeed. The run's --budget (470 s on
# a GPU) cuts whatever is left at the end (fsdp2 first); rerun it with --parts.
PARTS = {
    "first_order_ratio": (lambda device, tiny, work: first_order(device, tiny), 60),
    "tf32_ratio": (lambda device, tiny, work: tf32_ratio(device, tiny), 60),
    "bf16_step0_margins": (bf16_step0_margins, 120),
    "zero3_skip": (zero3_skip, 90),
    "fsdp2_efficient_loading": (fsdp2_efficient_loading, 150),  # skipped with fewer than 2 GPUs
    "head_memory_7b": (lambda device, tiny, work: head_memory(device, tiny), 120),
    "head_profile": (lambda device, tiny, work: head_profile(device, tiny), 90),
    "host_syncs": (host_syncs, 150),
    "head_bench": (lambda device, tiny, work: head_bench(device, tiny), 150),
    "train": (train_steps, 200),
    "fsdp2": (fsdp2, 120),  # needs train's model and data
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="toy sizes (plumbing check, e.g. on a CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (default: 470 on CUDA without --tiny, else none); a part that "
                         "would start with under 15 s left is skipped, a running part is cut at the deadline")
    a = ap.parse_args()
    names = [n.strip() for n in a.parts.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    budget = a.budget if a.budget is not None else (470.0 if a.device.startswith("cuda") and not a.tiny else None)
    _DEADLINE["run"] = time.monotonic() + budget if budget else float("inf")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/logitsam_gpu_check"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LOGITSAM_CACHE", str(work / "cache"))
    results = {"torch": torch.__version__, "device": a.device, "tiny": a.tiny, "parts": names, "budget_s": budget,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}

    def write():
        tmp = out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(results, indent=2, default=str))
        tmp.replace(out / "gpu_check.json")

    for name in names:
        fn, cap = PARTS[name]
        part(results, name, lambda fn=fn: fn(a.device, a.tiny, work), cap, write)
    write()
    print(json.dumps({k: v for k, v in results.items() if k != "head_bench"}, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()

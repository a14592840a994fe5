"""Side-by-side time and memory of the LM-head paths: plain vs logits-SAM, dense vs chunked.

Timing runs all paths interleaved in one process (median of repeats), so machine noise hits each
path alike; peak memory is measured per path in a fresh child process (CPU: peak RSS growth;
CUDA: ``max_memory_allocated`` growth), so one path's allocator cache cannot hide another's.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._atomic import write_json
from ._memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from .core import logits_sam, sequence_logps

PATHS = ("plain_dense", "plain_chunked", "sam_dense", "sam_chunked")


@dataclass
class BenchConfig:
    hidden_size: int = 576  # SmolLM2-135M
    vocab_size: int = 49152
    tokens: int = 1024
    rows: int = 4
    chunk_size: int = 512
    rho: float = 1e-3
    repeats: int = 5
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0


def _inputs(cfg: BenchConfig):
    # filled in place, so building the inputs leaves no temporary above their own size
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    T = cfg.tokens // cfg.rows
    hidden = torch.empty(cfg.rows, T, cfg.hidden_size, device=cfg.device, dtype=dtype).normal_(generator=g)
    head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
    weight = torch.empty(cfg.vocab_size, cfg.hidden_size, device=cfg.device, dtype=dtype)
    head.weight = torch.nn.Parameter(weight.normal_(std=0.02, generator=g))
    labels = torch.randint(0, cfg.vocab_size, (cfg.rows, T), generator=g, device=cfg.device)
    ref = -torch.rand(cfg.rows, generator=g, device=cfg.device) * 100
    return hidden.requires_grad_(), head, labels, ref


def _dpo(ref, beta=0.1):
    def loss_fn(out):
        logratio = out.logps - ref
        half = logratio.shape[0] // 2
        return -F.logsigmoid(beta * (logratio[:half] - logratio[half:])).mean()

    return loss_fn


def run_path(path: str, cfg: BenchConfig, hidden, head, labels, ref) -> None:
    """One training-step head: loss (plain or logits-SAM) + backward into hidden and weight."""
    chunk = cfg.chunk_size if path.endswith("chunked") else None
    hidden.grad = head.weight.grad = None
    loss_fn = _dpo(ref)
    if path.startswith("plain"):
        loss = loss_fn(sequence_logps(hidden, head, labels, chunk_size=chunk, with_stats=True))
    else:
        loss, _ = logits_sam(hidden, head, labels, loss_fn, cfg.rho, chunk_size=chunk)
    loss.backward()


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_paths(cfg: BenchConfig, paths=PATHS, progress=None) -> dict[str, float]:
    """Median seconds per call of each path, interleaved over repeats after one warm-up each."""
    inputs = _inputs(cfg)
    times: dict[str, list[float]] = {p: [] for p in paths}
    for p in paths:
        run_path(p, cfg, *inputs)
    for _ in range(cfg.repeats):
        for p in paths:
            _sync(cfg.device)
            t0 = time.perf_counter()
            run_path(p, cfg, *inputs)
            _sync(cfg.device)
            times[p].append(time.perf_counter() - t0)
            if progress:
                progress.update(1)
    return {p: statistics.median(v) for p, v in times.items()}


def _memory_child(path, cfg, queue):
    torch.set_num_threads(1)
    inputs = _inputs(cfg)
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_path(path, cfg, *inputs)
        torch.cuda.synchronize()
        queue.put(torch.cuda.max_memory_allocated() - base)
        return
    # MALLOC_MMAP_THRESHOLD_ (set by the parent) makes large blocks go back to the OS when freed,
    # so the RSS high-water mark minus the RSS before the call is the call's peak extra memory.
    base = current_rss_bytes()
    reset_peak_rss()
    run_path(path, cfg, *inputs)
    queue.put(peak_rss_bytes() - base)


def peak_memory(path: str, cfg: BenchConfig) -> int:
    """Peak extra bytes of one call of ``path`` above its inputs, in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(path, cfg, queue))
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    try:
        proc.start()
    finally:
        if old is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    value = queue.get(timeout=600)
    proc.join()
    return int(value)


def run_bench(cfg: BenchConfig, *, memory: bool = True, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.repeats * len(PATHS), desc="timing head paths", disable=not progress)
    seconds = time_paths(cfg, progress=bar)
    bar.close()
    mem = {p: peak_memory(p, cfg) for p in tqdm(PATHS, desc="peak memory", disable=not progress)} if memory else {}
    ratios = {
        "sam_dense / plain_dense (time)": seconds["sam_dense"] / seconds["plain_dense"],
        "plain_chunked / plain_dense (time)": seconds["plain_chunked"] / seconds["plain_dense"],
        "sam_chunked / sam_dense (time)": seconds["sam_chunked"] / seconds["sam_dense"],
    }
    if mem:
        ratios["plain_chunked / plain_dense (peak extra memory)"] = mem["plain_chunked"] / mem["plain_dense"]
        ratios["sam_chunked / sam_dense (peak extra memory)"] = mem["sam_chunked"] / mem["sam_dense"]
    return {"config": cfg.__dict__, "seconds": seconds, "peak_extra_bytes": mem, "ratios": ratios}


TARGETS = {
    "sam_dense / plain_dense (time)": 2.0,
    "plain_chunked / plain_dense (time)": 1.3,
    "sam_chunked / sam_dense (time)": 1.3,
    "plain_chunked / plain_dense (peak extra memory)": 0.25,
    "sam_chunked / sam_dense (peak extra memory)": 0.25,
}


def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"head shapes: d={cfg['hidden_size']}, V={cfg['vocab_size']}, tokens={cfg['tokens']}, "
        f"chunk={cfg['chunk_size']}, {cfg['dtype']} on {cfg['device']}, median of {cfg['repeats']}",
        "",
        "| path | seconds | peak extra MiB |",
        "|---|---:|---:|",
    ]
    for p in PATHS:
        mib = result["peak_extra_bytes"].get(p)
        lines.append(f"| {p} | {result['seconds'][p]:.3f} | {'' if mib is None else f'{mib / 2**20:.0f}'} |")
    lines += ["", "| ratio | measured | target |", "|---|---:|---:|"]
    for name, value in result["ratios"].items():
        ok = "ok" if value <= TARGETS[name] else "MISSED"
        lines.append(f"| {name} | {value:.2f} | <= {TARGETS[name]} ({ok}) |")
    return "\n".join(lines)


def main(cfg: BenchConfig | None = None, *, memory: bool = True, output: str | None = None) -> dict:
    cfg = cfg or BenchConfig()
    result = run_bench(cfg, memory=memory)
    print(format_table(result))
    if output:
        write_json(output, result, indent=2)
    return result

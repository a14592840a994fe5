"""What the half-precision split product costs: logits-SAM with ``H W^T + s H U^T`` vs the fused
``H (W + eps)^T`` (which rounds eps away in bf16), dense and chunked, timed interleaved in one process.

    python benchmarks/precision_cost.py [--dtype bfloat16 --vocab 49152 --hidden 576 --tokens 1024]
"""

from __future__ import annotations

import argparse
import statistics
import time

from logitsam.bench import BenchConfig, _dpo, _inputs
from logitsam.core import head, head_chunked, logits_sam, sequence_logps


def _fused(delta, dtype, block=None):
    if isinstance(delta, head.SplitDelta):  # the chunked ascent builds the split form directly: undo it
        return delta.dense().to(dtype)
    return None if delta is None else delta.detach()


def step(kind, chunk, cfg, hidden, lm_head, labels, ref):
    hidden.grad = lm_head.weight.grad = None
    loss_fn = _dpo(ref)
    if kind == "plain":
        loss = loss_fn(sequence_logps(hidden, lm_head, labels, chunk_size=chunk))
    else:
        real = head.split_delta, head_chunked.split_delta
        if kind == "sam_fused":  # the pre-split formula, for timing only
            head.split_delta = head_chunked.split_delta = _fused
        try:
            loss, _ = logits_sam(hidden, lm_head, labels, loss_fn, cfg.rho, chunk_size=chunk)
        finally:
            head.split_delta, head_chunked.split_delta = real
    loss.backward()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    cfg = BenchConfig(hidden_size=a.hidden, vocab_size=a.vocab, tokens=a.tokens, dtype=a.dtype)
    inputs = _inputs(cfg)
    runs = [(k, c) for c in (None, cfg.chunk_size) for k in ("plain", "sam_fused", "sam_split")]
    times = {r: [] for r in runs}
    for r in runs:
        step(*r, cfg, *inputs)  # warm-up
    for _ in range(a.repeats):
        for r in runs:
            t0 = time.perf_counter()
            step(*r, cfg, *inputs)
            times[r].append(time.perf_counter() - t0)
    med = {r: statistics.median(v) for r, v in times.items()}
    print(f"d={a.hidden} V={a.vocab} tokens={a.tokens} {a.dtype}, median of {a.repeats}")
    print("| head | plain s | logits-SAM fused s | logits-SAM split s | split / fused | split / plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for c, name in ((None, "dense"), (cfg.chunk_size, "chunked")):
        p, f, s = med[("plain", c)], med[("sam_fused", c)], med[("sam_split", c)]
        print(f"| {name} | {p:.3f} | {f:.3f} | {s:.3f} | {s / f:.2f} | {s / p:.2f} |")


if __name__ == "__main__":
    main()

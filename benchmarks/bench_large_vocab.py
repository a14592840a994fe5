"""Peak extra memory (and time) of the logits-SAM head, chunked vs dense, at a large vocabulary.

Each path runs once in a fresh process with 2 threads (``logitsam bench``'s memory children use 1 thread,
which takes many minutes at these shapes). CPU: growth of the peak RSS over the inputs.

    python benchmarks/bench_large_vocab.py [--vocab 151936 --hidden 896 --tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time


def _child(path, shapes, queue):
    import torch

    torch.set_num_threads(2)
    from logitsam._memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
    from logitsam.bench import BenchConfig, _inputs, run_path

    cfg = BenchConfig(**shapes, chunk_size=512, repeats=1)
    inputs = _inputs(cfg)
    base = current_rss_bytes()
    reset_peak_rss()
    t0 = time.perf_counter()
    run_path(path, cfg, *inputs)
    queue.put((peak_rss_bytes() - base, time.perf_counter() - t0))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--tokens", type=int, default=4096)
    a = ap.parse_args()
    shapes = {"vocab_size": a.vocab, "hidden_size": a.hidden, "tokens": a.tokens}
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # freed large blocks go back to the OS
    ctx = mp.get_context("spawn")
    out = {}
    for path in ("sam_chunked", "sam_dense"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(path, shapes, queue))
        proc.start()
        out[path] = queue.get(timeout=1800)
        proc.join()
        print(f"{path}: {out[path][0] / 2**20:.0f} MiB peak extra, {out[path][1]:.0f} s", flush=True)
    print(json.dumps({"shapes": shapes, "sam_chunked / sam_dense (peak extra memory)":
                      out["sam_chunked"][0] / out["sam_dense"][0], "paths": out}))


if __name__ == "__main__":
    main()

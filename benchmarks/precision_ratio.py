"""The first-order ratio r = (loss_post - loss_pre) / <g, eps> of logits-SAM per dtype and radius.

r is 1 + O(rho) when the perturbation acts and ~0 when it is rounded away. Rows: fp32, bf16 weights,
fp32 weights under bf16 autocast (and fp16 under fp16 autocast), each with the dense and the chunked
head. A DPO loss on random hidden states, head (V, d) with W ~ N(0, 0.02).

    python benchmarks/precision_ratio.py [--vocab 8192 --hidden 256 --tokens 512]
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
import torch.nn.functional as F

from logitsam.core import logits_sam

SETTINGS = {
    "fp32": (torch.float32, None),
    "bf16 weights": (torch.bfloat16, None),
    "fp32 weights, bf16 autocast": (torch.float32, torch.bfloat16),
    "fp32 weights, fp16 autocast": (torch.float32, torch.float16),
}


def ratio(setting, rho, chunk_size, vocab, hidden_size, tokens, seed=0):
    dtype, autocast = SETTINGS[setting]
    g = torch.Generator().manual_seed(seed)
    rows, T = 4, tokens // 4
    hidden = torch.randn(rows, T, hidden_size, generator=g).to(dtype)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    head.weight.data = (torch.randn(vocab, hidden_size, generator=g) * 0.02).to(dtype)
    labels = torch.randint(0, vocab, (rows, T), generator=g)
    ref = -torch.rand(rows, generator=g) * 10 - T * 9.0

    def loss_fn(out):
        logratio = out.logps - ref
        return -F.logsigmoid(0.1 * (logratio[: rows // 2] - logratio[rows // 2 :])).mean()

    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        _, st = logits_sam(hidden, head, labels, loss_fn, rho, chunk_size=chunk_size)
    # <g, eps> = rho ||g|| for plain SAM; older versions report only grad_norm
    predicted = st.get("first_order", rho * st["grad_norm"])
    return float((st["loss_post"] - st["loss_pre"]) / predicted)  # the stats are 0-dim tensors


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rhos", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    table = {}
    print("| weights / compute | head | " + " | ".join(f"rho {r:g}" for r in a.rhos) + " |")
    print("|---|---|" + "---:|" * len(a.rhos))
    for setting in SETTINGS:
        for head_name, chunk in (("dense", None), ("chunked", 256)):
            rs = [ratio(setting, rho, chunk, a.vocab, a.hidden, a.tokens) for rho in a.rhos]
            table[f"{setting} / {head_name}"] = rs
            print(f"| {setting} | {head_name} | " + " | ".join(f"{r:.3f}" for r in rs) + " |")
    if a.json:
        print(json.dumps(table))


if __name__ == "__main__":
    main()

"""Dense vs chunked LM-head ops, and both against a direct full-softmax computation."""

import pytest
import torch
import torch.nn.functional as F

from logitsam.core import chunked_head_logps, dense_head_logps
from logitsam.core import head_chunked as hc


def make_inputs(R=3, T=47, d=31, V=123, bias=True, dtype=torch.float32, seed=0, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(R, T, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(V, d, generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (R, T), generator=g)
    labels[:, :5] = -100  # a "prompt"
    labels[0, -7:] = -100  # padding
    if empty_row:
        labels[1] = -100  # a row with no completion token
    return hidden, weight, b, labels


def direct(hidden, weight, bias, labels):
    """Per-row values from full logits over every position, written out independently."""
    logits = (hidden.double() @ weight.double().T) + (0 if bias is None else bias.double())  # (R, T, V)
    logp = logits.log_softmax(-1)
    p = logp.exp()
    mask = labels != -100
    safe = labels.clamp_min(0)
    tok = logp.gather(-1, safe[..., None]).squeeze(-1) * mask
    per_tok = {
        "entropy": -(p * logp).sum(-1),
        "argmax_prob": p.max(-1).values,
        "top1": (logits.argmax(-1) == labels).double(),
        "sum_p2": (p * p).sum(-1),
        "logits_sum": logits.sum(-1),
        "argmax_logp": logp.max(-1).values,
    }
    out = {k: (v * mask).sum(-1) for k, v in per_tok.items()}
    out["logps"] = tok.sum(-1)
    out["token_logps"] = tok
    out["lengths"] = mask.sum(-1)
    return out


STAT_FIELDS = ["logps", "entropy", "argmax_prob", "top1", "sum_p2", "logits_sum", "argmax_logp"]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunks", [(1, None), (7, 17), (7, None), (1000, 50), (64, 123)])
def test_chunked_matches_dense_fp32(bias, chunks):
    hidden, weight, b, labels = make_inputs(bias=bias)
    dense = dense_head_logps(hidden, weight, b, labels)
    chunked = chunked_head_logps(hidden, weight, b, labels, chunk_size=chunks[0], vocab_chunk_size=chunks[1])
    ref = direct(hidden, weight, b, labels)
    for name in STAT_FIELDS + ["token_logps"]:
        torch.testing.assert_close(getattr(chunked, name), getattr(dense, name), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(getattr(dense, name).double(), ref[name], atol=1e-4, rtol=1e-5)
    assert torch.equal(chunked.lengths, ref["lengths"]) and torch.equal(dense.lengths, ref["lengths"])
    assert chunked.logps[1] == 0 and chunked.lengths[1] == 0

    # a loss that weights rows and tokens differently, so every gradient path is exercised
    w_row = torch.linspace(-1.0, 2.0, labels.shape[0])
    params = [hidden, weight] + ([b] if bias else [])

    def loss(out):
        return (out.logps * w_row).sum() + 0.1 * out.token_logps.square().sum()

    g_dense = torch.autograd.grad(loss(dense), params)
    g_chunk = torch.autograd.grad(loss(chunked), params)
    for a, c in zip(g_dense, g_chunk, strict=True):
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)
    # the empty row and ignored positions get exactly zero gradient
    assert g_chunk[0][1].abs().max() == 0 and g_chunk[0][0, :5].abs().max() == 0


def test_chunked_gradcheck_float64():
    hidden, weight, b, labels = make_inputs(R=2, T=6, d=4, V=11, dtype=torch.float64)
    f = lambda h, w, bb: chunked_head_logps(h, w, bb, labels, chunk_size=3, vocab_chunk_size=4).logps  # noqa: E731
    assert torch.autograd.gradcheck(f, (hidden, weight, b))


def test_bf16_close_to_fp32():
    """bf16 inputs: the two paths agree with each other tightly and with fp32 within bf16 precision."""
    hidden, weight, b, labels = make_inputs(dtype=torch.bfloat16)
    dense = dense_head_logps(hidden, weight, b, labels)
    chunked = chunked_head_logps(hidden, weight, b, labels, chunk_size=7, vocab_chunk_size=40)
    assert dense.logps.dtype == torch.float32 and chunked.logps.dtype == torch.float32
    torch.testing.assert_close(chunked.logps, dense.logps, atol=2e-2, rtol=2e-3)
    ref = direct(hidden.float(), weight.float(), b.float(), labels)
    torch.testing.assert_close(dense.logps.double(), ref["logps"], atol=0.5, rtol=2e-2)
    gd = torch.autograd.grad(dense.logps.sum(), [hidden, weight, b])
    gc = torch.autograd.grad(chunked.logps.sum(), [hidden, weight, b])
    for a, c in zip(gd, gc, strict=True):
        assert c.dtype == a.dtype == torch.bfloat16
        torch.testing.assert_close(c.float(), a.float(), atol=5e-2, rtol=5e-2)


def test_chunked_never_builds_full_logits(monkeypatch):
    """Every logits block the chunked op computes has at most chunk x vocab_chunk entries."""
    hidden, weight, b, labels = make_inputs()
    sizes = []
    real_linear = F.linear

    def spy(x, w, bias=None):
        out = real_linear(x, w, bias)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(hc.F, "linear", spy)
    out = chunked_head_logps(hidden, weight, b, labels, chunk_size=8, vocab_chunk_size=32)
    out.logps.sum().backward()
    n_tokens = int((labels != -100).sum())
    assert sizes and max(sizes) <= 8 * 32 < n_tokens * weight.shape[0]


def test_label_outside_vocab_is_a_clear_error():
    hidden, weight, b, labels = make_inputs()
    labels[2, 10] = weight.shape[0]
    for fn in (dense_head_logps, chunked_head_logps):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            fn(hidden, weight, b, labels)


def test_shape_mismatch_is_a_clear_error():
    hidden, weight, b, labels = make_inputs()
    with pytest.raises(ValueError, match="expected hidden"):
        dense_head_logps(hidden, weight, b, labels[:, :-1])

"""logits-SAM in half precision: the perturbation must survive bf16/fp16 weights and autocast.

The first-order ratio ``r = (loss_post - loss_pre) / <g, eps>`` is 1 + O(rho) when eps really acts
and ~0 when ``W + eps`` rounds back to ``W`` (bf16 spacing at |W| ~ 0.02 is ~1e-4, eps entries ~1e-7).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from logitsam.core import chunked_head_logps, dense_head_logps, first_order_ratio, logits_sam, sequence_logps
from logitsam.core import head_chunked as hc
from logitsam.core.head import SplitDelta, compute_dtype, reduced_fp32_matmul, split_compute, split_delta

V, D, TOKENS = 8192, 256, 512  # the head shape of the table, not a toy vocabulary
HEADS = {"dense": {}, "chunked": {"chunk_size": 128, "vocab_chunk_size": 2048}}
SETTINGS = {  # weights dtype, autocast dtype
    "bf16 weights": (torch.bfloat16, None),
    "fp32 weights + bf16 autocast": (torch.float32, torch.bfloat16),
    "fp32 weights + fp16 autocast": (torch.float32, torch.float16),
}


def autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()


def head_problem(dtype, seed=0, rows=4, vocab=V, d=D, tokens=TOKENS, bias=False):
    """Random hidden states, a (V, d) head with W ~ N(0, 0.02), labels, and a DPO loss."""
    g = torch.Generator().manual_seed(seed)
    T = tokens // rows
    hidden = torch.randn(rows, T, d, generator=g).to(dtype)
    head = torch.nn.Linear(d, vocab, bias=bias)
    head.weight.data = (torch.randn(vocab, d, generator=g) * 0.02).to(dtype)
    if bias:
        head.bias.data = (torch.randn(vocab, generator=g) * 0.1).to(dtype)
    labels = torch.randint(0, vocab, (rows, T), generator=g)
    labels[:, :3] = -100
    ref = -torch.rand(rows, generator=g) * 10 - T * 9.0

    def loss_fn(out):
        logratio = out.logps - ref
        return -F.logsigmoid(0.1 * (logratio[: rows // 2] - logratio[rows // 2 :])).mean()

    return hidden, head, labels, loss_fn


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("rho", [1e-4, 1e-3])
def test_first_order_ratio_is_one_in_half_precision(setting, head, rho):
    """Before the split product, bf16 weights gave r = 0.01 (1e-4) and 0.09 (1e-3): a no-op."""
    w_dtype, ac = SETTINGS[setting]
    hidden, lm_head, labels, loss_fn = head_problem(w_dtype)
    with autocast(ac):
        _, st = logits_sam(hidden, lm_head, labels, loss_fn, rho, **HEADS[head])
    st = {k: float(v) for k, v in st.items() if k != "clean"}  # 0-dim tensors: read once, here
    r = first_order_ratio(st["loss_pre"], st["loss_post"], st["first_order"])
    assert abs(r - 1) < 0.05, r
    # <g, eps> = rho ||g|| for plain SAM with a local norm; the chunked head reports <g, eps> for the eps it
    # uses, whose unit direction is rounded to the compute dtype slice by slice (bf16: 2^-9 per entry)
    tol = 1e-5 if head == "dense" else 1e-3
    assert st["first_order"] == pytest.approx(rho * st["grad_norm"], rel=tol)


@pytest.mark.parametrize("head", list(HEADS))
def test_first_order_ratio_fp32(head):
    hidden, lm_head, labels, loss_fn = head_problem(torch.float32)
    _, st = logits_sam(hidden, lm_head, labels, loss_fn, 1e-3, **HEADS[head])
    st = {k: float(v) for k, v in st.items() if k != "clean"}
    assert abs(first_order_ratio(st["loss_pre"], st["loss_post"], st["first_order"]) - 1) < 0.02


def test_first_order_ratio_edge_cases():
    assert first_order_ratio(1.0, 1.0, 0.0) != first_order_ratio(1.0, 1.0, 0.0)  # NaN: nothing predicted
    assert first_order_ratio(1.0, 1.5, 0.25) == 2.0
    # the tensor form (what a training step keeps until it logs): same values, no host sync
    assert float(first_order_ratio(torch.tensor(1.0), torch.tensor(1.5), torch.tensor(0.25))) == 2.0
    assert torch.isnan(first_order_ratio(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.0)))


def _grads(hidden, lm_head, labels, loss_fn, rho, head, ac):
    h = hidden.detach().clone().requires_grad_()
    lm_head.zero_grad()
    with autocast(ac):
        if rho == 0:
            loss = loss_fn(sequence_logps(h, lm_head, labels, with_stats=False, **HEADS[head]))
        else:
            loss, _ = logits_sam(h, lm_head, labels, loss_fn, rho, **HEADS[head])
    loss.backward()
    return loss.detach(), h.grad.detach().clone(), lm_head.weight.grad.detach().clone()


def _cos(a, b):
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("setting", ["bf16 weights", "fp32 weights + bf16 autocast"])
def test_sam_correction_direction_matches_fp32(setting, head):
    """``grad_sam - grad_plain`` in bf16 points the way the same correction does in fp32.

    The fp32 reference uses the same bf16-rounded hidden states and weights, upcast. At rho = 1e-2
    the correction is ~5 % of the head gradient, well above bf16's relative rounding (2^-8 = 0.4 %).
    """
    w_dtype, ac = SETTINGS[setting]
    hidden, lm_head, labels, loss_fn = head_problem(torch.bfloat16, vocab=4096, tokens=256)
    rho = 1e-2
    low = lm_head.to(w_dtype)
    plain = _grads(hidden.to(w_dtype), low, labels, loss_fn, 0.0, head, ac)
    sam = _grads(hidden.to(w_dtype), low, labels, loss_fn, rho, head, ac)
    ref32 = torch.nn.Linear(D, 4096, bias=False)
    ref32.weight.data = lm_head.weight.data.float()
    plain32 = _grads(hidden.float(), ref32, labels, loss_fn, 0.0, head, None)
    sam32 = _grads(hidden.float(), ref32, labels, loss_fn, rho, head, None)
    for i, name in ((1, "hidden"), (2, "weight")):
        corr, corr32 = sam[i].float() - plain[i].float(), sam32[i] - plain32[i]
        assert corr32.norm() > 0.02 * plain32[i].norm(), name  # the correction is not rounding noise
        assert _cos(corr, corr32) >= 0.9, (name, _cos(corr, corr32))


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_rho_zero_is_bit_identical_to_plain(setting, head):
    w_dtype, ac = SETTINGS[setting]
    hidden, lm_head, labels, loss_fn = head_problem(w_dtype, vocab=1024, tokens=128)
    plain = _grads(hidden, lm_head, labels, loss_fn, 0.0, head, ac)
    h = hidden.detach().clone().requires_grad_()
    lm_head.zero_grad()
    with autocast(ac):
        loss, _ = logits_sam(h, lm_head, labels, loss_fn, 0.0, **HEADS[head])
    loss.backward()
    assert torch.equal(loss.detach(), plain[0])
    assert torch.equal(h.grad, plain[1]) and torch.equal(lm_head.weight.grad, plain[2])


# ---- dense vs chunked in half precision, with and without a perturbation (Liger-style grid) ------

TOL = {torch.bfloat16: dict(atol=3e-2, rtol=2e-2), torch.float16: dict(atol=5e-3, rtol=5e-3)}


def _grid_inputs(shape, bias, dtype, seed=0):
    R, T, d, vocab = shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(R, T, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (R, T), generator=g)
    labels[:, :5] = -100
    labels[0, -7:] = -100
    delta = torch.randn(vocab, d, generator=g) * 1e-3
    return hidden, weight, b, labels, delta


@pytest.mark.parametrize("shape", [(3, 47, 31, 123), (2, 16, 64, 1000)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("perturbed", [False, True])
@pytest.mark.parametrize("mode", ["bf16 weights", "fp32 weights + bf16 autocast", "fp32 weights + fp16 autocast"])
def test_dense_vs_chunked_half(shape, bias, perturbed, mode):
    w_dtype, ac = SETTINGS[mode]
    hidden, weight, b, labels, delta = _grid_inputs(shape, bias, w_dtype)
    delta = delta.to(w_dtype) if perturbed else None
    params = [hidden, weight] + ([b] if bias else [])
    row_w = torch.linspace(-1.0, 2.0, labels.shape[0])
    results = []
    for fn, kw in ((dense_head_logps, {}), (chunked_head_logps, dict(chunk_size=7, vocab_chunk_size=40))):
        with autocast(ac):
            out = fn(hidden, weight, b, labels, weight_delta=delta, **kw)
        loss = (out.logps * row_w).sum() + 0.1 * out.token_logps.square().sum()
        results.append((out, torch.autograd.grad(loss, params)))
    (dense, g_dense), (chunked, g_chunk) = results
    tol = TOL[ac or w_dtype]
    for name in ("logps", "token_logps", "entropy", "sum_p2", "argmax_logp"):
        torch.testing.assert_close(getattr(chunked, name), getattr(dense, name), **tol)
    for a, c in zip(g_dense, g_chunk, strict=True):
        assert c.dtype == a.dtype
        torch.testing.assert_close(c.float(), a.float(), **tol)


@pytest.mark.parametrize("ac", [torch.bfloat16, torch.float16])
def test_chunked_blocks_run_in_autocast_dtype_forward_and_backward(monkeypatch, ac):
    """Under a caller's autocast every logits block (forward and the recomputation in backward) is in ``ac``."""
    hidden, weight, b, labels, _ = _grid_inputs((3, 47, 31, 123), True, torch.float32)
    dtypes = []
    real_linear = F.linear

    def spy(x, w, bias=None):
        dtypes.append((x.dtype, w.dtype))
        return real_linear(x, w, bias)

    monkeypatch.setattr(hc.F, "linear", spy)
    with autocast(ac):
        out = chunked_head_logps(hidden, weight, b, labels, chunk_size=8, vocab_chunk_size=32)
    n_forward = len(dtypes)
    out.logps.sum().backward()  # outside autocast, as training loops do
    assert n_forward > 0 and len(dtypes) > n_forward
    assert set(dtypes) == {(ac, ac)}
    assert hidden.grad.dtype == weight.grad.dtype == b.grad.dtype == torch.float32


def test_split_delta_survives_fp16():
    """eps entries ~1e-7 underflow float16 (smallest normal 6e-5); the unit/scale split keeps them."""
    delta = torch.randn(64, 32, dtype=torch.float64) * 1e-7
    split = split_delta(delta.float(), torch.float16)
    assert isinstance(split, SplitDelta) and split.unit.dtype == torch.float16
    err_split = (split.unit.double() * split.scale.double() - delta).abs().max()
    err_naive = (delta.half().double() - delta).abs().max()  # subnormal: spacing 6e-8
    assert err_split <= 1e-3 * delta.abs().max() and 20 * err_split < err_naive
    assert split_delta(delta.float(), torch.float32) is not None and not isinstance(
        split_delta(delta.float(), torch.float32), SplitDelta)


def test_compute_dtype():
    w = torch.zeros(2, 2)
    assert compute_dtype(w) == torch.float32 and compute_dtype(w.bfloat16()) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(w) == torch.bfloat16 and compute_dtype(w.double()) == torch.float64



# ---- float32 weights under reduced-precision float32 matmuls (TF32, oneDNN bf16) ----------------------


def _round_fp32(x, bits):
    """``x`` (float32) rounded to nearest-even with ``bits`` explicit mantissa bits (bf16: 7, TF32: 10)."""
    drop = 23 - bits
    i = x.detach().contiguous().view(torch.int32)
    i = (i + ((1 << (drop - 1)) - 1) + ((i >> drop) & 1)) & ~((1 << drop) - 1)
    return x + (i.view(torch.float32) - x).detach()  # straight-through: the dense clean pass differentiates W


_FP32_FLAGS = (  # the new-API precision flags the tests below may set (torch >= 2.9), restored afterwards
    (torch.backends, "fp32_precision"),
    (torch.backends.cuda.matmul, "fp32_precision"),
    (torch.backends.mkldnn.matmul, "fp32_precision"),
)


@pytest.fixture
def matmul_precision():
    """Yields ``torch.set_float32_matmul_precision``; every fp32-precision flag is restored afterwards and
    the process is back at "highest" (the default) whatever the test did."""
    saved = [(obj, name, getattr(obj, name)) for obj, name in _FP32_FLAGS if hasattr(obj, name)]
    try:
        yield torch.set_float32_matmul_precision
    finally:
        torch.set_float32_matmul_precision("highest")
        for obj, name, value in saved:
            setattr(obj, name, value)
        assert torch.get_float32_matmul_precision() == "highest"


@pytest.fixture
def emulate_reduced_matmul(monkeypatch):
    """``F.linear`` (every logits product of both heads) rounds float32 inputs as the hardware does when fp32
    matmuls may run in reduced precision: to bf16 at "medium" (oneDNN on AMX CPUs), to TF32 (10-bit mantissa)
    at "high" (CUDA tensor cores); float32 accumulation. Other CPUs ignore the setting (this test machine
    computed bit-exact float32 at "medium"), so without the emulation the bug would not show here."""
    real_linear = F.linear

    def linear(x, w, b=None):
        prec = torch.get_float32_matmul_precision()
        if prec != "highest" and x.dtype == w.dtype == torch.float32:
            bits = 7 if prec == "medium" else 10
            x, w = _round_fp32(x, bits), _round_fp32(w, bits)
        return real_linear(x, w, b)

    monkeypatch.setattr(hc.F, "linear", linear)


def test_emulated_reduced_matmul(matmul_precision, emulate_reduced_matmul):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(8, 64, generator=g), torch.randn(32, 64, generator=g) * 0.02
    torch.testing.assert_close(F.linear(h, w), h @ w.T)
    for prec, dtype in (("medium", torch.bfloat16), ("high", None)):
        matmul_precision(prec)
        if dtype is not None:  # bf16 inputs, float32 accumulation
            torch.testing.assert_close(F.linear(h, w), h.to(dtype).float() @ w.to(dtype).float().T)
        w_grid = _round_fp32(w, 7)  # W on the bf16 grid, hence on TF32's: an eps below half the spacing is lost
        assert torch.equal(F.linear(h, w_grid * (1 + 2**-13)), F.linear(h, w_grid))


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("rho", [1e-4, 1e-3])
@pytest.mark.parametrize("matmul", ["emulated", "native"])
def test_first_order_ratio_fp32_reduced_matmul(matmul_precision, request, matmul, head, rho):
    """float32 weights with ``set_float32_matmul_precision("medium")``: eps must still act (r ~ 1).

    The weights are a bf16 checkpoint loaded in float32 (on the bf16 grid, as at step 0 of such a run). The
    fused ``H (W + eps)^T`` lost eps in the bf16-rounded matmul input: emulated r = 0.010 (rho 1e-4) and
    0.086 (1e-3), dense and chunked (TF32 at "high": 0.07 and 0.57). Weights off the grid dither the loss
    into r ~ 1 on average, with noise that grows as the head shrinks. Now float32 takes the split path
    of a half compute dtype. "native": this machine's own backend (bf16 on AMX CPUs; elsewhere exact).
    """
    if matmul == "emulated":
        request.getfixturevalue("emulate_reduced_matmul")
    hidden, lm_head, labels, loss_fn = head_problem(torch.float32)
    lm_head.weight.data = lm_head.weight.data.bfloat16().float()
    matmul_precision("medium")
    _, st = logits_sam(hidden, lm_head, labels, loss_fn, rho, **HEADS[head])
    st = {k: float(v) for k, v in st.items() if k != "clean"}
    r = first_order_ratio(st["loss_pre"], st["loss_post"], st["first_order"])
    assert abs(r - 1) < 0.05, r


def test_reduced_fp32_matmul_detection(matmul_precision):
    """The helper reads the global precision, the legacy CUDA flag and the new per-backend flags (torch >= 2.9,
    where ``get_float32_matmul_precision`` itself raises once the two APIs were mixed)."""
    assert not reduced_fp32_matmul() and not reduced_fp32_matmul("cuda") and not reduced_fp32_matmul("cpu")
    assert not split_compute(torch.float32, "cpu") and not split_compute(torch.float64, "cpu")
    assert split_compute(torch.bfloat16, "cpu") and split_compute(torch.float16, "cuda")
    for prec in ("high", "medium"):
        matmul_precision(prec)
        assert reduced_fp32_matmul() and reduced_fp32_matmul("cuda") and reduced_fp32_matmul(torch.device("cpu"))
        assert split_compute(torch.float32, "cpu") and not split_compute(torch.float64, "cpu")
        delta = torch.full((4, 3), 1e-7)
        assert isinstance(split_delta(delta, torch.float32), SplitDelta)
    matmul_precision("highest")
    assert not reduced_fp32_matmul("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True  # what TrainingArguments(tf32=True) does
    assert reduced_fp32_matmul("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    assert not reduced_fp32_matmul("cuda")
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # the torch >= 2.9 API
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert reduced_fp32_matmul("cuda") and not reduced_fp32_matmul("cpu")
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        assert reduced_fp32_matmul("cpu") and not reduced_fp32_matmul("cuda")
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    assert not reduced_fp32_matmul("cuda") and not reduced_fp32_matmul("cpu")


@pytest.mark.parametrize("head", list(HEADS))
def test_rho_zero_is_bit_identical_to_plain_under_reduced_fp32_matmul(matmul_precision, head):
    """The split path float32 takes under reduced-precision matmuls keeps rho = 0 exactly plain DPO (this
    machine's kernels; the emulation above rounds in forward only, so its dL/dH would differ by design)."""
    hidden, lm_head, labels, loss_fn = head_problem(torch.float32, vocab=1024, tokens=128)
    matmul_precision("medium")
    assert split_compute(torch.float32, hidden.device)
    plain = _grads(hidden, lm_head, labels, loss_fn, 0.0, head, None)
    h = hidden.detach().clone().requires_grad_()
    lm_head.zero_grad()
    loss, _ = logits_sam(h, lm_head, labels, loss_fn, 0.0, **HEADS[head])
    loss.backward()
    assert torch.equal(loss.detach(), plain[0])
    assert torch.equal(h.grad, plain[1]) and torch.equal(lm_head.weight.grad, plain[2])

"""logits-SAM against its definition (the naive in-place two-pass SAM), and the full-SAM baseline."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama

from logitsam.core import FullSAM, logits_sam, sam_perturbation, sequence_logps

B, T, V = 3, 12, 97
BETA = 0.1


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, V, (2 * B, T), generator=g)
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]  # position t predicts token t + 1
    labels[:, :4] = -100  # prompt
    labels[B - 1, 9:] = -100  # a shorter chosen response
    ref = -torch.rand(2 * B, generator=g) * 30  # fixed reference log-probs
    return input_ids, labels, ref


def dpo_loss_fn(ref):
    """Sigmoid DPO on per-row log-probs, written out here so this test does not depend on losses.py."""

    def loss_fn(out):
        logratio = out.logps - ref
        margin = logratio[:B] - logratio[B:]
        return -F.logsigmoid(BETA * margin).mean()

    return loss_fn


def hidden_of(model, input_ids):
    return model.model(input_ids=input_ids).last_hidden_state  # (R, T, d)


def naive_two_pass(model, input_ids, labels, loss_fn, rho):
    """The definition: grad at W, perturb W in place, full forward + backward again, restore W."""
    head = model.lm_head
    model.zero_grad()
    logits = model(input_ids=input_ids).logits.float()
    logp = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    logps = (logp * (labels != -100)).sum(-1)
    out = type("Out", (), {"logps": logps, "lengths": (labels != -100).sum(-1)})
    loss_fn(out).backward()
    g = head.weight.grad.detach().clone()
    saved = head.weight.detach().clone()
    with torch.no_grad():
        head.weight.add_(rho * g / g.norm())
    model.zero_grad()
    logits = model(input_ids=input_ids).logits.float()
    logp = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    out.logps = (logp * (labels != -100)).sum(-1)
    loss = loss_fn(out)
    loss.backward()
    with torch.no_grad():
        head.weight.copy_(saved)
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


CHUNKS = [dict(), dict(chunk_size=5), dict(chunk_size=1000, vocab_chunk_size=13)]


@pytest.mark.parametrize("chunks", CHUNKS)
def test_matches_naive_two_pass_untied(chunks):
    model = make_tiny_llama(vocab_size=V, tie=False)
    input_ids, labels, ref = batch()
    rho = 0.05
    loss_ref, grads_ref = naive_two_pass(model, input_ids, labels, dpo_loss_fn(ref), rho)

    model.zero_grad()
    loss, stats = logits_sam(hidden_of(model, input_ids), model.lm_head, labels, dpo_loss_fn(ref), rho, **chunks)
    loss.backward()
    stats = {k: float(v) for k, v in stats.items() if k != "clean"}
    torch.testing.assert_close(loss.detach(), loss_ref, atol=1e-6, rtol=1e-6)
    grads = grads_of(model)
    assert set(grads) == set(grads_ref)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], atol=1e-5, rtol=1e-5, msg=name)
    assert stats["loss_post"] == pytest.approx(float(loss_ref), abs=1e-6)
    assert stats["loss_post"] > stats["loss_pre"]  # an ascent step raises the loss
    assert stats["grad_norm"] > 0
    # the perturbation moved the loss by a first-order amount rho * ||g||
    assert stats["loss_post"] - stats["loss_pre"] == pytest.approx(rho * stats["grad_norm"], rel=0.05)


@pytest.mark.parametrize("chunks", CHUNKS)
def test_rho_zero_is_exactly_plain(chunks):
    model = make_tiny_llama(vocab_size=V, tie=True)
    input_ids, labels, ref = batch(1)
    loss_fn = dpo_loss_fn(ref)
    model.zero_grad()
    plain = loss_fn(sequence_logps(hidden_of(model, input_ids), model.lm_head, labels, **chunks))
    plain.backward()
    g_plain = grads_of(model)
    model.zero_grad()
    loss, stats = logits_sam(hidden_of(model, input_ids), model.lm_head, labels, loss_fn, 0.0, **chunks)
    loss.backward()
    assert torch.equal(loss, plain)
    assert stats["loss_pre"] == stats["loss_post"]
    for name, g in grads_of(model).items():
        assert torch.equal(g, g_plain[name]), name


@pytest.mark.parametrize("chunks", CHUNKS[:2])
def test_tied_embeddings_perturb_logit_path_only(chunks):
    """Tied: the shared weight's gradient = backbone part at W + head part at W + eps (logit-path eps).

    Expected values come from an untied twin (same numbers, separate head and embedding) run through
    the naive two-pass definition, whose head perturbation is the logit-path one by construction.
    """
    tied = make_tiny_llama(vocab_size=V, tie=True, seed=3)
    untied = make_tiny_llama(vocab_size=V, tie=False, seed=3)
    untied.load_state_dict(tied.state_dict(), strict=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(tied.model.embed_tokens.weight)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    input_ids, labels, ref = batch(2)
    loss_fn, rho = dpo_loss_fn(ref), 0.1
    loss_ref, g_ref = naive_two_pass(untied, input_ids, labels, loss_fn, rho)

    embed = tied.model.embed_tokens.weight
    before, version = embed.detach().clone(), embed._version
    tied.zero_grad()
    loss, _ = logits_sam(hidden_of(tied, input_ids), tied.lm_head, labels, loss_fn, rho, **chunks)
    loss.backward()
    assert embed._version == version and torch.equal(embed.detach(), before)  # nothing written in place
    torch.testing.assert_close(loss.detach(), loss_ref, atol=1e-6, rtol=1e-6)
    g = grads_of(tied)
    expected_shared = g_ref["model.embed_tokens.weight"] + g_ref["lm_head.weight"]
    torch.testing.assert_close(g["model.embed_tokens.weight"], expected_shared, atol=1e-5, rtol=1e-5)
    for name, value in g.items():
        if name != "model.embed_tokens.weight":
            torch.testing.assert_close(value, g_ref[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("chunks", CHUNKS[:2])
def test_bias_is_never_perturbed(chunks):
    torch.manual_seed(0)
    R, d = 2 * B, 8
    hidden = torch.randn(R, T, d, requires_grad=True)
    head = torch.nn.Linear(d, V, bias=True)
    with torch.no_grad():
        head.bias.normal_()
    _, labels, ref = batch(4)
    loss_fn, rho = dpo_loss_fn(ref), 0.2

    def functional_loss(w, b, h):
        logp = F.linear(h, w, b).log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
        out = type("Out", (), {"logps": (logp * (labels != -100)).sum(-1)})
        return loss_fn(out)

    w, b = head.weight.detach().requires_grad_(), head.bias.detach().requires_grad_()
    (g_w,) = torch.autograd.grad(functional_loss(w, b, hidden.detach()), [w])
    w_pert = (w + rho * g_w / g_w.norm()).detach().requires_grad_()
    expected = torch.autograd.grad(functional_loss(w_pert, b, hidden), [hidden, w_pert, b])

    loss, _ = logits_sam(hidden, head, labels, loss_fn, rho, **chunks)
    got = torch.autograd.grad(loss, [hidden, head.weight, head.bias])
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_sam_perturbation_variants_closed_form():
    g = torch.tensor([[3.0, -4.0], [0.0, 0.0]])
    w = torch.tensor([[2.0, 1.0], [-1.0, 5.0]])
    eps, n, _ = sam_perturbation(g, w, 0.5)
    assert float(n) == 5.0 and torch.allclose(eps, torch.tensor([[0.3, -0.4], [0.0, 0.0]]))
    # authors' adaptive: |W| g = [[6, -4], [0, 0]], norm sqrt(52)
    eps, n, _ = sam_perturbation(g, w, 0.5, variant="adaptive")
    assert float(n) == pytest.approx(52**0.5)
    assert torch.allclose(eps, 0.5 * torch.tensor([[6.0, -4.0], [0.0, 0.0]]) / 52**0.5)
    # true ASAM: W^2 g / || |W| g || = [[12, -4], [0, 0]] / sqrt(52)
    eps, n, _ = sam_perturbation(g, w, 0.5, variant="asam")
    assert torch.allclose(eps, 0.5 * torch.tensor([[12.0, -4.0], [0.0, 0.0]]) / 52**0.5)
    # a zero gradient gives a zero (finite) step
    eps, n, _ = sam_perturbation(torch.zeros(2, 2), w, 0.5)
    assert float(n) == 0.0 and torch.equal(eps, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="variant must be one of"):
        sam_perturbation(g, w, 0.5, variant="adaptive+asam")
    with pytest.raises(ValueError, match="norm must be one of"):
        sam_perturbation(g, w, 0.5, norm="per-layer")


def test_norm_accumulates_in_float32():
    g = torch.full((4096, 64), 0.01, dtype=torch.bfloat16)
    eps, n, _ = sam_perturbation(g, torch.ones_like(g), 1.0)
    assert n.dtype == torch.float32 and eps.dtype == torch.bfloat16
    expected = (g.double().square().sum()).sqrt()
    assert float(n) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("flag", ["adaptive", "asam"])
def test_adaptive_variants_match_naive(flag):
    """logits-SAM with adaptive/asam equals perturbing W by the closed-form eps and recomputing."""
    model = make_tiny_llama(vocab_size=V, tie=False, seed=5)
    input_ids, labels, ref = batch(5)
    loss_fn, rho = dpo_loss_fn(ref), 0.3
    W = model.lm_head.weight
    hidden = hidden_of(model, input_ids).detach()
    w0 = W.detach().requires_grad_()
    (g,) = torch.autograd.grad(loss_fn(sequence_logps(hidden, _Head(w0), labels)), [w0])
    a = W.detach().abs()
    direction = (a * g) if flag == "adaptive" else (a * a * g)
    eps = rho * direction / (a * g).norm()
    expected = loss_fn(sequence_logps(hidden, _Head(W.detach() + eps), labels))
    loss, _ = logits_sam(hidden, model.lm_head, labels, loss_fn, rho, variant=flag)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=1e-6)


class _Head(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight, self.bias = weight, None


def test_full_sam_matches_definition_and_restores_exactly():
    model = make_tiny_llama(vocab_size=V, tie=True, seed=7)
    input_ids, labels, ref = batch(7)
    loss_fn, rho = dpo_loss_fn(ref), 0.05

    def loss_of(params):
        logits = torch.func.functional_call(model, params, (input_ids,)).logits
        logp = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
        return loss_fn(type("Out", (), {"logps": (logp * (labels != -100)).sum(-1)}))

    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    grads = torch.autograd.grad(loss_of(params), list(params.values()))
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    perturbed = {
        n: (p + rho * g / norm).detach().requires_grad_() for (n, p), g in zip(params.items(), grads, strict=True)
    }
    expected = dict(zip(params, torch.autograd.grad(loss_of(perturbed), list(perturbed.values())), strict=True))

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sam = FullSAM(model.parameters(), rho)
    model.zero_grad()
    loss_of(dict(model.named_parameters())).backward()
    used = sam.first_step()
    assert used == pytest.approx(float(norm), rel=1e-6)
    model.zero_grad()
    loss_of(dict(model.named_parameters())).backward()
    sam.second_step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n  # restored bit for bit
        torch.testing.assert_close(p.grad, expected[n], atol=1e-5, rtol=1e-5, msg=n)
    with pytest.raises(RuntimeError, match="backward"):
        FullSAM([torch.nn.Parameter(torch.ones(2))], rho).first_step()


@pytest.mark.parametrize("variant", ["plain", "adaptive", "asam"])
def test_full_sam_variants_mean_what_logits_sam_means(variant):
    """FullSAM's eps over all parameters follows the same closed forms as logits-SAM's (one helper)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    grads = [torch.randn(3, 2), torch.randn(4)]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    before = [p.detach().clone() for p in params]
    rho = 0.2
    scaled = [g if variant == "plain" else p.abs() * g for p, g in zip(before, grads, strict=True)]
    norm = torch.sqrt(sum(s.square().sum() for s in scaled))
    direction = [s * p.abs() if variant == "asam" else s for p, s in zip(before, scaled, strict=True)]
    used = FullSAM(params, rho, variant=variant)
    assert used.first_step() == pytest.approx(float(norm), rel=1e-6)
    for p, b, d in zip(params, before, direction, strict=True):
        torch.testing.assert_close(p.detach() - b, rho * d / norm, atol=1e-6, rtol=1e-5)
    used.second_step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize(("chunks", "dtype"), [({}, torch.bfloat16), ({"chunk_size": 4, "vocab_chunk_size": 16},
                                                                     torch.float32),
                                               ({"chunk_size": 4, "vocab_chunk_size": 16}, torch.bfloat16)])
def test_perturbed_head_releases_eps_in_its_backward(chunks, dtype):
    """eps (V, d) is freed as the head's backward ends, not when the graph is: so a second backward through the
    perturbed head is refused with a clear message instead of reading a released (or donated) buffer. (The dense
    fp32 head is plain autograd of ``H (W + eps)^T``, the reference: it keeps W + eps like any graph.)"""
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 8, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(8, 40, bias=False, dtype=dtype)
    labels = torch.randint(0, 40, (2, 6))
    labels[:, :2] = -100

    def loss_fn(out):
        return -out.logps.mean()

    loss, _ = logits_sam(hidden, head, labels, loss_fn, 0.1, **chunks)
    loss.backward(retain_graph=True)
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        loss.backward()

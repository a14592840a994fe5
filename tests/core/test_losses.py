"""Golden values, gradients and errors for logitsam.core.losses.

Every golden test works on the same three pairs (float64, beta = 0.5 unless stated):

    policy_chosen_logps   PC = [-1.0, -2.0, -3.0]     chosen_lengths   LC = [2, 4, 5]
    policy_rejected_logps PR = [-2.0, -1.5, -4.0]     rejected_lengths LR = [3, 1, 4]
    ref_chosen_logps      RC = [-1.5, -1.8, -2.0]
    ref_rejected_logps    RR = [-1.0, -2.0, -3.5]

    h_w = PC - RC = [0.5, -0.2, -1.0]    h_l = PR - RR = [-1.0, 0.5, -0.5]
    delta = h_w - h_l = [1.5, -0.7, -0.5]

The expected values are recomputed below with ``math`` on plain floats (never with the code under
test), and the rounded numbers in each docstring are checked too.
"""

from __future__ import annotations

import inspect
import math
import re
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

import logitsam.losses as public
from logitsam.core import losses as L
from logitsam.core.losses import LOSS_TYPES, REFERENCE_FREE, preference_loss, requires_lengths, requires_reference

PC = [-1.0, -2.0, -3.0]
PR = [-2.0, -1.5, -4.0]
RC = [-1.5, -1.8, -2.0]
RR = [-1.0, -2.0, -3.5]
LC = [2, 4, 5]
LR = [3, 1, 4]
BETA = 0.5
H_W = [p - r for p, r in zip(PC, RC, strict=True)]
H_L = [p - r for p, r in zip(PR, RR, strict=True)]
DELTA = [w - l for w, l in zip(H_W, H_L, strict=True)]


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(xs, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64, requires_grad=requires_grad)


def run(loss_type, beta=BETA, **params):
    return preference_loss(
        loss_type,
        t(PC),
        t(PR),
        t(RC),
        t(RR),
        beta=beta,
        chosen_lengths=torch.tensor(LC),
        rejected_lengths=torch.tensor(LR),
        **params,
    )


def check(losses: torch.Tensor, expected: list[float], rounded: list[float] | None = None) -> None:
    assert losses.shape == (len(expected),)
    torch.testing.assert_close(losses, t(expected), rtol=0, atol=1e-6)
    if rounded is not None:
        torch.testing.assert_close(losses, t(rounded), rtol=0, atol=6e-5)


def check_ref_rewards(out, beta=BETA) -> None:
    _, chosen, rejected = out
    torch.testing.assert_close(chosen, t([beta * h for h in H_W]), rtol=0, atol=1e-12)
    torch.testing.assert_close(rejected, t([beta * h for h in H_L]), rtol=0, atol=1e-12)


def smoothed(z: float, ls: float) -> float:
    return -(1 - ls) * logsig(z) - ls * logsig(-z)


# ------------------------------------------------------------------------------------------------
# Golden values: TRL DPOTrainer losses


def test_sigmoid_golden():
    """-log sigma(0.5 * [1.5, -0.7, -0.5]) = -log sigma([0.75, -0.35, -0.25]) = [0.3869, 0.8834, 0.8259].

    Rewards are beta * h: chosen [0.25, -0.1, -0.5], rejected [-0.5, 0.25, -0.25].
    """
    out = run("sigmoid")
    check(out[0], [-logsig(BETA * d) for d in DELTA], [0.3869, 0.8834, 0.8259])
    check_ref_rewards(out)
    check(out[1], [0.25, -0.1, -0.5])


def test_cdpo_golden():
    """ls = 0.1: -0.9 log sigma(z) - 0.1 log sigma(-z), z = [0.75, -0.35, -0.25] -> [0.4619, 0.8484, 0.8009].

    ls = 0 is the sigmoid loss; sigmoid itself takes no label_smoothing (TRL 1.x's sigmoid reads none).
    """
    out = run("cdpo", label_smoothing=0.1)
    check(out[0], [smoothed(BETA * d, 0.1) for d in DELTA], [0.4619, 0.8484, 0.8009])
    check_ref_rewards(out)
    check(run("cdpo")[0], run("sigmoid")[0].tolist())
    with pytest.raises(TypeError, match=r"\['label_smoothing'\] for loss_type \['sigmoid'\]"):
        run("sigmoid", label_smoothing=0.1)


def test_hinge_golden():
    """beta = 0.5: max(0, 1 - [0.75, -0.35, -0.25]) = [0.25, 1.35, 1.25].

    beta = 1: max(0, 1 - [1.5, -0.7, -0.5]) = [0, 1.7, 1.5] (the first pair is past the margin).
    """
    out = run("hinge")
    check(out[0], [max(0.0, 1 - BETA * d) for d in DELTA], [0.25, 1.35, 1.25])
    check_ref_rewards(out)
    check(run("hinge", beta=1.0)[0], [max(0.0, 1 - d) for d in DELTA], [0.0, 1.7, 1.5])


def test_ipo_golden():
    """Per-token margin D = h_w / LC - h_l / LR = [0.25 + 1/3, -0.05 - 0.5, -0.2 + 0.125]
    = [0.5833, -0.55, -0.075]; loss = (D - 1/(2*0.5))^2 = (D - 1)^2 = [0.1736, 2.4025, 1.1556].
    """
    D = [w / lc - l / lr for w, l, lc, lr in zip(H_W, H_L, LC, LR, strict=True)]
    out = run("ipo")
    check(out[0], [(x - 1 / (2 * BETA)) ** 2 for x in D], [0.1736, 2.4025, 1.1556])
    check_ref_rewards(out)


@pytest.mark.parametrize(("eps", "rounded"), [(1e-3, [1.5893, 3.3746, 3.1984]), (0.1, [0.1828, 0.7162, 0.6552])])
def test_exo_pair_golden(eps, rounded):
    """z = [0.75, -0.35, -0.25]; loss = s(z)(log s(z) - log(1-eps)) + s(-z)(log s(-z) - log eps).

    eps = 1e-3 (the paper's): [1.5893, 3.3746, 3.1984]; eps = 0.1: [0.1828, 0.7162, 0.6552]. There is no
    default: TRL's 0.0 is refused, as TRL refuses it.
    """
    expected = [
        sig(BETA * d) * (logsig(BETA * d) - math.log(1 - eps)) + sig(-BETA * d) * (logsig(-BETA * d) - math.log(eps))
        for d in DELTA
    ]
    out = run("exo_pair", label_smoothing=eps)
    check(out[0], expected, rounded)
    check_ref_rewards(out)
    with pytest.raises(ValueError, match=r"exo_pair.*0 < label_smoothing < 1"):
        run("exo_pair")


def test_nca_pair_golden():
    """r_w = 0.5 h_w = [0.25, -0.1, -0.5], r_l = 0.5 h_l = [-0.5, 0.25, -0.25];
    loss = -log s(r_w) - 0.5 log s(-r_w) - 0.5 log s(-r_l) = [1.2259, 1.4796, 1.4991].
    """
    expected = [
        -logsig(BETA * w) - 0.5 * logsig(-BETA * w) - 0.5 * logsig(-BETA * l) for w, l in zip(H_W, H_L, strict=True)
    ]
    out = run("nca_pair")
    check(out[0], expected, [1.2259, 1.4796, 1.4991])
    check_ref_rewards(out)


def test_robust_golden():
    """ls = 0.1, z = [0.75, -0.35, -0.25]: (-(0.9) log s(z) + 0.1 log s(-z)) / 0.8 = [0.2931, 0.9271, 0.8572].

    ls = 0 is the plain sigmoid loss.
    """
    out = run("robust", label_smoothing=0.1)
    check(out[0], [(-0.9 * logsig(BETA * d) + 0.1 * logsig(-BETA * d)) / 0.8 for d in DELTA], [0.2931, 0.9271, 0.8572])
    check_ref_rewards(out)
    check(run("robust")[0], [-logsig(BETA * d) for d in DELTA])


@pytest.mark.parametrize(("shift", "rounded"), [(0.0, [1.05, 1.5703, 1.55]), (0.3, [1.0896, 1.5815, 1.6266])])
def test_bco_pair_golden(shift, rounded):
    """loss = -log s(0.5 h_w - delta0) - log s(-(0.5 h_l - delta0)).

    delta0 = 0 (TRL 1.x): [1.0500, 1.5703, 1.5500]; delta0 = 0.3: [1.0896, 1.5815, 1.6266].
    """
    expected = [-logsig(BETA * w - shift) - logsig(-(BETA * l - shift)) for w, l in zip(H_W, H_L, strict=True)]
    out = run("bco_pair", bco_delta=shift)
    check(out[0], expected, rounded)
    check_ref_rewards(out)


def test_sppo_hard_golden():
    """1/(2 beta) = 1: (h_w - 1)^2 + (h_l + 1)^2 = [0.25 + 0, 1.44 + 2.25, 4 + 0.25] = [0.25, 3.69, 4.25]."""
    out = run("sppo_hard")
    check(
        out[0],
        [(w - 0.5 / BETA) ** 2 + (l + 0.5 / BETA) ** 2 for w, l in zip(H_W, H_L, strict=True)],
        [0.25, 3.69, 4.25],
    )
    check_ref_rewards(out)


@pytest.mark.parametrize(("ls", "rounded"), [(0.0, [0.6931, 0.5130, 0.8259]), (0.1, [0.6931, 0.5530, 0.8009])])
def test_aot_golden(ls, rounded):
    """sort(PC - PR) = sort([1.0, -0.5, 1.0]) = [-0.5, 1.0, 1.0];
    sort(RC - RR) = sort([-0.5, 0.2, 1.5]) = [-0.5, 0.2, 1.5]; d = [0.0, 0.8, -0.5].

    loss = smoothed logistic of 0.5 d: ls = 0 -> [0.6931, 0.5130, 0.8259]; ls = 0.1 -> [0.6931, 0.5530, 0.8009].
    Without the sort, d would be delta = [1.5, -0.7, -0.5].
    """
    pol = sorted(p - r for p, r in zip(PC, PR, strict=True))
    ref = sorted(p - r for p, r in zip(RC, RR, strict=True))
    out = run("aot", label_smoothing=ls)
    check(out[0], [smoothed(BETA * (a - b), ls) for a, b in zip(pol, ref, strict=True)], rounded)
    check_ref_rewards(out)


@pytest.mark.parametrize(("ls", "rounded"), [(0.0, [0.6931, 0.6210, 0.6931]), (0.1, [0.6931, 0.6360, 0.6931])])
def test_aot_unpaired_golden(ls, rounded):
    """sort(h_w) = [-1.0, -0.2, 0.5], sort(h_l) = [-1.0, -0.5, 0.5]; d = [0.0, 0.3, 0.0].

    ls = 0 -> [0.6931, 0.6210, 0.6931]; ls = 0.1 -> [0.6931, 0.6360, 0.6931].
    """
    d = [a - b for a, b in zip(sorted(H_W), sorted(H_L), strict=True)]
    out = run("aot_unpaired", label_smoothing=ls)
    check(out[0], [smoothed(BETA * x, ls) for x in d], rounded)
    check_ref_rewards(out)


def test_apo_zero_golden():
    """1 - s(0.5 h_w) + s(0.5 h_l) = 1 - s([0.25, -0.1, -0.5]) + s([-0.5, 0.25, -0.25])
    = [0.8154, 1.0872, 1.0603].
    """
    out = run("apo_zero")
    check(out[0], [1 - sig(BETA * w) + sig(BETA * l) for w, l in zip(H_W, H_L, strict=True)], [0.8154, 1.0872, 1.0603])
    check_ref_rewards(out)


def test_apo_down_golden():
    """s(0.5 h_w) + 1 - s(0.5 delta) = s([0.25, -0.1, -0.5]) + 1 - s([0.75, -0.35, -0.25])
    = [0.8830, 1.0616, 0.9397].
    """
    out = run("apo_down")
    check(
        out[0], [sig(BETA * w) + 1 - sig(BETA * d) for w, d in zip(H_W, DELTA, strict=True)], [0.8830, 1.0616, 0.9397]
    )
    check_ref_rewards(out)


@pytest.mark.parametrize(("tau", "rounded"), [(0.05, [0.4724, 0.8839, 0.8290]), (0.5, [0.4568, 1.0611, 0.9989])])
def test_discopop_golden(tau, rounded):
    """z = [0.75, -0.35, -0.25], m = s(z / tau); loss = (1 - m)(-log s(z)) + m exp(-z).

    tau = 0.05 (default): m = s([15, -7, -5]) -> [0.4724, 0.8839, 0.8290];
    tau = 0.5: m = s([1.5, -0.7, -0.5]) -> [0.4568, 1.0611, 0.9989].
    """
    expected = []
    for d in DELTA:
        z = BETA * d
        m = sig(z / tau)
        expected.append((1 - m) * -logsig(z) + m * math.exp(-z))
    out = run("discopop", discopop_tau=tau)
    check(out[0], expected, rounded)
    check_ref_rewards(out)


def test_sigmoid_norm_golden():
    """D = h_w / LC - h_l / LR = [0.5833, -0.55, -0.075]; -log s(0.5 D) = [0.5579, 0.8401, 0.7121]."""
    D = [w / lc - l / lr for w, l, lc, lr in zip(H_W, H_L, LC, LR, strict=True)]
    out = run("sigmoid_norm")
    check(out[0], [-logsig(BETA * x) for x in D], [0.5579, 0.8401, 0.7121])
    check_ref_rewards(out)


def test_sft_golden():
    """Token mean over the batch: -(PC summed) / (LC summed) = 6 / 11 = 0.5455, the same for every pair.

    The rewards are TRL's beta * h (chosen [0.25, -0.1, -0.5]), so sft needs the reference as in TRL.
    """
    out = run("sft")
    check(out[0], [6 / 11] * 3, [0.5455] * 3)
    check_ref_rewards(out)
    with pytest.raises(ValueError, match=r"loss_type='sft' is reference-based"):
        preference_loss("sft", t(PC), t(PR), chosen_lengths=torch.tensor(LC), beta=BETA)


# ------------------------------------------------------------------------------------------------
# Golden values: reference-free losses


def test_slic_golden():
    """delta = 0.8, lambda = 0.5: max(0, 0.8 - PC + PR) - 0.5 PC / LC
    = max(0, [-0.2, 1.3, -0.2]) + [0.25, 0.25, 0.3] = [0.25, 1.55, 0.3]. Rewards beta * logps.
    """
    out = preference_loss(
        "slic", t(PC), t(PR), chosen_lengths=torch.tensor(LC), beta=BETA, slic_delta=0.8, slic_lambda=0.5
    )
    expected = [max(0.0, 0.8 - p + q) - 0.5 * p / lc for p, q, lc in zip(PC, PR, LC, strict=True)]
    check(out[0], expected, [0.25, 1.55, 0.3])
    check(out[1], [BETA * p for p in PC])
    check(out[2], [BETA * p for p in PR])


@pytest.mark.parametrize(("ls", "rounded"), [(0.0, [0.7241, 1.0759, 0.7741]), (0.1, [0.7741, 1.0509, 0.8241])])
def test_cpo_golden(ls, rounded):
    """z = 0.5 (PC - PR) = [0.5, -0.25, 0.5]; alpha = 0.5, NLL = -PC / LC = [0.5, 0.5, 0.6].

    loss = -(1 - ls) log s(z) - ls log s(-z) + 0.5 NLL: ls = 0 -> [0.7241, 1.0759, 0.7741];
    ls = 0.1 -> [0.7741, 1.0509, 0.8241]. Rewards beta * logps.
    """
    out = preference_loss(
        "cpo", t(PC), t(PR), chosen_lengths=torch.tensor(LC), beta=BETA, cpo_alpha=0.5, label_smoothing=ls
    )
    expected = [smoothed(BETA * (p - q), ls) - 0.5 * p / lc for p, q, lc in zip(PC, PR, LC, strict=True)]
    check(out[0], expected, rounded)
    check(out[1], [BETA * p for p in PC])
    check(out[2], [BETA * p for p in PR])


@pytest.mark.parametrize(("ls", "rounded"), [(0.0, [0.8073, 0.5981, 0.7444]), (0.1, [0.7857, 0.6181, 0.7344])])
def test_simpo_golden(ls, rounded):
    """PC / LC = [-0.5, -0.5, -0.6], PR / LR = [-0.6667, -1.5, -1.0]; gamma = 0.3:
    z = 0.5 (PC/LC - PR/LR) - 0.3 = [-0.2167, 0.2, -0.1].

    ls = 0 -> -log s(z) = [0.8073, 0.5981, 0.7444]; ls = 0.1 -> [0.7857, 0.6181, 0.7344].
    Rewards are 0.5 * PC / LC = [-0.25, -0.25, -0.3] and 0.5 * PR / LR = [-0.3333, -0.75, -0.5].
    """
    out = preference_loss(
        "simpo",
        t(PC),
        t(PR),
        beta=BETA,
        chosen_lengths=torch.tensor(LC),
        rejected_lengths=torch.tensor(LR),
        simpo_gamma=0.3,
        label_smoothing=ls,
    )
    z = [BETA * (p / lc - q / lr) - 0.3 for p, q, lc, lr in zip(PC, PR, LC, LR, strict=True)]
    check(out[0], [smoothed(x, ls) for x in z], rounded)
    check(out[1], [BETA * p / lc for p, lc in zip(PC, LC, strict=True)], [-0.25, -0.25, -0.3])
    check(out[2], [BETA * q / lr for q, lr in zip(PR, LR, strict=True)], [-1 / 3, -0.75, -0.5])


def test_orpo_golden():
    """a = PC / LC = [-0.5, -0.5, -0.6], b = PR / LR = [-0.6667, -1.5, -1.0];
    log odds = (a - b) - (log(1 - e^a) - log(1 - e^b)) = [0.3791, 1.6803, 0.7372];
    loss = -a - 0.5 log s(log odds) = [0.7607, 0.5854, 0.7955]. Rewards 0.5 a and 0.5 b.
    """
    a = [p / lc for p, lc in zip(PC, LC, strict=True)]
    b = [q / lr for q, lr in zip(PR, LR, strict=True)]
    log_odds = [(x - y) - (math.log(1 - math.exp(x)) - math.log(1 - math.exp(y))) for x, y in zip(a, b, strict=True)]
    out = run("orpo")
    check(out[0], [-x - BETA * logsig(o) for x, o in zip(a, log_odds, strict=True)], [0.7607, 0.5854, 0.7955])
    check(out[1], [BETA * x for x in a])
    check(out[2], [BETA * y for y in b])


def test_orpo_is_finite_at_extreme_logps():
    """log(1 - e^x) must not blow up for per-token means near 0 or very negative."""
    pc = t([-1e-20, -400.0], requires_grad=True)  # exp(-1e-20) == 1.0: only expm1 keeps log(1 - e^x) finite
    pr = t([-300.0, -2e-6], requires_grad=True)
    losses, _, _ = L.orpo_loss(pc, pr, torch.tensor([1, 4]), torch.tensor([3, 1]), beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


# ------------------------------------------------------------------------------------------------
# Gradients


def _grads(loss_type, beta=BETA, **params):
    pc, pr = t(PC, True), t(PR, True)
    losses, _, _ = preference_loss(
        loss_type,
        pc,
        pr,
        t(RC),
        t(RR),
        beta=beta,
        chosen_lengths=torch.tensor(LC),
        rejected_lengths=torch.tensor(LR),
        **params,
    )
    losses.sum().backward()
    return pc.grad, pr.grad


@pytest.mark.parametrize(("name", "ls"), [("sigmoid", None), ("cdpo", 0.0), ("cdpo", 0.2)])
def test_sigmoid_and_cdpo_gradient_closed_form(name, ls):
    """d/dPC [-(1-ls) log s(b d) - ls log s(-b d)] = -b (1-ls) s(-b d) + b ls s(b d); d/dPR is its negative."""
    g_pc, g_pr = _grads(name, **({} if ls is None else {"label_smoothing": ls}))
    ls = ls or 0.0
    expected = [-BETA * (1 - ls) * sig(-BETA * d) + BETA * ls * sig(BETA * d) for d in DELTA]
    check(g_pc, expected)
    check(g_pr, [-x for x in expected])


def test_ipo_gradient_closed_form():
    """d/dPC (D - 1/(2b))^2 = 2 (D - 1/(2b)) / LC; d/dPR = -2 (D - 1/(2b)) / LR."""
    D = [w / lc - l / lr for w, l, lc, lr in zip(H_W, H_L, LC, LR, strict=True)]
    g_pc, g_pr = _grads("ipo")
    check(g_pc, [2 * (x - 1 / (2 * BETA)) / lc for x, lc in zip(D, LC, strict=True)])
    check(g_pr, [-2 * (x - 1 / (2 * BETA)) / lr for x, lr in zip(D, LR, strict=True)])


def test_hinge_gradient_closed_form():
    """beta = 1: 1 - delta = [-0.5, 1.7, 1.5], so d/dPC = [0, -1, -1] and d/dPR = [0, 1, 1]."""
    g_pc, g_pr = _grads("hinge", beta=1.0)
    check(g_pc, [0.0, -1.0, -1.0])
    check(g_pr, [0.0, 1.0, 1.0])


def test_simpo_gradient_closed_form():
    """z = b (PC/LC - PR/LR) - gamma: d/dPC = -s(-z) b / LC, d/dPR = s(-z) b / LR."""
    g_pc, g_pr = _grads("simpo", simpo_gamma=0.3)
    z = [BETA * (p / lc - q / lr) - 0.3 for p, q, lc, lr in zip(PC, PR, LC, LR, strict=True)]
    check(g_pc, [-sig(-x) * BETA / lc for x, lc in zip(z, LC, strict=True)])
    check(g_pr, [sig(-x) * BETA / lr for x, lr in zip(z, LR, strict=True)])


def test_cpo_gradient_closed_form():
    """z = b (PC - PR): d/dPC = -b s(-z) - alpha / LC (the NLL part is -alpha / LC), d/dPR = b s(-z)."""
    g_pc, g_pr = _grads("cpo", cpo_alpha=0.7)
    z = [BETA * (p - q) for p, q in zip(PC, PR, strict=True)]
    check(g_pc, [-BETA * sig(-x) - 0.7 / lc for x, lc in zip(z, LC, strict=True)])
    check(g_pr, [BETA * sig(-x) for x in z])
    g_pc_nll, g_pr_nll = _grads("cpo", cpo_alpha=0.7, beta=0.0)
    check(g_pc_nll, [-0.7 / lc for lc in LC])
    check(g_pr_nll, [0.0, 0.0, 0.0])


def test_orpo_gradient_finite_differences():
    """torch.autograd.gradcheck compares the analytic gradient with central finite differences."""
    lengths_c, lengths_r = torch.tensor(LC), torch.tensor(LR)

    def f(pc, pr):
        return L.orpo_loss(pc, pr, lengths_c, lengths_r, beta=0.3)[0]

    assert torch.autograd.gradcheck(f, (t(PC, True), t(PR, True)), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(LOSS_TYPES))
def test_every_loss_gradcheck_and_detached_rewards(name):
    """Every loss is differentiable in the policy log-probs (finite differences agree), rewards are not."""
    gen = torch.Generator().manual_seed(0)
    pc = (-1 - 3 * torch.rand(5, generator=gen, dtype=torch.float64)).requires_grad_()
    pr = (-1 - 3 * torch.rand(5, generator=gen, dtype=torch.float64)).requires_grad_()
    rc = -1 - 3 * torch.rand(5, generator=gen, dtype=torch.float64)
    rr = -1 - 3 * torch.rand(5, generator=gen, dtype=torch.float64)
    lc, lr = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([5, 1, 2, 7, 3])
    params = {"label_smoothing": 0.05} if name in ("exo_pair", "cdpo") else {}

    def f(a, b):
        return preference_loss(name, a, b, rc, rr, beta=0.7, chosen_lengths=lc, rejected_lengths=lr, **params)[0]

    assert torch.autograd.gradcheck(f, (pc, pr), eps=1e-6, atol=1e-6)
    _, chosen, rejected = preference_loss(name, pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **params)
    assert not chosen.requires_grad and not rejected.requires_grad


# ------------------------------------------------------------------------------------------------
# Dispatcher: multi-loss, routing, table


def test_multi_loss_is_weighted_sum_of_single_losses():
    """TRL 1.x: loss = sum_k w_k mean(loss_k); per pair: sum_k w_k loss_k. Rewards come from the first."""
    weights = [0.8, 0.2, 1.0]
    combined = run(["sigmoid", "sft", "ipo"], loss_weights=weights)
    singles = [run(name)[0] for name in ("sigmoid", "sft", "ipo")]
    torch.testing.assert_close(combined[0], sum(w * s for w, s in zip(weights, singles, strict=True)))
    check_ref_rewards(combined)

    unweighted = run(["simpo", "sigmoid"], label_smoothing=0.1, simpo_gamma=0.3)  # sigmoid does not read it
    expected = run("simpo", label_smoothing=0.1, simpo_gamma=0.3)[0] + run("sigmoid")[0]
    torch.testing.assert_close(unweighted[0], expected)
    torch.testing.assert_close(unweighted[1], run("simpo", simpo_gamma=0.3)[1])  # simpo's rewards: listed first


@pytest.mark.parametrize("name", list(LOSS_TYPES))
def test_dispatcher_routes_to_the_named_function(name):
    params = {"label_smoothing": 0.1} if name in ("exo_pair", "cdpo") else {}
    via_name = run(name, **params)
    fn = LOSS_TYPES[name]
    kwargs = {
        "policy_chosen_logps": t(PC),
        "policy_rejected_logps": t(PR),
        "ref_chosen_logps": t(RC),
        "ref_rejected_logps": t(RR),
        "chosen_lengths": torch.tensor(LC),
        "rejected_lengths": torch.tensor(LR),
    }
    accepted = inspect.signature(fn).parameters
    direct = fn(**{k: v for k, v in kwargs.items() if k in accepted}, beta=BETA, **params)
    for a, b in zip(via_name, direct, strict=True):
        torch.testing.assert_close(a, b)


def test_trl_names_and_reference_free_set():
    trl = [
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    ]  # fmt: skip
    assert list(LOSS_TYPES)[: len(trl)] == trl
    assert set(LOSS_TYPES) == set(trl) | {"cdpo", "slic", "cpo", "simpo", "orpo"}
    assert REFERENCE_FREE == {"simpo", "cpo", "orpo", "slic"}


def test_requires_reference_and_lengths():
    assert requires_reference("sigmoid") and requires_reference("aot")
    assert not requires_reference("simpo") and requires_reference("sft") and requires_reference("cdpo")
    assert requires_reference(["simpo", "sigmoid"]) and not requires_reference(["cpo", "orpo"])
    assert requires_lengths("ipo") and requires_lengths("sigmoid_norm") and requires_lengths("orpo")
    assert requires_lengths("sft") and requires_lengths("cpo") and requires_lengths("slic")
    assert not requires_lengths("sigmoid") and not requires_lengths("hinge")
    assert requires_lengths(["sigmoid", "ipo"]) and not requires_lengths(["sigmoid", "hinge"])
    with pytest.raises(ValueError, match="Did you mean 'simpo'"):
        requires_reference("simppo")


def test_reference_free_losses_run_without_reference():
    for name in sorted(REFERENCE_FREE):
        losses, _, _ = preference_loss(
            name, t(PC), t(PR), chosen_lengths=torch.tensor(LC), rejected_lengths=torch.tensor(LR)
        )
        assert torch.isfinite(losses).all()


def test_lengths_are_clamped_at_one_and_cast():
    """TRL clamps the completion token count at 1; integer lengths are cast to the log-prob dtype."""
    zero = preference_loss("sigmoid_norm", t(PC), t(PR), t(RC), t(RR), chosen_lengths=torch.tensor([0, 0, 0]),
                           rejected_lengths=torch.tensor([1, 1, 1]))  # fmt: skip
    one = preference_loss("sigmoid_norm", t(PC), t(PR), t(RC), t(RR), chosen_lengths=torch.ones(3),
                          rejected_lengths=torch.ones(3))  # fmt: skip
    torch.testing.assert_close(zero[0], one[0])
    f32 = preference_loss("ipo", t(PC).float(), t(PR).float(), t(RC).float(), t(RR).float(),
                          chosen_lengths=torch.tensor(LC), rejected_lengths=torch.tensor(LR))  # fmt: skip
    assert f32[0].dtype == torch.float32


def test_table_makes_the_public_functions():
    """Each row of LOSS_SPECS is a public function with a real signature and a docstring built from the row."""
    for name, spec in L.LOSS_SPECS.items():
        fn = LOSS_TYPES[name]
        assert fn is getattr(L, f"{name}_loss") is getattr(public, f"{name}_loss") and fn.__name__ == f"{name}_loss"
        params = inspect.signature(fn).parameters
        assert ("ref_chosen_logps" in params) == spec.ref == (name not in REFERENCE_FREE)
        assert [p for p in params if p.endswith("_lengths")] == ["chosen_lengths", "rejected_lengths"][: spec.lengths]
        assert {k: params[k].default for k in spec.params} == spec.params and params["beta"].default == 0.1
        assert all(line.strip() in fn.__doc__ for line in spec.math.splitlines()) and spec.cite in fn.__doc__
    assert torch.isfinite(L.orpo_loss(t(PC), t(PR), torch.tensor(LC), torch.tensor(LR), beta=0.3)[0]).all()
    with pytest.raises(TypeError, match=r"sigmoid_loss\(\): .*label_smoothing"):
        L.sigmoid_loss(t(PC), t(PR), t(RC), t(RR), label_smoothing=0.1)
    with pytest.raises(TypeError, match=r"hinge_loss\(\): too many positional"):
        L.hinge_loss(t(PC), t(PR), t(RC), t(RR), 0.5)  # beta is keyword-only


def test_public_module_reexports_core():
    assert public.preference_loss is preference_loss
    assert public.LOSS_TYPES is LOSS_TYPES
    assert public.REFERENCE_FREE is REFERENCE_FREE
    assert set(public.__all__) >= {"preference_loss", "requires_reference", "requires_lengths"}


# ------------------------------------------------------------------------------------------------
# Errors


def test_unknown_loss_type_suggests_and_lists():
    with pytest.raises(ValueError, match=r"unknown loss_type 'sigmod'\. Did you mean 'sigmoid'\?") as info:
        run("sigmod")
    assert "'apo_zero'" in str(info.value) and "'orpo'" in str(info.value)
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'"):
        run(["sigmoid", "dpo"])
    with pytest.raises(ValueError, match="at least one"):
        run([])


def test_missing_reference_is_a_clear_error():
    with pytest.raises(ValueError, match=r"loss_type='sigmoid' is reference-based.*ref_chosen_logps"):
        preference_loss("sigmoid", t(PC), t(PR))
    with pytest.raises(ValueError, match=r"loss_type='apo_down' is reference-based"):
        L.apo_down_loss(t(PC), t(PR), None, t(RR))
    with pytest.raises(ValueError, match=r"'ipo' is reference-based"):
        preference_loss(["simpo", "ipo"], t(PC), t(PR), chosen_lengths=t(LC), rejected_lengths=t(LR))


def test_missing_lengths_is_a_clear_error():
    with pytest.raises(ValueError, match=r"loss_type='simpo' needs chosen_lengths"):
        preference_loss("simpo", t(PC), t(PR))
    with pytest.raises(ValueError, match=r"loss_type='ipo' needs rejected_lengths"):
        preference_loss("ipo", t(PC), t(PR), t(RC), t(RR), chosen_lengths=t(LC))
    with pytest.raises(ValueError, match=r"loss_type='sft' needs chosen_lengths"):
        preference_loss(["sigmoid", "sft"], t(PC), t(PR), t(RC), t(RR))


def test_unknown_params_raise_type_error():
    with pytest.raises(TypeError, match=r"\['label_smoothin'\].*Did you mean 'label_smoothing'"):
        run("robust", label_smoothin=0.1)
    with pytest.raises(TypeError, match=r"\['label_smoothing'\] for loss_type \['hinge'\]"):
        run("hinge", label_smoothing=0.1)
    with pytest.raises(TypeError, match="simpo_gamma"):
        run(["sigmoid", "ipo"], simpo_gamma=0.5)


def test_bad_weights_and_bad_smoothing():
    with pytest.raises(ValueError, match="loss_weights has 1 entries for 2 loss types"):
        run(["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match=r"exo_pair.*0 < label_smoothing < 1"):
        run("exo_pair", label_smoothing=0.0)
    with pytest.raises(ValueError, match=r"robust.*0 <= label_smoothing < 0.5"):
        run("robust", label_smoothing=0.5)


# ------------------------------------------------------------------------------------------------
# Against TRL 1.16's own loss code: each branch of DPOTrainer._compute_loss, cut from the installed
# source and run on the same numbers (the branches need no model; the trainer around them does)


DPO_DEFAULTS = {"discopop_tau": 0.05}  # TRL 1.16 DPOConfig's; tests/train/test_config.py checks ours equal TRL's


def _trl_branch(loss_type: str) -> str:
    """The body of ``loss_type``'s branch in TRL's ``DPOTrainer._compute_loss``, dedented, ready to exec."""
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer

    lines = inspect.getsource(DPOTrainer._compute_loss).splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(rf'\s*(el)?if loss_type == "{loss_type}":', line))
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = []
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line)
    return textwrap.dedent("\n".join(body))


def _per_token(logps: list[float], lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (B, width) whose masked row sums are ``logps``, and the mask (B, width)."""
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    return mask * t([lp / n for lp, n in zip(logps, lengths, strict=True)])[:, None], mask


def run_trl(loss_type: str, label_smoothing: float = 0.0) -> torch.Tensor:
    """TRL's per-sequence loss for ``loss_type`` on PC, PR, RC, RR (B = 3), with f_divergence_type reverse_kl."""
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps = t(PC), t(PR), t(RC), t(RR)
    width = max(LC + LR)
    (pc_tok, mask_c), (pr_tok, mask_r) = _per_token(PC, LC, width), _per_token(PR, LR, width)
    scope = {
        "self": types.SimpleNamespace(beta=BETA, label_smoothing=label_smoothing,
                                      args=types.SimpleNamespace(discopop_tau=DPO_DEFAULTS["discopop_tau"])),
        "F": F, "torch": torch,
        "device": "cpu", "chosen_logps": chosen_logps, "rejected_logps": rejected_logps,
        "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
        "chosen_logratios": chosen_logps - ref_chosen_logps, "rejected_logratios": rejected_logps - ref_rejected_logps,
        "per_token_logps": torch.cat([pc_tok, pr_tok]), "shift_completion_mask": torch.cat([mask_c, mask_r]),
        "completion_mask": torch.cat([mask_c, mask_r]),
    }
    scope["chosen_scores"], scope["rejected_scores"] = scope["chosen_logratios"], scope["rejected_logratios"]
    scope["delta_score"] = scope["chosen_scores"] - scope["rejected_scores"]
    exec(_trl_branch(loss_type), scope)
    return scope["per_sequence_loss"]


@pytest.mark.parametrize(("name", "ls"), [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.1), ("exo_pair", 1e-3),
                                          ("exo_pair", 0.1), ("aot", 0.1), ("aot_unpaired", 0.1), ("sft", 0.2)])
def test_label_smoothing_means_what_trl_means(name, ls):
    """label_smoothing reaches the losses TRL 1.16 reads it in (robust, exo_pair, aot, aot_unpaired), each as TRL
    uses it, and no other: TRL's sigmoid with ls = 0.2 is plain DPO, -log sigma(beta delta), and so is ours
    (ours refuses the key for sigmoid rather than ignore it; cDPO is loss_type cdpo).
    """
    ours = run(name, label_smoothing=ls) if name in ("robust", "exo_pair", "aot", "aot_unpaired") else run(name)
    atol = 1e-6 if name == "exo_pair" else 1e-12  # TRL makes eps a float32 tensor: log(eps) rounds at 1e-8
    torch.testing.assert_close(ours[0], run_trl(name, label_smoothing=ls), rtol=0, atol=atol)


@pytest.mark.parametrize("ls", [1e-3, 0.1, 0.4])
def test_exo_pair_equals_trl_in_float64(ls):
    """exo_pair in float64 is TRL 1.16's to 1e-12 once TRL's own constant is float64 too, and exact.

    TRL forms ``epsilon = torch.tensor(self.label_smoothing)``, a float32 tensor (the default dtype), so its
    ``log1p(-eps)`` and ``log(eps)`` round at ~1e-8 and its float64 losses sit ~5e-8 (ls = 1e-3) from the
    exact value. Ours forms both constants in Python floats (float64): run TRL's branch with float64 as the
    default dtype and the two agree to rounding; the whole gap to TRL as it runs is its float32 epsilon.
    """
    ours = run("exo_pair", label_smoothing=ls)[0]
    z = [BETA * d for d in DELTA]
    exact = [sig(x) * (logsig(x) - math.log1p(-ls)) + sig(-x) * (logsig(-x) - math.log(ls)) for x in z]
    torch.testing.assert_close(ours, t(exact), rtol=0, atol=1e-12)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        trl64 = run_trl("exo_pair", label_smoothing=ls)
    finally:
        torch.set_default_dtype(prev)
    torch.testing.assert_close(ours, trl64, rtol=0, atol=1e-12)
    eps32 = torch.tensor(ls, dtype=torch.float32)
    log_pw, log_pl = float(torch.log1p(-eps32)), float(torch.log(eps32))  # TRL's constants, as TRL rounds them
    gap = [sig(x) * (math.log1p(-ls) - log_pw) + sig(-x) * (math.log(ls) - log_pl) for x in z]
    torch.testing.assert_close(run_trl("exo_pair", label_smoothing=ls) - ours, t(gap), rtol=0, atol=1e-12)


def test_every_trl_loss_equals_trl_branch():
    """The other TRL 1.16 losses on the same numbers, with our defaults (discopop_tau: TRL's 0.05)."""
    for name in ("hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop",
                 "sigmoid_norm"):
        torch.testing.assert_close(run(name)[0], run_trl(name), rtol=0, atol=1e-12, msg=name)


def test_rewards_and_exo_pair_refusal_are_trl_s():
    """TRL 1.16 logs ``chosen_rewards = self.beta * chosen_logratios.detach()`` for every loss type, sft
    included, and refuses exo_pair with label_smoothing 0.0 at construction; ours does the same.
    """
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer

    source = inspect.getsource(DPOTrainer._compute_loss)
    assert "chosen_rewards = self.beta * chosen_logratios.detach()" in source
    assert "rejected_rewards = self.beta * rejected_logratios.detach()" in source
    for name in ("sigmoid", "sft", "exo_pair"):
        check_ref_rewards(run(name, **({"label_smoothing": 1e-3} if name == "exo_pair" else {})))
    init = inspect.getsource(DPOTrainer.__init__)
    assert '"exo_pair" in self.loss_types and self.label_smoothing == 0.0' in init
    with pytest.raises(ValueError, match="exo_pair"):
        run("exo_pair", label_smoothing=0.0)

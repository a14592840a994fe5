"""f-DPO in ``preference_loss``: TRL 1.16's ``f_divergence_type`` and ``f_alpha_divergence_coef``.

Wang et al., "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
Constraints", ICLR 2024 (arXiv:2309.16240). Each log-ratio h = policy - ref becomes a score s (TRL's
parameterisation, dpo_trainer.py ``_compute_loss``):

    reverse_kl        s = h
    forward_kl        s = 1 - exp(-h)
    js_divergence     s = log 2 + log sigma(h)
    alpha_divergence  s = (exp((a - 1) h) - 1) / (a - 1)     (s = h when |a - 1| < 1e-6)

and the losses in F_DIVERGENCE_LOSSES read s where DPO reads h. The three pairs below (float64, beta = 0.5):

    policy_chosen_logps   PC = [-1.0, -2.5, -0.5]     chosen_lengths   LC = [2, 5, 1]
    policy_rejected_logps PR = [-2.0, -1.0, -3.0]     rejected_lengths LR = [4, 1, 3]
    ref_chosen_logps      RC = [-1.2, -2.0, -1.5]
    ref_rejected_logps    RR = [-1.5, -1.5, -2.0]

    h_w = [0.2, -0.5, 1.0]    h_l = [-0.5, 0.5, -1.0]

Expected values are computed with ``math`` on plain floats, never with the code under test.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

import logitsam.losses as public
from logitsam.core.losses import (
    F_DIVERGENCE_LOSSES,
    F_DIVERGENCES,
    LOSS_TYPES,
    f_divergence_scores,
    preference_loss,
)

PC = [-1.0, -2.5, -0.5]
PR = [-2.0, -1.0, -3.0]
RC = [-1.2, -2.0, -1.5]
RR = [-1.5, -1.5, -2.0]
LC = [2, 5, 1]
LR = [4, 1, 3]
BETA = 0.5
H_W = [p - r for p, r in zip(PC, RC, strict=True)]
H_L = [p - r for p, r in zip(PR, RR, strict=True)]
TRL_F_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}  # TRL 1.16
REFUSED = {"nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "slic", "cpo", "simpo",
           "orpo"}
DIVERGENCES = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 2.0),
               ("alpha_divergence", -0.5)]
PARAMS = {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.1}, "cdpo": {"label_smoothing": 0.1},
          "discopop": {"discopop_tau": 0.3}}


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def score(h: float, kind: str, a: float) -> float:
    if kind == "forward_kl":
        return 1 - math.exp(-h)
    if kind == "js_divergence":
        return math.log(2) + logsig(h)
    if kind == "alpha_divergence" and abs(a - 1) >= 1e-6:
        return (math.exp(min((a - 1) * h, 80.0)) - 1) / (a - 1)
    return h


def expected_loss(name: str, w: float, l: float, lc: int, lr: int, b: float = BETA) -> float:
    """Per-pair loss of ``name`` from the (chosen, rejected) scores w, l, in plain floats."""
    z, ls = b * (w - l), PARAMS.get(name, {}).get("label_smoothing", 0.0)
    if name == "sigmoid":
        return -logsig(z)
    if name == "hinge":
        return max(0.0, 1 - z)
    if name == "ipo":
        return (w / lc - l / lr - 1 / (2 * b)) ** 2
    if name == "sigmoid_norm":
        return -logsig(b * (w / lc - l / lr))
    if name == "exo_pair":
        return sig(z) * (logsig(z) - math.log(1 - ls)) + sig(-z) * (logsig(-z) - math.log(ls))
    if name == "robust":
        return (-(1 - ls) * logsig(z) + ls * logsig(-z)) / (1 - 2 * ls)
    if name == "cdpo":
        return -(1 - ls) * logsig(z) - ls * logsig(-z)
    if name == "discopop":
        m = sig(z / PARAMS["discopop"]["discopop_tau"])
        return (1 - m) * -logsig(z) + m * math.exp(-z)
    raise AssertionError(name)


def t(xs, requires_grad: bool = False, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(xs, dtype=dtype, requires_grad=requires_grad)


def run(loss_type, kind="reverse_kl", a=0.5, pc=None, pr=None, dtype=torch.float64, **params):
    return preference_loss(
        loss_type, t(PC, dtype=dtype) if pc is None else pc, t(PR, dtype=dtype) if pr is None else pr,
        t(RC, dtype=dtype), t(RR, dtype=dtype), beta=BETA, chosen_lengths=torch.tensor(LC),
        rejected_lengths=torch.tensor(LR), f_divergence_type=kind, f_alpha_divergence_coef=a, **params,
    )


# ------------------------------------------------------------------------------------------------
# Hand-worked values


@pytest.mark.parametrize(("kind", "a"), [("reverse_kl", 0.5), *DIVERGENCES, ("alpha_divergence", 1.0)])
def test_scores_by_hand(kind, a):
    h = H_W + H_L
    torch.testing.assert_close(f_divergence_scores(t(h), kind, a), t([score(x, kind, a) for x in h]), rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize(("kind", "a", "rounded"), [
    ("forward_kl", 0.5, {"sigmoid": [0.5070, 0.9873, 0.2691], "hinge": [0.5850, 1.5211, 0.0],
                         "ipo": [0.5583, 2.3202, 0.0420]}),
    ("js_divergence", 0.5, {"sigmoid": [0.6036, 0.8259, 0.4741], "hinge": [0.8120, 1.25, 0.5],
                            "ipo": [0.7784, 1.6263, 0.1709]}),
    ("alpha_divergence", 0.5, {"sigmoid": [0.5214, 0.9773, 0.3021], "hinge": [0.6208, 1.5052, 0.0],
                               "ipo": [0.5819, 2.4212, 0.0481]}),
    ("alpha_divergence", 2.0, {"sigmoid": [0.5512, 0.9873, 0.2691], "hinge": [0.6926, 1.5211, 0.0],
                               "ipo": [0.6256, 2.9840, 0.8630]}),
])  # fmt: skip
def test_sigmoid_hinge_ipo_by_hand(kind, a, rounded):
    """E.g. forward_kl: s_w = 1 - e^-h_w = [0.1813, -0.6487, 0.6321], s_l = [-0.6487, 0.3935, -1.7183],
    s_w - s_l = [0.8300, -1.0422, 2.3504]; sigmoid -log sigma(0.5 (s_w - s_l)) = [0.5070, 0.9873, 0.2691].
    js: s_w - s_l = [0.3759, -0.5, 1.0]; alpha 0.5: [0.7584, -1.0104, 2.0844]; alpha 2: [0.6149, -1.0422, 2.3504].
    ipo divides by the lengths first: (s_w / LC - s_l / LR - 1)^2.
    """
    s_w, s_l = [score(h, kind, a) for h in H_W], [score(h, kind, a) for h in H_L]
    for name, values in rounded.items():
        losses, chosen, rejected = run(name, kind, a)
        expected = [expected_loss(name, *p) for p in zip(s_w, s_l, LC, LR, strict=True)]
        torch.testing.assert_close(losses, t(expected), rtol=0, atol=1e-12, msg=name)
        torch.testing.assert_close(losses, t(values), rtol=0, atol=6e-5, msg=name)
        # TRL logs the rewards from the log-ratios, not from the scores
        torch.testing.assert_close(chosen, t([BETA * h for h in H_W]), rtol=0, atol=1e-15)
        torch.testing.assert_close(rejected, t([BETA * h for h in H_L]), rtol=0, atol=1e-15)


@pytest.mark.parametrize(("kind", "a"), DIVERGENCES)
@pytest.mark.parametrize("name", ["exo_pair", "robust", "discopop", "sigmoid_norm", "cdpo"])
def test_other_score_losses_by_hand(name, kind, a):
    s_w, s_l = [score(h, kind, a) for h in H_W], [score(h, kind, a) for h in H_L]
    expected = [expected_loss(name, *p) for p in zip(s_w, s_l, LC, LR, strict=True)]
    torch.testing.assert_close(run(name, kind, a, **PARAMS.get(name, {}))[0], t(expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("kind", "a"), DIVERGENCES)
def test_sft_ignores_the_divergence_and_lists_mix(kind, a):
    """sft reads no log-ratio (TRL allows it with any f_divergence_type); a list sums each loss's own value."""
    torch.testing.assert_close(run("sft", kind, a)[0], run("sft")[0], rtol=0, atol=0)
    combined = run(["sigmoid", "sft", "ipo"], kind, a, loss_weights=[0.7, 0.2, 1.3])[0]
    parts = [run(n, kind, a)[0] for n in ("sigmoid", "sft", "ipo")]
    torch.testing.assert_close(combined, 0.7 * parts[0] + 0.2 * parts[1] + 1.3 * parts[2])


# ------------------------------------------------------------------------------------------------
# Gradients, limits and numerics


@pytest.mark.parametrize(("kind", "a"), [("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 2.0),
                                         ("alpha_divergence", -0.5), ("forward_kl", 0.5)])
@pytest.mark.parametrize("name", sorted(F_DIVERGENCE_LOSSES - {"sft"}))
def test_gradients_match_finite_differences(name, kind, a):
    def f(pc, pr):
        return run(name, kind, a, pc=pc, pr=pr, **PARAMS.get(name, {}))[0]

    assert torch.autograd.gradcheck(f, (t(PC, True), t(PR, True)), eps=1e-6, atol=1e-7)


def test_js_sigmoid_gradient_closed_form():
    """ds/dh = sigma(-h) for js; d/dPC -log sigma(b (s_w - s_l)) = -b sigma(-z) sigma(-h_w), z = b (s_w - s_l)."""
    pc, pr = t(PC, True), t(PR, True)
    run("sigmoid", "js_divergence", pc=pc, pr=pr)[0].sum().backward()
    s = [(score(w, "js_divergence", 0), score(l, "js_divergence", 0)) for w, l in zip(H_W, H_L, strict=True)]
    g = [-BETA * sig(-BETA * (w - l)) for w, l in s]
    torch.testing.assert_close(pc.grad, t([x * sig(-h) for x, h in zip(g, H_W, strict=True)]), rtol=0, atol=1e-12)
    torch.testing.assert_close(pr.grad, t([-x * sig(-h) for x, h in zip(g, H_L, strict=True)]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("a", [0.5, 1.0, 1.0 + 5e-7])
@pytest.mark.parametrize("name", list(LOSS_TYPES))
def test_reverse_kl_and_alpha_one_are_bit_identical_to_the_default(name, a):
    params = {"label_smoothing": 0.05} if name in ("exo_pair", "cdpo", "robust", "aot") else {}
    kinds = [("reverse_kl", a)] + ([("alpha_divergence", a)] if name in F_DIVERGENCE_LOSSES and a != 0.5 else [])
    gen = torch.Generator().manual_seed(0)
    base = [-1 - 3 * torch.rand(6, generator=gen, dtype=torch.float32) for _ in range(4)]
    lengths = {"chosen_lengths": torch.tensor([1, 2, 3, 4, 5, 0]), "rejected_lengths": torch.tensor([5, 1, 2, 7, 3, 2])}

    def go(**f_div):
        pc, pr = base[0].clone().requires_grad_(), base[1].clone().requires_grad_()
        out = preference_loss(name, pc, pr, base[2], base[3], beta=0.7, **lengths, **params, **f_div)
        out[0].sum().backward()
        return [*out, pc.grad, pr.grad]

    default = go()
    for kind, coef in kinds:
        for x, y in zip(default, go(f_divergence_type=kind, f_alpha_divergence_coef=coef), strict=True):
            assert (x is None and y is None) or torch.equal(x, y), (name, kind, coef)


def test_alpha_clamps_and_dtypes():
    """(a - 1) h is clamped at 80 (float32, bfloat16, and float64 here) or 11 (float16) before exp, computed in
    float32 (float64 stays float64) and cast back, as TRL; the scores keep the input dtype and stay finite."""
    h = [100.0, 0.3, -2.0]
    for dtype, cap in ((torch.float16, 11.0), (torch.bfloat16, 80.0), (torch.float32, 80.0), (torch.float64, 80.0)):
        s = f_divergence_scores(torch.tensor(h, dtype=dtype), "alpha_divergence", 2.0)
        assert s.dtype == dtype and torch.isfinite(s).all()
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        x = torch.tensor(h, dtype=dtype).to(wide).clamp(max=cap)
        torch.testing.assert_close(s, (torch.exp(x) - 1.0).to(dtype), rtol=0, atol=0)
    assert f_divergence_scores(t([100.0]), "alpha_divergence", 2.0).item() == math.exp(80.0) - 1.0


# ------------------------------------------------------------------------------------------------
# Refusals and exports


def test_unknown_f_divergence_type():
    with pytest.raises(ValueError, match=r"unknown f_divergence_type 'forward-kl'\. Did you mean 'forward_kl'\?") as e:
        run("sigmoid", "forward-kl")
    assert all(repr(k) in str(e.value) for k in F_DIVERGENCES)
    with pytest.raises(ValueError, match="unknown f_divergence_type 'kl'"):
        run("sft", "kl")
    with pytest.raises(ValueError, match="unknown f_divergence_type"):
        f_divergence_scores(t([0.1]), "chi2")


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_losses_are_refused(name):
    pattern = rf"f_divergence_type='js_divergence' is only supported for the loss types .*'cdpo'.*includes \['{name}'\]"
    with pytest.raises(ValueError, match=pattern):
        run(name, "js_divergence")
    run(name, "reverse_kl", **({"label_smoothing": 0.05} if name in ("aot", "aot_unpaired") else {}))  # the default


def test_a_list_with_one_unsupported_loss_is_refused():
    with pytest.raises(ValueError, match=r"'alpha_divergence'.*loss_type \['sigmoid', 'apo_zero', 'ipo'\] "
                                         r"includes \['apo_zero'\]"):
        run(["sigmoid", "apo_zero", "ipo"], "alpha_divergence", loss_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"includes \['simpo', 'orpo'\]"):
        run(["simpo", "sigmoid", "orpo"], "forward_kl")


def test_sets_and_exports():
    assert F_DIVERGENCES == ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
    assert F_DIVERGENCE_LOSSES == TRL_F_LOSSES | {"cdpo"}
    assert set(LOSS_TYPES) == F_DIVERGENCE_LOSSES | REFUSED
    assert public.F_DIVERGENCES is F_DIVERGENCES and public.F_DIVERGENCE_LOSSES is F_DIVERGENCE_LOSSES
    assert public.f_divergence_scores is f_divergence_scores
    params = inspect.signature(preference_loss).parameters
    assert params["f_divergence_type"].default == "reverse_kl" and params["f_alpha_divergence_coef"].default == 0.5


# ------------------------------------------------------------------------------------------------
# Against TRL 1.16's own code: DPOTrainer._compute_loss from the log-ratios through the loss loop, cut from the
# installed source and run on the same numbers (that part needs no model; the trainer around it does)


def _trl_loss_code() -> str:
    """``_compute_loss`` from ``chosen_logratios = ...`` (the f-divergence scores) to ``loss += ...`` (the loop)."""
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer

    lines = inspect.getsource(DPOTrainer._compute_loss).splitlines()
    start = next(i for i, line in enumerate(lines) if "chosen_logratios = chosen_logps - ref_chosen_logps" in line)
    end = next(i for i, line in enumerate(lines) if "loss += per_sequence_loss.mean() * loss_weight" in line)
    assert any("f_divergence_type" in line for line in lines[start:end])
    return textwrap.dedent("\n".join(lines[start : end + 1]))


def run_trl(names, kind, a, dtype, weights=None, label_smoothing=0.0, discopop_tau=0.05):
    """TRL's summed loss, scores and last per-sequence loss on PC, PR, RC, RR."""
    width = max(LC + LR)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in LC + LR])
    per_token = mask * t([lp / n for lp, n in zip(PC + PR, LC + LR, strict=True)], dtype=dtype)[:, None]
    self = types.SimpleNamespace(beta=BETA, label_smoothing=label_smoothing, loss_types=names, use_weighting=False,
                                 loss_weights=weights or [1.0] * len(names), f_divergence_type=kind,
                                 f_alpha_divergence_coef=a, args=types.SimpleNamespace(discopop_tau=discopop_tau))
    scope = {"self": self, "F": F, "torch": torch, "math": math, "device": "cpu", "chosen_logps": t(PC, dtype=dtype),
             "rejected_logps": t(PR, dtype=dtype), "ref_chosen_logps": t(RC, dtype=dtype),
             "ref_rejected_logps": t(RR, dtype=dtype), "per_token_logps": per_token, "completion_mask": mask,
             "shift_completion_mask": mask}
    exec(_trl_loss_code(), scope)
    return scope


@pytest.mark.parametrize(("kind", "a"), [("reverse_kl", 0.5), *DIVERGENCES, ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("name", sorted(TRL_F_LOSSES))
def test_equals_trl_branch(name, kind, a):
    """Float32 always (TRL's alpha table has no float64), float64 too for the other divergences."""
    params = PARAMS.get(name, {})
    for dtype in (torch.float32,) if kind == "alpha_divergence" else (torch.float32, torch.float64):
        trl = run_trl([name], kind, a, dtype, **params)
        ours = run(name, kind, a, dtype=dtype, **params)[0]
        atol = 1e-12 if dtype == torch.float64 and name != "exo_pair" else 2e-6  # TRL's exo eps is a float32 tensor
        torch.testing.assert_close(ours, trl["per_sequence_loss"], rtol=0, atol=atol)
        torch.testing.assert_close(ours.mean(), trl["loss"], rtol=0, atol=atol)
        h = torch.cat([trl["chosen_logratios"], trl["rejected_logratios"]])  # scores: bit for bit
        torch.testing.assert_close(f_divergence_scores(h, kind, a),
                                   torch.cat([trl["chosen_scores"], trl["rejected_scores"]]), rtol=0, atol=0)


@pytest.mark.parametrize(("kind", "a"), DIVERGENCES)
def test_weighted_list_equals_trl(kind, a):
    names, weights = ["sigmoid", "ipo", "sft", "robust"], [0.8, 0.3, 1.0, 0.5]
    trl = run_trl(names, kind, a, torch.float32, weights, label_smoothing=0.1)
    ours = run(names, kind, a, dtype=torch.float32, loss_weights=weights, label_smoothing=0.1)[0]
    torch.testing.assert_close(ours.mean(), trl["loss"], rtol=0, atol=2e-6)


def test_refused_set_and_defaults_are_trl_s():
    """TRL 1.16's DPOTrainer.__init__ refuses f_divergence_type != reverse_kl outside its set; DPOConfig's defaults
    are ours. (cdpo, not a TRL 1.x loss, is in our set: it is sigmoid with smoothed labels.)"""
    pytest.importorskip("trl")
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    init = inspect.getsource(DPOTrainer.__init__)
    found = re.search(r"f_divergence_loss_types = (\{[^}]*\})", init)
    assert found and ast.literal_eval(found.group(1)) == TRL_F_LOSSES
    assert 'f"`f_divergence_type=' in init and "only supported for the following loss types" in init
    fields = DPOConfig.__dataclass_fields__
    params = inspect.signature(preference_loss).parameters
    assert fields["f_divergence_type"].default == params["f_divergence_type"].default
    assert fields["f_alpha_divergence_coef"].default == params["f_alpha_divergence_coef"].default

"""Preference losses on per-sequence log-probs: a table of small formulas, one row per loss, and a dispatcher.

Every loss takes log-probs summed over the completion tokens, one value per pair:

    policy_chosen_logps, policy_rejected_logps (B,)   log pi_theta(y_w | x), log pi_theta(y_l | x)
    ref_chosen_logps, ref_rejected_logps       (B,)   the same under the frozen reference model
    chosen_lengths, rejected_lengths           (B,)   completion token counts |y_w|, |y_l| (clamped to >= 1)

and returns ``(losses, chosen_rewards, rejected_rewards)``, each (B,). The caller reduces ``losses``
(TRL takes the mean). Rewards are detached. For reference-based losses they are TRL's
``beta * (policy - ref)``; reference-free losses report the implicit reward of their own paper.

Below, ``h_w = log pi(y_w) - log ref(y_w)`` and ``h_l`` likewise are the log-ratios, and
``delta = h_w - h_l`` is the DPO margin. Names and defaults follow TRL 1.x ``DPOConfig``
(``beta``, ``label_smoothing``, ``discopop_tau``, ``loss_type``, ``loss_weights``, ``f_divergence_type``,
``f_alpha_divergence_coef``) and TRL's ``CPOConfig`` (``cpo_alpha``, ``simpo_gamma``).

Each loss is one row of ``LOSS_SPECS``, written as ``@_loss(title, formula, citation, ...)`` over a formula
of a ``Pair`` (the shared context) and the loss's own keyword parameters. The decorator makes the row's
public function (e.g. ``sigmoid_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
ref_rejected_logps, *, beta=0.1)``, with a real ``__signature__`` and a docstring built from the row) and
enters it in ``LOSS_TYPES``. ``preference_loss`` dispatches on ``loss_type``.
"""

from __future__ import annotations

import difflib
import inspect
import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Losses = tuple[Tensor, Tensor, Tensor]

_TENSOR_ARGS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                "chosen_lengths", "rejected_lengths")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")  # TRL 1.16's f_divergence_type


@dataclass(frozen=True, slots=True)
class Pair:
    """What a formula reads, each (B,). ``rc, rr, h_*, s_*`` are None for reference-free losses, ``len_*`` for
    losses that do not take the lengths."""

    pc: Tensor  # policy log-probs, chosen and rejected
    pr: Tensor
    rc: Tensor | None  # reference log-probs
    rr: Tensor | None
    h_w: Tensor | None  # log-ratios pc - rc, pr - rr
    h_l: Tensor | None
    s_w: Tensor | None  # f-divergence scores of h_w, h_l: h_w, h_l themselves under reverse_kl (the default)
    s_l: Tensor | None
    len_w: Tensor | None  # token counts clamped at 1, in the log-probs' dtype
    len_l: Tensor | None
    beta: float


@dataclass(frozen=True)
class LossSpec:
    """One row of the table: a formula and what it needs."""

    name: str
    formula: Callable[..., Tensor | Losses]  # (Pair, **params) -> losses, or (losses, chosen_r, rejected_r)
    ref: bool  # needs the reference log-probs (the rewards are then beta * h)
    lengths: int  # 0, 1 (chosen_lengths) or 2 (both)
    params: dict[str, float]  # own keyword parameters and their defaults (the formula's)
    f_div: bool  # reads the f-divergence scores s_w, s_l (F_DIVERGENCE_LOSSES)
    title: str
    math: str
    cite: str
    note: str = ""


LOSS_SPECS: dict[str, LossSpec] = {}
LOSS_TYPES: dict[str, Callable[..., Losses]] = {}


# ---------------------------------------------------------------------------------------------
# Checks and shared pieces


def _log_ratios(
    loss: str, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor | None, ref_rejected: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(h_w, h_l) = (policy - ref) for chosen and rejected, after checking the reference was given."""
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(
            f"loss_type={loss!r} is reference-based: it needs ref_chosen_logps and ref_rejected_logps "
            f"(reference-model log-probs, shape (B,)), got None. Reference-free losses: "
            f"{sorted(REFERENCE_FREE)}."
        )
    return policy_chosen - ref_chosen, policy_rejected - ref_rejected


def _lengths(loss: str, lengths: Tensor | None, name: str, like: Tensor) -> Tensor:
    if lengths is None:
        raise ValueError(f"loss_type={loss!r} needs {name} (completion token counts, shape (B,)), got None.")
    # TRL clamps the count at 1 so an empty completion divides by 1, not 0.
    return torch.as_tensor(lengths, dtype=like.dtype, device=like.device).clamp(min=1.0)


def _smoothed_logistic(z: Tensor, label_smoothing: float) -> Tensor:
    """cDPO's conservative logistic loss: -(1 - ls) log sigma(z) - ls log sigma(-z)."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012).

    Each branch sees its input clamped to its own side of -log 2, so the branch torch.where discards
    cannot produce inf/NaN gradients.
    """
    cut = -math.log(2.0)
    near_zero = torch.log(-torch.expm1(x.clamp(min=cut)))
    far = torch.log1p(-torch.exp(x.clamp(max=cut)))
    return torch.where(x > cut, near_zero, far)


def f_divergence_scores(h: Tensor, f_divergence_type: str, f_alpha_divergence_coef: float = 0.5) -> Tensor:
    """f-DPO's score s = f'(u) (up to a constant) of the log-ratio h = log u = log pi - log ref, as TRL 1.16.

        reverse_kl        s = h                                  (DPO)
        forward_kl        s = 1 - exp(-h)
        js_divergence     s = log 2 + log sigma(h)
        alpha_divergence  s = (exp((a - 1) h) - 1) / (a - 1),    a = f_alpha_divergence_coef; s = h if |a - 1| < 1e-6

    The losses in ``F_DIVERGENCE_LOSSES`` read s_w - s_l where DPO reads delta = h_w - h_l. Alpha: as TRL,
    (a - 1) h is clamped at 80 (11 in float16) and exponentiated in float32, then cast back; float64 (which
    TRL's table lacks) stays float64, clamped at 80 too.

    Wang et al., "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
    Constraints", ICLR 2024 (arXiv:2309.16240).
    """
    if f_divergence_type == "reverse_kl":
        return h
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-h)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(h)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        if abs(a - 1.0) < 1e-6:  # the limit f'(u) -> log u: reverse KL
            return h
        t = (a - 1.0) * h
        wide = t if t.dtype == torch.float64 else t.float()
        return (torch.exp(torch.clamp(wide, max=11.0 if t.dtype == torch.float16 else 80.0)) - 1.0).to(t.dtype) * (
            1.0 / (a - 1.0)
        )
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; allowed: {list(F_DIVERGENCES)}")


def _compute(spec: LossSpec, t: Mapping[str, Tensor | None], beta: float, params: Mapping[str, object],
             f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> Losses:
    """Check and build the ``Pair`` for ``spec`` from the named tensors ``t``, run the formula, detach rewards."""
    name, pc, pr = spec.name, t["policy_chosen_logps"], t["policy_rejected_logps"]
    rc = rr = h_w = h_l = len_w = len_l = None
    if spec.ref:
        rc, rr = t.get("ref_chosen_logps"), t.get("ref_rejected_logps")
        h_w, h_l = _log_ratios(name, pc, pr, rc, rr)
    if spec.lengths >= 1:
        len_w = _lengths(name, t.get("chosen_lengths"), "chosen_lengths", pc)
    if spec.lengths == 2:
        len_l = _lengths(name, t.get("rejected_lengths"), "rejected_lengths", pc)
    s_w, s_l = h_w, h_l
    if spec.f_div and f_divergence_type != "reverse_kl":
        s_w, s_l = (f_divergence_scores(h, f_divergence_type, f_alpha_divergence_coef) for h in (h_w, h_l))
    out = spec.formula(Pair(pc, pr, rc, rr, h_w, h_l, s_w, s_l, len_w, len_l, beta), **params)
    if not isinstance(out, tuple):  # default rewards: beta * h, or beta * logp without a reference
        out = (out, beta * (h_w if spec.ref else pc), beta * (h_l if spec.ref else pr))
    losses, chosen_rewards, rejected_rewards = out
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def _loss(title: str, formula: str, cite: str, *, ref: bool = True, lengths: int = 0, f_div: bool = False,
          note: str = "") -> Callable[[Callable[..., Tensor | Losses]], Callable[..., Losses]]:
    """Enter the decorated formula ``<name>_loss(c: Pair, *, own params)`` in the table as loss ``<name>``, and
    return its public function ``<name>_loss(policy_chosen_logps, ..., *, beta=0.1, own params)``."""

    def register(fn: Callable[..., Tensor | Losses]) -> Callable[..., Losses]:
        P = inspect.Parameter
        own = {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.kind is P.KEYWORD_ONLY}
        spec = LossSpec(fn.__name__.removesuffix("_loss"), fn, ref, lengths, own, f_div, title, formula, cite, note)
        tensors = _TENSOR_ARGS[:2] + (_TENSOR_ARGS[2:4] if ref else ()) + _TENSOR_ARGS[4 : 4 + lengths]
        sig = inspect.Signature(
            [P(a, P.POSITIONAL_OR_KEYWORD, annotation="Tensor") for a in tensors]
            + [P(k, P.KEYWORD_ONLY, default=v, annotation="float") for k, v in {"beta": 0.1, **own}.items()],
            return_annotation="Losses",
        )

        def loss(*args: object, **kwargs: object) -> Losses:
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as err:
                raise TypeError(f"{fn.__name__}(): {err}") from None
            bound.apply_defaults()
            return _compute(spec, bound.arguments, bound.arguments["beta"], {k: bound.arguments[k] for k in own})

        keys = "".join(f", {k}={v!r}" for k, v in own.items())
        fdiv = ("\n\nWith ``preference_loss(..., f_divergence_type=...)`` it reads the f-divergence scores s_w, s_l\n"
                "(``f_divergence_scores``) in place of h_w, h_l; the rewards stay beta * h." if f_div else "")
        loss.__doc__ = (f"{title}\n\n{textwrap.indent(formula, '    ')}\n\n" + (f"{note}\n\n" if note else "")
                        + f"Args: {', '.join(tensors)}, each (B,);\n    keywords beta=0.1{keys}.\nReturns: losses, "
                        f"chosen_rewards, rejected_rewards, each (B,).{fdiv}\n\n{cite}\n")
        loss.__name__ = loss.__qualname__ = fn.__name__
        loss.__signature__ = sig
        LOSS_SPECS[spec.name], LOSS_TYPES[spec.name] = spec, loss
        return loss

    return register


# ---------------------------------------------------------------------------------------------
# TRL DPOTrainer losses (reference-based unless noted), in TRL's order


@_loss("DPO's logistic loss on the log-ratio margin (TRL 1.x's ``\"sigmoid\"``).",
       "loss = -log sigma(beta delta)",
       'Rafailov et al., "Direct Preference Optimization", NeurIPS 2023 (arXiv:2305.18290), Eq. 7.', f_div=True,
       note="TRL 1.x's ``\"sigmoid\"`` reads no ``label_smoothing``; the label-smoothed form (cDPO) is ``cdpo_loss``.")
def sigmoid_loss(c: Pair) -> Tensor:
    return -F.logsigmoid(c.beta * (c.s_w - c.s_l))


@_loss("Hinge loss on the log-ratio margin (TRL's ``\"hinge\"``); beta is 1 / margin.",
       "loss = max(0, 1 - beta delta)",
       'Zhao et al., "SLiC-HF", arXiv:2305.10425, Eq. 1 with the reference log-ratio in place of the raw\n'
       "log-likelihood (TRL's variant; the paper's own form is ``slic_loss``).", f_div=True)
def hinge_loss(c: Pair) -> Tensor:
    return torch.relu(1 - c.beta * (c.s_w - c.s_l))


@_loss("IPO's squared loss on the per-token log-ratio margin.",
       "loss = (h_w / |y_w| - h_l / |y_l| - 1 / (2 beta))^2",
       'Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences",\n'
       "AISTATS 2024 (arXiv:2310.12036), Eq. 17.", lengths=2, f_div=True,
       note="The per-token normalisation is TRL 1.x's (agreed with the IPO authors); beta is the paper's tau.")
def ipo_loss(c: Pair) -> Tensor:
    return (c.s_w / c.len_w - c.s_l / c.len_l - 1 / (2 * c.beta)) ** 2


@_loss("Pairwise EXO: the reverse KL from the model's pair distribution to the smoothed labels.",
       "q_w = sigma(beta delta), q_l = sigma(-beta delta), eps = label_smoothing\n"
       "loss = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps)",
       'Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment", ICML 2024\n'
       "(arXiv:2402.00856), Eq. 16 with K = 2.", f_div=True,
       note="eps must lie in (0, 1), and there is no usable default: TRL's is 0.0, which it refuses to start with\n"
       "for this loss, and so does this function (the paper recommends 1e-3).")
def exo_pair_loss(c: Pair, *, label_smoothing: float = 0.0) -> Tensor:
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            f"loss_type='exo_pair' needs 0 < label_smoothing < 1 (the paper suggests 1e-3), got {label_smoothing}"
        )
    z = c.beta * (c.s_w - c.s_l)
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)  # before the sigmoids: the gradient sums stay bit-identical
    return torch.sigmoid(z) * (log_qw - math.log1p(-label_smoothing)) + torch.sigmoid(-z) * (
        log_ql - math.log(label_smoothing)
    )


@_loss("Pairwise NCA: raise the chosen reward in absolute terms, push both rewards down softly.",
       "r_w = beta h_w, r_l = beta h_l\nloss = -log sigma(r_w) - 0.5 log sigma(-r_w) - 0.5 log sigma(-r_l)",
       'Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards", NeurIPS 2024\n'
       "(arXiv:2402.05369).")
def nca_pair_loss(c: Pair) -> Tensor:
    r_w, r_l = c.beta * c.h_w, c.beta * c.h_l
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


@_loss("Robust DPO: an unbiased logistic loss under label-flip noise of rate ``label_smoothing``.",
       "loss = (-(1 - ls) log sigma(beta delta) + ls log sigma(-beta delta)) / (1 - 2 ls)",
       'Chowdhury, Kini, Natarajan, "Provably Robust DPO", ICML 2024 (arXiv:2403.00409).', f_div=True,
       note="``label_smoothing`` must lie in [0, 0.5) (TRL only warns; here it raises).")
def robust_loss(c: Pair, *, label_smoothing: float = 0.0) -> Tensor:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"loss_type='robust' needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    z, ls = c.beta * (c.s_w - c.s_l), label_smoothing
    return (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)


@_loss("Pairwise BCO: chosen and rejected classified apart around the reward shift ``bco_delta``.",
       "loss = -log sigma(beta h_w - bco_delta) - log sigma(-(beta h_l - bco_delta))",
       'Jung et al., "Binary Classifier Optimization for Large Language Model Alignment", arXiv:2404.04656.',
       note="``bco_delta`` is the paper's reward shift: the running mean of past rewards. This function is pure;\n"
       "the trainer keeps that running mean and passes it in. ``bco_delta=0`` is TRL 1.x's ``\"bco_pair\"``,\n"
       "which dropped the running mean (TRL 0.x kept one inside the trainer).")
def bco_pair_loss(c: Pair, *, bco_delta: float = 0.0) -> Tensor:
    return -F.logsigmoid(c.beta * c.h_w - bco_delta) - F.logsigmoid(-(c.beta * c.h_l - bco_delta))


@_loss("SPPO with hard win probabilities (1 for the chosen, 0 for the rejected); the paper's eta is 1 / beta.",
       "loss = (h_w - 1 / (2 beta))^2 + (h_l + 1 / (2 beta))^2",
       'Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv:2405.00675,\n'
       "Eq. 4.7 with P(y_w wins) = 1, P(y_l wins) = 0.")
def sppo_hard_loss(c: Pair) -> Tensor:
    return (c.h_w - 0.5 / c.beta) ** 2 + (c.h_l + 0.5 / c.beta) ** 2


_AOT = ('Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal Transport", NeurIPS 2024\n'
        "(arXiv:2406.05882).")


@_loss("AOT (paired): first-order stochastic dominance of the policy's log-odds over the reference's.",
       "d = sort_B(logp_w - logp_l) - sort_B(ref_w - ref_l)\nloss_i = -(1 - ls) log sigma(beta d_i) - ls log "
       "sigma(-beta d_i)", _AOT,
       note="The sort runs over the batch, so ``losses[i]`` belongs to the i-th quantile, not to pair i, and the\n"
       "loss depends on the batch composition (only the mean is meaningful). Rewards are per pair.")
def aot_loss(c: Pair, *, label_smoothing: float = 0.0) -> Tensor:
    d = torch.sort(c.pc - c.pr, dim=0).values - torch.sort(c.rc - c.rr, dim=0).values
    return _smoothed_logistic(c.beta * d, label_smoothing)


@_loss("AOT (unpaired): stochastic dominance of the chosen log-ratios over the rejected ones.",
       "d = sort_B(h_w) - sort_B(h_l)\nloss_i = -(1 - ls) log sigma(beta d_i) - ls log sigma(-beta d_i)", _AOT,
       note="As in ``aot_loss``, ``losses[i]`` belongs to the i-th quantile, not to pair i.")
def aot_unpaired_loss(c: Pair, *, label_smoothing: float = 0.0) -> Tensor:
    d = torch.sort(c.h_w, dim=0).values - torch.sort(c.h_l, dim=0).values
    return _smoothed_logistic(c.beta * d, label_smoothing)


_APO = "D'Oosterlinck et al., \"Anchored Preference Optimization and Contrastive Revisions\",\narXiv:2408.06266"


@_loss("APO-zero: raise the chosen likelihood and lower the rejected one, each anchored at the reference.",
       "loss = 1 - sigma(beta h_w) + sigma(beta h_l)", _APO + ", Eq. 7.",
       note="Use it when the chosen answers are better than the model's own.")
def apo_zero_loss(c: Pair) -> Tensor:
    return 1 - torch.sigmoid(c.beta * c.h_w) + torch.sigmoid(c.beta * c.h_l)


@_loss("APO-down: lower the chosen likelihood, and the rejected one more.",
       "loss = sigma(beta h_w) + 1 - sigma(beta delta)", _APO + ", Eq. 8.",
       note="Use it when the chosen answers are worse than the model's own.")
def apo_down_loss(c: Pair) -> Tensor:
    return torch.sigmoid(c.beta * c.h_w) + 1 - torch.sigmoid(c.beta * (c.h_w - c.h_l))


@_loss("DiscoPOP (log-ratio modulated loss): a blend of the logistic and exponential losses.",
       "z = beta delta, m = sigma(z / tau)\nloss = (1 - m) (-log sigma(z)) + m exp(-z)",
       'Chris Lu et al., "Discovering Preference Optimization Algorithms with and for Large Language\n'
       'Models", NeurIPS 2024 (arXiv:2406.08414), Eq. 5.', f_div=True)
def discopop_loss(c: Pair, *, discopop_tau: float = 0.05) -> Tensor:
    z = c.beta * (c.s_w - c.s_l)
    m = torch.sigmoid(z / discopop_tau)
    return (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)


@_loss("Supervised NLL on the chosen completions, as TRL's ``\"sft\"`` computes it.",
       "loss_i = -sum_j logp_w,j / sum_j |y_w,j|   for every i",
       "The MLE term of MPO (Wang et al., arXiv:2411.10442), combined with DPO losses via ``loss_weights``.",
       lengths=1, f_div=True,
       note="This is the token-level mean over the whole batch (TRL's cross-entropy over all chosen tokens),\n"
       "broadcast to every pair, so the mean over pairs equals TRL's value. The loss does not read the\n"
       "reference, but the rewards are TRL's ``beta * (policy - ref)``, so it needs one as TRL does; beta\n"
       "scales the rewards only.")
def sft_loss(c: Pair) -> Tensor:
    return (-c.pc.sum() / c.len_w.sum()).expand(c.pc.shape[0])


@_loss("Length-normalised DPO: the logistic loss on per-token log-ratios (TRL's ``\"sigmoid_norm\"``).",
       "loss = -log sigma(beta (h_w / |y_w| - h_l / |y_l|))",
       'Lambert et al., "Tulu 3: Pushing Frontiers in Open Language Model Post-Training",\n'
       "arXiv:2411.15124 (length-normalised DPO).", lengths=2, f_div=True,
       note="Unlike SimPO it keeps the reference model; beta is per token, so typically larger than DPO's.")
def sigmoid_norm_loss(c: Pair) -> Tensor:
    return -F.logsigmoid(c.beta * (c.s_w / c.len_w - c.s_l / c.len_l))


# ---------------------------------------------------------------------------------------------
# Losses TRL keeps in other trainers or dropped (reference-free unless noted)


@_loss("Conservative DPO (cDPO): the logistic loss against labels flipped with probability ``label_smoothing``.",
       "loss = -(1 - ls) log sigma(beta delta) - ls log sigma(-beta delta)",
       'Mitchell, "A note on DPO with noisy preferences and relationship to IPO", 2023, Eq. 3.', f_div=True,
       note="``label_smoothing`` (ls) must lie in [0, 0.5); ls = 0 is ``sigmoid_loss``. This is what TRL 0.x's\n"
       "``\"sigmoid\"`` computed with ``label_smoothing > 0``; TRL 1.x dropped it, so it has its own name here.")
def cdpo_loss(c: Pair, *, label_smoothing: float = 0.0) -> Tensor:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"loss_type='cdpo' needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    return _smoothed_logistic(c.beta * (c.s_w - c.s_l), label_smoothing)


@_loss("SLiC-HF: a hinge on the sequence log-likelihood margin plus NLL on the chosen completion.",
       "loss = max(0, slic_delta - logp_w + logp_l) - slic_lambda logp_w / |y_w|",
       'Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", arXiv:2305.10425, Eq. 1.',
       ref=False, lengths=1,
       note="Reference-free, as in the paper: the calibration term compares raw likelihoods, and the NLL term\n"
       "(here on the chosen completion, per token) is what keeps the policy near the SFT model. The\n"
       "defaults are ours; the paper tunes both. ``beta`` only scales the reported rewards, ``beta * logp``.")
def slic_loss(c: Pair, *, slic_delta: float = 1.0, slic_lambda: float = 1.0) -> Tensor:
    return torch.relu(slic_delta - c.pc + c.pr) - slic_lambda * c.pc / c.len_w


@_loss("CPO: DPO's logistic loss with a uniform reference, plus NLL on the chosen completion.",
       "loss = -(1 - ls) log sigma(z) - ls log sigma(-z) - cpo_alpha logp_w / |y_w|,\nz = beta (logp_w - logp_l)",
       'Xu et al., "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in\n'
       'Machine Translation", ICML 2024 (arXiv:2401.08417).', ref=False, lengths=1,
       note="Rewards are ``beta * logp`` (the DPO reward with the reference dropped), as in TRL's CPOTrainer.")
def cpo_loss(c: Pair, *, cpo_alpha: float = 1.0, label_smoothing: float = 0.0) -> Tensor:
    return _smoothed_logistic(c.beta * (c.pc - c.pr), label_smoothing) - cpo_alpha * c.pc / c.len_w


@_loss("SimPO: the logistic loss on length-normalised log-probs with a target margin, no reference.",
       "z = beta (logp_w / |y_w| - logp_l / |y_l|) - simpo_gamma\nloss = -(1 - ls) log sigma(z) - ls log sigma(-z)",
       'Meng, Xia, Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward",\n'
       "NeurIPS 2024 (arXiv:2405.14734), Eq. 6.", ref=False, lengths=2,
       note="Rewards are SimPO's implicit reward ``beta * logp / |y|``. The paper uses beta around 2.0, not\n"
       "DPO's 0.1; ``simpo_gamma=0.5`` is TRL's CPOConfig default.")
def simpo_loss(c: Pair, *, simpo_gamma: float = 0.5, label_smoothing: float = 0.0) -> Losses:
    r_w, r_l = c.beta * c.pc / c.len_w, c.beta * c.pr / c.len_l
    return _smoothed_logistic(r_w - r_l - simpo_gamma, label_smoothing), r_w, r_l


@_loss("ORPO: NLL on the chosen completion plus a log-odds-ratio penalty, no reference.",
       "a = logp_w / |y_w|, b = logp_l / |y_l|            (per-token mean log-probs, < 0)\n"
       "log_odds = (a - b) - (log(1 - e^a) - log(1 - e^b))\nloss = -a - beta log sigma(log_odds)",
       'Hong, Lee, Thorne, "ORPO: Monolithic Preference Optimization without Reference Model",\n'
       "EMNLP 2024 (arXiv:2403.07691), Eqs. 6-7.", ref=False, lengths=2,
       note="``beta`` is the paper's lambda (as in TRL's ORPOTrainer). ``log(1 - e^x)`` is computed stably.\n"
       "Rewards are ``beta * a``, TRL's ORPOTrainer choice (the paper defines none).")
def orpo_loss(c: Pair) -> Losses:
    a, b = c.pc / c.len_w, c.pr / c.len_l
    log_odds = (a - b) - (_log1mexp(a) - _log1mexp(b))
    return -a - c.beta * F.logsigmoid(log_odds), c.beta * a, c.beta * b


# ---------------------------------------------------------------------------------------------
# Sets derived from the table, and the dispatcher

REFERENCE_FREE: frozenset[str] = frozenset(name for name, spec in LOSS_SPECS.items() if not spec.ref)
# TRL 1.16 DPOTrainer's f_divergence_loss_types plus our cdpo: the losses built on s_w - s_l (the f-DPO
# reparameterisation leaves a beta log Z(x) term that only cancels in that difference), and sft, which reads neither.
F_DIVERGENCE_LOSSES: frozenset[str] = frozenset(name for name, spec in LOSS_SPECS.items() if spec.f_div)


def _names(loss_type: str | Sequence[str]) -> list[str]:
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not names:
        raise ValueError(f"loss_type must name at least one loss; allowed: {list(LOSS_TYPES)}")
    for name in names:
        if name not in LOSS_TYPES:
            close = difflib.get_close_matches(str(name), LOSS_TYPES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown loss_type {name!r}.{hint} Allowed: {list(LOSS_TYPES)}")
    return names


def requires_reference(loss_type: str | Sequence[str]) -> bool:
    """Whether the loss (for a list: any of them) needs reference-model log-probs."""
    return any(name not in REFERENCE_FREE for name in _names(loss_type))


def requires_lengths(loss_type: str | Sequence[str]) -> bool:
    """Whether the loss (for a list: any of them) needs completion token counts."""
    return any(LOSS_SPECS[name].lengths > 0 for name in _names(loss_type))


def _check_f_divergence(names: list[str], f_divergence_type: str) -> None:
    if f_divergence_type not in F_DIVERGENCES:
        close = difflib.get_close_matches(str(f_divergence_type), F_DIVERGENCES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}.{hint} Allowed: {list(F_DIVERGENCES)}")
    other = [name for name in names if name not in F_DIVERGENCE_LOSSES]
    if f_divergence_type != "reverse_kl" and other:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} is only supported for the loss types "
            f"{sorted(F_DIVERGENCE_LOSSES)}; loss_type {names} includes {other}. Use the default "
            "f_divergence_type='reverse_kl' with these losses."
        )


def preference_loss(
    loss_type: str | Sequence[str],
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    **params: object,
) -> Losses:
    """Per-pair preference loss by name, or a weighted sum of several (TRL 1.x multi-loss).

        losses = sum_k loss_weights[k] * LOSS_TYPES[loss_type[k]](...)[0]

    TRL sums ``w_k * mean(loss_k)``; summing per pair first gives the same mean. The rewards are those
    of the first listed loss. Each loss receives only the arguments it takes: reference log-probs and
    lengths it does not use are ignored, and the ones it needs raise ``ValueError`` when missing.

    f-DPO (TRL 1.16's ``f_divergence_type``): the losses in ``F_DIVERGENCE_LOSSES`` read the scores
    s = f_divergence_scores(h) in place of the log-ratios h, e.g. sigmoid: loss = -log sigma(beta (s_w - s_l)),
    ipo and sigmoid_norm: s / |y|. The rewards stay beta * h, as TRL logs them. Any other listed loss is
    refused with a ``ValueError`` unless ``f_divergence_type="reverse_kl"`` (s = h, the default).
    Wang et al., "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
    Constraints", ICLR 2024 (arXiv:2309.16240).

    Args:
        loss_type: a name in ``LOSS_TYPES`` or a list of them.
        policy_chosen_logps, policy_rejected_logps (B,): summed policy log-probs.
        ref_chosen_logps, ref_rejected_logps (B,), optional: summed reference log-probs.
        beta: shared by every loss.
        chosen_lengths, rejected_lengths (B,), optional: completion token counts.
        f_divergence_type: one of ``F_DIVERGENCES``. f_alpha_divergence_coef: alpha of alpha_divergence.
        **params: ``loss_weights`` (one float per loss, default 1.0 each) and the losses' own
            parameters (``label_smoothing``, ``discopop_tau``, ``bco_delta``, ``simpo_gamma``,
            ``cpo_alpha``, ``slic_delta``, ``slic_lambda``). With a list, each loss takes the ones it
            accepts; a parameter no listed loss accepts raises ``TypeError``.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).
    """
    names = _names(loss_type)
    _check_f_divergence(names, f_divergence_type)
    weights = params.pop("loss_weights", None)
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(names)} loss types {names}")
    accepted = {p for name in names for p in LOSS_SPECS[name].params}
    unknown = sorted(set(params) - accepted)
    if unknown:
        hints = {u: difflib.get_close_matches(u, accepted, n=1) for u in unknown}
        hint = "".join(f" Did you mean {h[0]!r} for {u!r}?" for u, h in hints.items() if h)
        raise TypeError(f"unknown parameter(s) {unknown} for loss_type {names}; accepted: {sorted(accepted)}.{hint}")

    tensors = dict(zip(_TENSOR_ARGS, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                      ref_rejected_logps, chosen_lengths, rejected_lengths), strict=True))
    total, rewards = None, None
    for name, weight in zip(names, weights, strict=True):
        spec = LOSS_SPECS[name]
        own = {**spec.params, **{k: v for k, v in params.items() if k in spec.params}}
        losses, chosen_rewards, rejected_rewards = _compute(spec, tensors, beta, own, f_divergence_type,
                                                            f_alpha_divergence_coef)
        total = weight * losses if total is None else total + weight * losses
        if rewards is None:
            rewards = (chosen_rewards, rejected_rewards)
    return total, *rewards

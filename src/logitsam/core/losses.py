"""Preference losses on per-sequence log-probs: one small pure function per loss, and a name table.

Every function takes log-probs summed over the completion tokens, one value per pair:

    policy_chosen_logps, policy_rejected_logps (B,)   log pi_theta(y_w | x), log pi_theta(y_l | x)
    ref_chosen_logps, ref_rejected_logps       (B,)   the same under the frozen reference model
    chosen_lengths, rejected_lengths           (B,)   completion token counts |y_w|, |y_l| (clamped to >= 1)

and returns ``(losses, chosen_rewards, rejected_rewards)``, each (B,). The caller reduces ``losses``
(TRL takes the mean). Rewards are detached. For reference-based losses they are TRL's
``beta * (policy - ref)``; reference-free losses report the implicit reward of their own paper.

Below, ``h_w = log pi(y_w) - log ref(y_w)`` and ``h_l`` likewise are the log-ratios, and
``delta = h_w - h_l`` is the DPO margin. Names and defaults follow TRL 1.x ``DPOConfig``
(``beta``, ``label_smoothing``, ``discopop_tau``, ``loss_type``, ``loss_weights``) and TRL's
``CPOConfig`` (``cpo_alpha``, ``simpo_gamma``). ``preference_loss`` dispatches on ``loss_type``.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Losses = tuple[Tensor, Tensor, Tensor]

_LENGTH_ARGS = ("chosen_lengths", "rejected_lengths")


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


# ---------------------------------------------------------------------------------------------
# TRL DPOTrainer losses (reference-based unless noted)


def sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> Losses:
    """DPO's logistic loss on the log-ratio margin (TRL 1.x's ``"sigmoid"``).

        loss = -log sigma(beta delta)

    TRL 1.x's ``"sigmoid"`` reads no ``label_smoothing``; the label-smoothed form (cDPO) is ``cdpo_loss``.

    Args:
        policy_chosen_logps, policy_rejected_logps (B,): summed policy log-probs.
        ref_chosen_logps, ref_rejected_logps (B,): summed reference log-probs.
        beta: inverse temperature.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    Rafailov et al., "Direct Preference Optimization", NeurIPS 2023 (arXiv:2305.18290), Eq. 7.
    """
    h_w, h_l = _log_ratios("sigmoid", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -F.logsigmoid(beta * (h_w - h_l))
    return losses, beta * h_w.detach(), beta * h_l.detach()


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> Losses:
    """Hinge loss on the log-ratio margin (TRL's ``"hinge"``).

        loss = max(0, 1 - beta delta)

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (B,).
        beta: 1 / margin.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    Zhao et al., "SLiC-HF", arXiv:2305.10425, Eq. 1 with the reference log-ratio in place of the raw
    log-likelihood (TRL's variant; the paper's own form is ``slic_loss``).
    """
    h_w, h_l = _log_ratios("hinge", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    delta = h_w - h_l
    losses = torch.relu(1 - beta * delta)
    return losses, beta * h_w.detach(), beta * h_l.detach()


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
) -> Losses:
    """IPO's squared loss on the per-token log-ratio margin.

        loss = (h_w / |y_w| - h_l / |y_l| - 1 / (2 beta))^2

    The per-token normalisation is TRL 1.x's (agreed with the IPO authors); beta is the paper's tau.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (B,).
        chosen_lengths, rejected_lengths (B,): completion token counts.
        beta: the regulariser tau.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    AISTATS 2024 (arXiv:2310.12036), Eq. 17.
    """
    h_w, h_l = _log_ratios("ipo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    len_w = _lengths("ipo", chosen_lengths, "chosen_lengths", policy_chosen_logps)
    len_l = _lengths("ipo", rejected_lengths, "rejected_lengths", policy_chosen_logps)
    delta = h_w / len_w - h_l / len_l
    losses = (delta - 1 / (2 * beta)) ** 2
    return losses, beta * h_w.detach(), beta * h_l.detach()


def exo_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Losses:
    """Pairwise EXO: the reverse KL from the model's pair distribution to the smoothed labels.

        q_w = sigma(beta delta), q_l = sigma(-beta delta), eps = label_smoothing
        loss = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps)

    eps must lie in (0, 1), and there is no usable default: TRL's is 0.0, which it refuses to start with
    for this loss, and so does this function (the paper recommends 1e-3).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (B,).
        beta: inverse temperature. label_smoothing: eps.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment", ICML 2024
    (arXiv:2402.00856), Eq. 16 with K = 2.
    """
    h_w, h_l = _log_ratios("exo_pair", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            f"loss_type='exo_pair' needs 0 < label_smoothing < 1 (the paper suggests 1e-3), got {label_smoothing}"
        )
    delta = h_w - h_l
    z = beta * delta
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
    losses = torch.sigmoid(z) * (log_qw - math.log1p(-label_smoothing)) + torch.sigmoid(-z) * (
        log_ql - math.log(label_smoothing)
    )
    return losses, beta * h_w.detach(), beta * h_l.detach()


def nca_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> Losses:
    """Pairwise NCA: raise the chosen reward in absolute terms, push both rewards down softly.

        r_w = beta h_w, r_l = beta h_l
        loss = -log sigma(r_w) - 0.5 log sigma(-r_w) - 0.5 log sigma(-r_l)

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (B,).
        beta: inverse temperature.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards", NeurIPS 2024
    (arXiv:2402.05369).
    """
    h_w, h_l = _log_ratios("nca_pair", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    r_w, r_l = beta * h_w, beta * h_l
    losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    return losses, beta * h_w.detach(), beta * h_l.detach()


def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Losses:
    """Robust DPO: an unbiased logistic loss under label-flip noise of rate ``label_smoothing``.

        loss = (-(1 - ls) log sigma(beta delta) + ls log sigma(-beta delta)) / (1 - 2 ls)

    ``label_smoothing`` must lie in [0, 0.5) (TRL only warns; here it raises).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (B,).
        beta: inverse temperature. label_smoothing: the flip rate.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    Chowdhury, Kini, Natarajan, "Provably Robust DPO", ICML 2024 (arXiv:2403.00409).
    """
    h_w, h_l = _log_ratios("robust", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"loss_type='robust' needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    z = beta * (h_w - h_l)
    ls = label_smoothing
    losses = (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)
    return losses, beta * h_w.detach(), beta * h_l.detach()


def bco_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    bco_delta: float = 0.0,
) -> Losses:
    """Pairwise BCO: chosen and rejected classified apart around the reward shift ``bco_delta``.

        loss = -log sigma(beta h_w - bco_delta) - log sigma(-(beta h_l - bco_delta))

    ``bco_delta`` is the paper's reward shift: the running mean of past rewards. This function is pure;
    the trainer keeps that running mean and passes it in. ``bco_delta=0`` is TRL 1.x's ``"bco_pair"``,
    which dropped the running mean (TRL 0.x kept one inside the trainer).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (B,).
        beta: inverse temperature. bco_delta: the reward shift.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    Jung et al., "Binary Classifier Optimization for Large Language Model Alignment", arXiv:2404.04656.
    """
    h_w, h_l = _log_ratios("bco_pair", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    r_w, r_l = beta * h_w, beta * h_l
    losses = -F.logsigmoid(r_w - bco_delta) - F.logsigmoid(-(r_l - bco_delta))
    return losses, beta * h_w.detach(), beta * h_l.detach()


def sppo_hard_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> Losses:
    """SPPO with hard win probabilities (1 for the chosen, 0 for the rejected).

        loss = (h_w - 1 / (2 beta))^2 + (h_l + 1 / (2 beta))^2

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (B,).
        beta: inverse temperature (the paper's eta is 1 / beta).
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    Wu et al., "Self-Play Preference Optimization for Language Model Alignment", arXiv:2405.00675,
    Eq. 4.7 with P(y_w wins) = 1, P(y_l wins) = 0.
    """
    h_w, h_l = _log_ratios(
        "sppo_hard", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = (h_w - 0.5 / beta) ** 2 + (h_l + 0.5 / beta) ** 2
    return losses, beta * h_w.detach(), beta * h_l.detach()


def aot_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Losses:
    """AOT (paired): first-order stochastic dominance of the policy's log-odds over the reference's.

        d = sort_B(logp_w - logp_l) - sort_B(ref_w - ref_l)
        loss_i = -(1 - ls) log sigma(beta d_i) - ls log sigma(-beta d_i)

    The sort runs over the batch, so ``losses[i]`` belongs to the i-th quantile, not to pair i, and the
    loss depends on the batch composition (only the mean is meaningful).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (B,).
        beta: inverse temperature. label_smoothing: cDPO smoothing of the logistic loss.
    Returns:
        losses (B,) per quantile; chosen_rewards, rejected_rewards (B,) per pair.

    Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal Transport", NeurIPS 2024
    (arXiv:2406.05882).
    """
    h_w, h_l = _log_ratios("aot", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logratios = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0).values
    ref_logratios = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0).values
    losses = _smoothed_logistic(beta * (logratios - ref_logratios), label_smoothing)
    return losses, beta * h_w.detach(), beta * h_l.detach()


def aot_unpaired_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Losses:
    """AOT (unpaired): stochastic dominance of the chosen log-ratios over the rejected ones.

        d = sort_B(h_w) - sort_B(h_l)
        loss_i = -(1 - ls) log sigma(beta d_i) - ls log sigma(-beta d_i)

    As in ``aot_loss``, ``losses[i]`` belongs to the i-th quantile, not to pair i.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (B,).
        beta: inverse temperature. label_smoothing: cDPO smoothing of the logistic loss.
    Returns:
        losses (B,) per quantile; chosen_rewards, rejected_rewards (B,) per pair.

    Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal Transport", NeurIPS 2024
    (arXiv:2406.05882).
    """
    h_w, h_l = _log_ratios(
        "aot_unpaired", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    d = torch.sort(h_w, dim=0).values - torch.sort(h_l, dim=0).values
    losses = _smoothed_logistic(beta * d, label_smoothing)
    return losses, beta * h_w.detach(), beta * h_l.detach()


def apo_zero_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> Losses:
    """APO-zero: raise the chosen likelihood and lower the rejected one, each anchored at the reference.

        loss = 1 - sigma(beta h_w) + sigma(beta h_l)

    Use it when the chosen answers are better than the model's own.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (B,).
        beta: inverse temperature.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive Revisions",
    arXiv:2408.06266, Eq. 7.
    """
    h_w, h_l = _log_ratios("apo_zero", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = 1 - torch.sigmoid(beta * h_w) + torch.sigmoid(beta * h_l)
    return losses, beta * h_w.detach(), beta * h_l.detach()


def apo_down_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> Losses:
    """APO-down: lower the chosen likelihood, and the rejected one more.

        loss = sigma(beta h_w) + 1 - sigma(beta delta)

    Use it when the chosen answers are worse than the model's own.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (B,).
        beta: inverse temperature.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive Revisions",
    arXiv:2408.06266, Eq. 8.
    """
    h_w, h_l = _log_ratios("apo_down", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.sigmoid(beta * h_w) + 1 - torch.sigmoid(beta * (h_w - h_l))
    return losses, beta * h_w.detach(), beta * h_l.detach()


def discopop_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    discopop_tau: float = 0.05,
) -> Losses:
    """DiscoPOP (log-ratio modulated loss): a blend of the logistic and exponential losses.

        z = beta delta, m = sigma(z / tau)
        loss = (1 - m) (-log sigma(z)) + m exp(-z)

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (B,).
        beta: inverse temperature. discopop_tau: the modulation temperature tau.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    Chris Lu et al., "Discovering Preference Optimization Algorithms with and for Large Language
    Models", NeurIPS 2024 (arXiv:2406.08414), Eq. 5.
    """
    h_w, h_l = _log_ratios("discopop", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (h_w - h_l)
    m = torch.sigmoid(z / discopop_tau)
    losses = (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)
    return losses, beta * h_w.detach(), beta * h_l.detach()


def sigmoid_norm_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
) -> Losses:
    """Length-normalised DPO: the logistic loss on per-token log-ratios (TRL's ``"sigmoid_norm"``).

        loss = -log sigma(beta (h_w / |y_w| - h_l / |y_l|))

    Unlike SimPO it keeps the reference model.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (B,).
        chosen_lengths, rejected_lengths (B,): completion token counts.
        beta: inverse temperature (per token, so typically larger than DPO's).
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    Lambert et al., "Tulu 3: Pushing Frontiers in Open Language Model Post-Training",
    arXiv:2411.15124 (length-normalised DPO).
    """
    h_w, h_l = _log_ratios(
        "sigmoid_norm", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    len_w = _lengths("sigmoid_norm", chosen_lengths, "chosen_lengths", policy_chosen_logps)
    len_l = _lengths("sigmoid_norm", rejected_lengths, "rejected_lengths", policy_chosen_logps)
    delta = h_w / len_w - h_l / len_l
    losses = -F.logsigmoid(beta * delta)
    return losses, beta * h_w.detach(), beta * h_l.detach()


def sft_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    *,
    beta: float = 0.1,
) -> Losses:
    """Supervised NLL on the chosen completions, as TRL's ``"sft"`` computes it.

        loss_i = -sum_j logp_w,j / sum_j |y_w,j|   for every i

    This is the token-level mean over the whole batch (TRL's cross-entropy over all chosen tokens),
    broadcast to every pair, so the mean over pairs equals TRL's value. The loss does not read the
    reference, but the rewards are TRL's ``beta * (policy - ref)``, so it needs one as TRL does.

    Args:
        policy_chosen_logps, policy_rejected_logps (B,): summed policy log-probs.
        ref_chosen_logps, ref_rejected_logps (B,): summed reference log-probs (for the rewards).
        chosen_lengths (B,): chosen completion token counts.
        beta: scales the rewards only.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    The MLE term of MPO (Wang et al., arXiv:2411.10442), combined with DPO losses via ``loss_weights``.
    """
    h_w, h_l = _log_ratios("sft", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    len_w = _lengths("sft", chosen_lengths, "chosen_lengths", policy_chosen_logps)
    nll = -policy_chosen_logps.sum() / len_w.sum()
    losses = nll.expand(policy_chosen_logps.shape[0])
    return losses, beta * h_w.detach(), beta * h_l.detach()


# ---------------------------------------------------------------------------------------------
# Losses TRL keeps in other trainers or dropped (reference-free unless noted)


def cdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Losses:
    """Conservative DPO (cDPO): the logistic loss against labels flipped with probability ``label_smoothing``.

        loss = -(1 - ls) log sigma(beta delta) - ls log sigma(-beta delta)

    ``label_smoothing`` (ls) must lie in [0, 0.5); ls = 0 is ``sigmoid_loss``. This is what TRL 0.x's
    ``"sigmoid"`` computed with ``label_smoothing > 0``; TRL 1.x dropped it, so it has its own name here.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps (B,).
        beta: inverse temperature. label_smoothing: the flip probability.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    Mitchell, "A note on DPO with noisy preferences and relationship to IPO", 2023, Eq. 3.
    """
    h_w, h_l = _log_ratios("cdpo", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"loss_type='cdpo' needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    losses = _smoothed_logistic(beta * (h_w - h_l), label_smoothing)
    return losses, beta * h_w.detach(), beta * h_l.detach()


def slic_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    *,
    beta: float = 0.1,
    slic_delta: float = 1.0,
    slic_lambda: float = 1.0,
) -> Losses:
    """SLiC-HF: a hinge on the sequence log-likelihood margin plus NLL on the chosen completion.

        loss = max(0, slic_delta - logp_w + logp_l) - slic_lambda logp_w / |y_w|

    Reference-free, as in the paper: the calibration term compares raw likelihoods, and the NLL term
    (here on the chosen completion, per token) is what keeps the policy near the SFT model. The
    defaults are ours; the paper tunes both. ``beta`` only scales the reported rewards, ``beta * logp``.

    Args:
        policy_chosen_logps, policy_rejected_logps (B,): summed policy log-probs.
        chosen_lengths (B,): chosen completion token counts.
        slic_delta: the margin delta. slic_lambda: the NLL weight lambda.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", arXiv:2305.10425, Eq. 1.
    """
    len_w = _lengths("slic", chosen_lengths, "chosen_lengths", policy_chosen_logps)
    calibration = torch.relu(slic_delta - policy_chosen_logps + policy_rejected_logps)
    losses = calibration - slic_lambda * policy_chosen_logps / len_w
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    *,
    beta: float = 0.1,
    cpo_alpha: float = 1.0,
    label_smoothing: float = 0.0,
) -> Losses:
    """CPO: DPO's logistic loss with a uniform reference, plus NLL on the chosen completion.

        loss = -(1 - ls) log sigma(z) - ls log sigma(-z) - cpo_alpha logp_w / |y_w|,
        z = beta (logp_w - logp_l)

    Rewards are ``beta * logp`` (the DPO reward with the reference dropped), as in TRL's CPOTrainer.

    Args:
        policy_chosen_logps, policy_rejected_logps (B,): summed policy log-probs.
        chosen_lengths (B,): chosen completion token counts.
        beta: inverse temperature. cpo_alpha: NLL weight. label_smoothing: cDPO smoothing.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    Xu et al., "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in
    Machine Translation", ICML 2024 (arXiv:2401.08417).
    """
    len_w = _lengths("cpo", chosen_lengths, "chosen_lengths", policy_chosen_logps)
    z = beta * (policy_chosen_logps - policy_rejected_logps)
    losses = _smoothed_logistic(z, label_smoothing) - cpo_alpha * policy_chosen_logps / len_w
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> Losses:
    """SimPO: the logistic loss on length-normalised log-probs with a target margin, no reference.

        z = beta (logp_w / |y_w| - logp_l / |y_l|) - simpo_gamma
        loss = -(1 - ls) log sigma(z) - ls log sigma(-z)

    Rewards are SimPO's implicit reward ``beta * logp / |y|``. The paper uses beta around 2.0, not
    DPO's 0.1; ``simpo_gamma=0.5`` is TRL's CPOConfig default.

    Args:
        policy_chosen_logps, policy_rejected_logps (B,): summed policy log-probs.
        chosen_lengths, rejected_lengths (B,): completion token counts.
        beta: reward scale. simpo_gamma: target reward margin. label_smoothing: cDPO smoothing.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    Meng, Xia, Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    NeurIPS 2024 (arXiv:2405.14734), Eq. 6.
    """
    len_w = _lengths("simpo", chosen_lengths, "chosen_lengths", policy_chosen_logps)
    len_l = _lengths("simpo", rejected_lengths, "rejected_lengths", policy_chosen_logps)
    r_w = beta * policy_chosen_logps / len_w
    r_l = beta * policy_rejected_logps / len_l
    losses = _smoothed_logistic(r_w - r_l - simpo_gamma, label_smoothing)
    return losses, r_w.detach(), r_l.detach()


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
) -> Losses:
    """ORPO: NLL on the chosen completion plus a log-odds-ratio penalty, no reference.

        a = logp_w / |y_w|, b = logp_l / |y_l|            (per-token mean log-probs, < 0)
        log_odds = (a - b) - (log(1 - e^a) - log(1 - e^b))
        loss = -a - beta log sigma(log_odds)

    ``beta`` is the paper's lambda (as in TRL's ORPOTrainer). ``log(1 - e^x)`` is computed stably.
    Rewards are ``beta * a``, TRL's ORPOTrainer choice (the paper defines none).

    Args:
        policy_chosen_logps, policy_rejected_logps (B,): summed policy log-probs.
        chosen_lengths, rejected_lengths (B,): completion token counts.
        beta: weight lambda of the odds-ratio term.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).

    Hong, Lee, Thorne, "ORPO: Monolithic Preference Optimization without Reference Model",
    EMNLP 2024 (arXiv:2403.07691), Eqs. 6-7.
    """
    a = policy_chosen_logps / _lengths("orpo", chosen_lengths, "chosen_lengths", policy_chosen_logps)
    b = policy_rejected_logps / _lengths("orpo", rejected_lengths, "rejected_lengths", policy_chosen_logps)
    log_odds = (a - b) - (_log1mexp(a) - _log1mexp(b))
    losses = -a - beta * F.logsigmoid(log_odds)
    return losses, beta * a.detach(), beta * b.detach()


# ---------------------------------------------------------------------------------------------
# The name table and the dispatcher

LOSS_TYPES: dict[str, Callable[..., Losses]] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sft": sft_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "cdpo": cdpo_loss,
    "slic": slic_loss,
    "cpo": cpo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}


def _required(fn: Callable[..., Losses], arg: str) -> bool:
    param = inspect.signature(fn).parameters.get(arg)
    return param is not None and param.default is inspect.Parameter.empty


def _params(fn: Callable[..., Losses]) -> list[str]:
    """The loss's own keyword parameters (everything after ``beta``)."""
    sig = inspect.signature(fn).parameters.values()
    return [p.name for p in sig if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "beta"]


# Derived from the signatures, so the table and the functions cannot disagree.
REFERENCE_FREE: frozenset[str] = frozenset(
    name for name, fn in LOSS_TYPES.items() if not _required(fn, "ref_chosen_logps")
)


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
    return any(_required(LOSS_TYPES[name], arg) for name in _names(loss_type) for arg in _LENGTH_ARGS)


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
    **params: object,
) -> Losses:
    """Per-pair preference loss by name, or a weighted sum of several (TRL 1.x multi-loss).

        losses = sum_k loss_weights[k] * LOSS_TYPES[loss_type[k]](...)[0]

    TRL sums ``w_k * mean(loss_k)``; summing per pair first gives the same mean. The rewards are those
    of the first listed loss. Each loss receives only the arguments it takes: reference log-probs and
    lengths it does not use are ignored, and the ones it needs raise ``ValueError`` when missing.

    Args:
        loss_type: a name in ``LOSS_TYPES`` or a list of them.
        policy_chosen_logps, policy_rejected_logps (B,): summed policy log-probs.
        ref_chosen_logps, ref_rejected_logps (B,), optional: summed reference log-probs.
        beta: shared by every loss.
        chosen_lengths, rejected_lengths (B,), optional: completion token counts.
        **params: ``loss_weights`` (one float per loss, default 1.0 each) and the losses' own
            parameters (``label_smoothing``, ``discopop_tau``, ``bco_delta``, ``simpo_gamma``,
            ``cpo_alpha``, ``slic_delta``, ``slic_lambda``). With a list, each loss takes the ones it
            accepts; a parameter no listed loss accepts raises ``TypeError``.
    Returns:
        losses, chosen_rewards, rejected_rewards, each (B,).
    """
    names = _names(loss_type)
    weights = params.pop("loss_weights", None)
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(names)} loss types {names}")
    accepted = {p for name in names for p in _params(LOSS_TYPES[name])}
    unknown = sorted(set(params) - accepted)
    if unknown:
        hints = {u: difflib.get_close_matches(u, accepted, n=1) for u in unknown}
        hint = "".join(f" Did you mean {h[0]!r} for {u!r}?" for u, h in hints.items() if h)
        raise TypeError(f"unknown parameter(s) {unknown} for loss_type {names}; accepted: {sorted(accepted)}.{hint}")

    tensors = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
    }
    total, rewards = None, None
    for name, weight in zip(names, weights, strict=True):
        fn = LOSS_TYPES[name]
        fn_args = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in {**tensors, **params}.items() if k in fn_args}
        losses, chosen_rewards, rejected_rewards = fn(**kwargs, beta=beta)
        total = weight * losses if total is None else total + weight * losses
        if rewards is None:
            rewards = (chosen_rewards, rejected_rewards)
    return total, *rewards

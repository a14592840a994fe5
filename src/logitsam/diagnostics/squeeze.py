"""Squeezing diagnostics and TRL-named DPO metrics, computed from one head pass's ``HeadOutput``.

"Squeezing" (Ren & Sutherland, ICLR 2025, "Learning Dynamics of LLM Finetuning", Sec. 3.3): pushing
down the rejected response under softmax moves probability mass to the already-most-likely token,
so ``p(y*)`` rises, entropy falls, and the chosen response can fall too ("likelihood displacement",
Razin et al., ICLR 2025). Everything here uses only the per-row sums in ``HeadOutput`` (``logps``,
``lengths`` and the head statistics), so it costs no extra pass over the vocabulary.

Aggregation conventions (B pairs, rows ``[:B]`` chosen, ``[B:]`` rejected):

- "mean" is over pairs (sequences);
- "per-token" is token-weighted: ``sum over rows of the row sums / sum of lengths`` (each completion
  token counts once, as TRL averages token statistics). With no token at all the value is NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from logitsam.core import HeadOutput

from .hessian import logit_hessian_trace

_NAN = float("nan")


def _as_pairs(name: str, values: Tensor | None, like: Tensor) -> Tensor | None:
    """A (B,) float tensor on ``like``'s device, or None; raises naming ``name`` on a bad shape."""
    if values is None:
        return None
    values = torch.as_tensor(values).detach().to(device=like.device, dtype=like.dtype)
    if values.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)} (one value per pair), got {tuple(values.shape)}")
    return values


def _token_mean(sums: Tensor, lengths: Tensor, empty: float = _NAN) -> Tensor:
    """sum(sums) / sum(lengths); ``empty`` when there is no token."""
    total = lengths.sum().to(sums.dtype)
    return torch.where(total > 0, sums.sum() / total.clamp_min(1), empty)


def _mean_per_token(sums: Tensor, lengths: Tensor) -> Tensor:
    """Mean over rows with a completion token of ``sums / lengths``; NaN when there is none."""
    has = lengths > 0
    per_row = sums / lengths.clamp_min(1).to(sums.dtype)
    return torch.where(has.any(), (per_row * has).sum() / has.sum().clamp_min(1), _NAN)


def _floats(values: dict[str, Tensor]) -> dict[str, float]:
    """0-dim tensors to Python floats with one device sync."""
    return dict(zip(values, torch.stack([v.float() for v in values.values()]).tolist(), strict=True))


def squeeze_metrics(
    policy: HeadOutput,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    init_chosen_logps: Tensor | None = None,
    init_rejected_logps: Tensor | None = None,
    *,
    as_tensors: bool = False,
) -> dict[str, float] | dict[str, Tensor]:
    """Squeezing / likelihood-displacement metrics for one batch of B pairs.

    Keys (``s`` is ``chosen`` or ``rejected``; ``logps`` are sums over completion tokens):

    - ``squeeze/{s}_logps``: mean over pairs of ``log pi(y_s | x)``.
    - ``squeeze/{s}_logps_per_token``: mean of ``logps / length`` over rows with length > 0.
    - ``squeeze/{s}_delta_ref``: mean of ``log pi(y_s) - log ref(y_s)``, when the ref values are given.
    - ``squeeze/{s}_delta_init``: mean of ``log pi(y_s) - log pi_0(y_s)``, vs the same pair's log-prob
      at step 0, when ``init_{s}_logps`` are given.
    - ``squeeze/displacement_rate``: fraction of pairs with ``log pi(y+) < log ref(y+)`` (the chosen
      response lost likelihood; needs ``ref_chosen_logps``).
    - ``squeeze/both_down_rate``: fraction with both ``log pi(y+) < log ref(y+)`` and
      ``log pi(y-) < log ref(y-)`` (needs both ref values).
    - ``squeeze/argmax_prob_{s}``: per-token mean of ``max_v p_v``, the probability of the argmax token.
    - ``squeeze/argmax_logp_{s}``: per-token mean of ``log max_v p_v`` (the y* curve of the paper's Fig. 1c).
    - ``squeeze/entropy_{s}``: per-token mean entropy ``-sum_v p_v log p_v`` (nats).
    - ``squeeze/top1_{s}``: per-token rate of ``argmax_v p_v == label``.
    - ``squeeze/logit_hessian_trace``: mean over all 2B rows of ``sum_t (1 - sum_v p_{t,v}^2)``, the
      trace of the logit Hessian of the row's NLL (see ``hessian.logit_hessian_trace``).

    The statistic-based keys (argmax_prob, entropy, top1, logit_hessian_trace) are present only when
    ``policy`` was computed with ``with_stats=True``; the ref/init keys only when those are given.

    Args:
        policy: the head pass on the 2B rows (chosen first).
        ref_chosen_logps, ref_rejected_logps (B,): reference-model log-probs of the same rows.
        init_chosen_logps, init_rejected_logps (B,): the policy's log-probs of these pairs at step 0.
        as_tensors: return 0-dim device tensors (no host sync: what a training step keeps until it logs).
    Returns:
        ``{key: float}``.
    """
    B = policy.num_pairs
    if policy.logps.shape[0] != 2 * B or B == 0:
        raise ValueError(f"policy must hold 2B rows (chosen first) with B >= 1, got {policy.logps.shape[0]} rows")
    logps = policy.logps.detach().float()
    lengths = policy.lengths
    sides = {"chosen": slice(0, B), "rejected": slice(B, 2 * B)}
    given = {
        ("ref", "chosen"): _as_pairs("ref_chosen_logps", ref_chosen_logps, logps[:B]),
        ("ref", "rejected"): _as_pairs("ref_rejected_logps", ref_rejected_logps, logps[:B]),
        ("init", "chosen"): _as_pairs("init_chosen_logps", init_chosen_logps, logps[:B]),
        ("init", "rejected"): _as_pairs("init_rejected_logps", init_rejected_logps, logps[:B]),
    }
    out: dict[str, Tensor] = {}
    for side, rows in sides.items():
        out[f"squeeze/{side}_logps"] = logps[rows].mean()
        out[f"squeeze/{side}_logps_per_token"] = _mean_per_token(logps[rows], lengths[rows])
        for base in ("ref", "init"):
            if given[base, side] is not None:
                out[f"squeeze/{side}_delta_{base}"] = (logps[rows] - given[base, side]).mean()
    chosen_down = rejected_down = None
    if given["ref", "chosen"] is not None:
        chosen_down = logps[:B] < given["ref", "chosen"]
        out["squeeze/displacement_rate"] = chosen_down.float().mean()
    if given["ref", "rejected"] is not None:
        rejected_down = logps[B:] < given["ref", "rejected"]
    if chosen_down is not None and rejected_down is not None:
        out["squeeze/both_down_rate"] = (chosen_down & rejected_down).float().mean()
    if policy.sum_p2 is not None:
        for stat in ("argmax_prob", "argmax_logp", "entropy", "top1"):
            values = getattr(policy, stat)
            for side, rows in sides.items():
                out[f"squeeze/{stat}_{side}"] = _token_mean(values[rows], lengths[rows])
        out["squeeze/logit_hessian_trace"] = logit_hessian_trace(policy).mean()
    return out if as_tensors else _floats(out)


def dpo_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, policy: HeadOutput, *, as_tensors: bool = False
                ) -> dict[str, float] | dict[str, Tensor]:
    """The metrics TRL 1.x ``DPOTrainer`` logs, computed as it computes them on one process.

    With ``r+ = chosen_rewards``, ``r- = rejected_rewards`` (B,) (for DPO ``beta * (policy - ref)``):

    - ``rewards/chosen``, ``rewards/rejected``: mean of r+, r-.
    - ``rewards/accuracies``: mean of ``1[r+ > r-]`` (a tie counts as wrong).
    - ``rewards/margins``: mean of ``r+ - r-``.
    - ``logps/chosen``, ``logps/rejected``: mean over pairs of the summed completion log-probs.
    - ``logits/chosen``, ``logits/rejected``: the mean raw logit over completion tokens and vocabulary,
      ``sum_rows logits_sum / (V * sum_rows lengths)``; TRL's ``logits[mask].mean(-1).sum() / n_tokens``.
      0.0 when there is no completion token, as in TRL.
    - ``entropy``: per-token mean entropy over the completion tokens of all 2B rows.
    - ``mean_token_accuracy``: per-token rate of ``argmax == label`` over the chosen completions
      (0.0 without tokens, as in TRL; ``entropy`` is then NaN, TRL's mean of nothing).

    The last four need head statistics and are present only when ``policy`` has them.
    Across processes TRL gathers before averaging; this is the per-batch value.

    Args:
        chosen_rewards, rejected_rewards (B,): from the loss function.
        policy: the head pass on the 2B rows (chosen first).
        as_tensors: return 0-dim device tensors instead of floats (no host sync).
    Returns:
        ``{key: float}``.
    """
    B = policy.num_pairs
    chosen_rewards = _as_pairs("chosen_rewards", chosen_rewards, policy.logps.detach().float()[:B])
    rejected_rewards = _as_pairs("rejected_rewards", rejected_rewards, chosen_rewards)
    logps = policy.logps.detach().float()
    out = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": logps[:B].mean(),
        "logps/rejected": logps[B:].mean(),
    }
    if policy.logits_sum is not None:
        lengths = policy.lengths
        for side, rows in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
            tokens = lengths[rows].sum() * policy.vocab_size
            out[f"logits/{side}"] = policy.logits_sum[rows].sum() / tokens.clamp_min(1)  # 0 / 1 = 0 if empty
        out["entropy"] = _token_mean(policy.entropy, lengths)
        out["mean_token_accuracy"] = _token_mean(policy.top1[:B], lengths[:B], empty=0.0)
    return out if as_tensors else _floats(out)

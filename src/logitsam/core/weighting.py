"""Per-sequence log-prob variants and pair weights that TRL 1.16's DPOConfig offers around the loss.

Both act on one head pass (a ``HeadOutput``), so the clean and the logits-SAM-perturbed pass use them alike:

* LD-DPO (``ld_alpha``): the log-prob of a completion with its verbose tail down-weighted,
      log pi_ld(y | x) = sum_{t <= l_s} log pi(y_t | ...) + alpha * sum_{t > l_s} log pi(y_t | ...),
  where ``l_s = min(|y_w|, |y_l|)`` is the pair's shared length (Liu et al., "Length Desensitization in
  Direct Preference Optimization", arXiv:2409.06411, Eq. 11). It replaces the summed log-probs of policy
  *and* reference; alpha = 1 is plain DPO.
* WPO (``use_weighting``): each pair's loss times
      w = exp(mean_t [log pi(y_w,t) - log sum_v pi_v(t)^2]) * exp(the same mean over y_l),
  detached (Zhou et al., "WPO: Enhancing RLHF with Weighted Preference Optimization", EMNLP 2024,
  arXiv:2406.11827, Eq. 2 with TRL's aligned per-token normaliser). The weights come from the pass that
  carries statistics: under logits-SAM the clean pass, and the perturbed pass reuses them, so the weights
  are constants of the step at ``w`` and eps perturbs only the loss they multiply.
"""

from __future__ import annotations

import torch

from .head import IGNORE_INDEX, HeadOutput


def ld_logps(token_logps: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO's per-row log-probs: the first ``l_s`` completion tokens in full, the rest times ``alpha``.

    Args:
        token_logps (2B, T): per-token log-probs, chosen rows first (``HeadOutput.token_logps``).
        labels (2B, T): the shifted labels, ``-100`` outside the completion.
        alpha: the weight of the tokens past the pair's shared length.
    Returns:
        (2B,) weighted sums; differentiable through ``token_logps``.
    """
    mask = labels != IGNORE_INDEX
    position = mask.cumsum(dim=1)  # 1, 2, ... along each completion
    lengths = mask.sum(dim=1)
    chosen, rejected = lengths.chunk(2)
    shared = torch.minimum(chosen, rejected).repeat(2)[:, None]  # (2B, 1)
    zero = token_logps.new_zeros(())
    head = torch.where(mask & (position <= shared), token_logps, zero).sum(dim=1)
    tail = torch.where(mask & (position > shared), token_logps, zero).sum(dim=1)
    return head + alpha * tail


def wpo_weights(out: HeadOutput) -> torch.Tensor:
    """WPO's pair weights (B,) from a head pass run with statistics (``log_sum_p2``); detached, positive.

    A completion's factor is 1 when each token's probability equals ``sum_v pi_v^2``, the expected probability
    of a token sampled from the policy itself: on-policy pairs weigh about 1, off-policy ones less.
    """
    if out.log_sum_p2 is None:
        raise ValueError("wpo_weights needs a head pass with statistics (with_stats=True): log_sum_p2 is None")
    lengths = out.lengths.clamp(min=1).to(torch.float32)
    mean = (out.logps.detach().float() - out.log_sum_p2.float()) / lengths
    weight = mean.exp()
    chosen, rejected = weight.chunk(2)
    return chosen * rejected

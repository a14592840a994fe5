"""CHES, the per-pair predictor of likelihood displacement, and a normalised token edit distance.

Razin et al., "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization"
(ICLR 2025, Sec. 5, Def. 2). With ``h_{x,y<k}`` the last hidden state at the position that predicts
token ``k`` of response ``y``, and ``S_y = sum_k h_{x,y<k}`` (``|y|`` positions, from the last prompt
token to the second-to-last response token):

    CHES(x, y+, y-)      = <S+, S-> - ||S+||^2
    CHES_norm(x, y+, y-) = <S+, S-> / (|y+| |y-|) - ||S+||^2 / |y+|^2

A large CHES means the rejected response's hidden states point along the chosen one's, so pushing
``y-`` down also pushes ``y+`` down. The normalised form matches the authors' code
(``compute_ches_scores(..., length_normalize=True)``, github.com/princeton-pli/unintentional-unalignment).
They pair CHES with the normalised edit distance between the two responses, which it outperforms as
a predictor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from logitsam.core import IGNORE_INDEX


def ches_scores(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """CHES and length-normalised CHES for B pairs.

        S[r] = sum_{t : labels[r, t] != -100} hidden[r, t]          (R, d)
        ches[i]      = <S[i], S[i+B]> - ||S[i]||^2
        ches_norm[i] = <S[i], S[i+B]> / (n[i] n[i+B]) - ||S[i]||^2 / n[i]^2,   n[r] = #completion positions

    Args:
        hidden (R=2B, T, d): final hidden states (the LM head's input), chosen rows first.
        labels (R, T): the token each position predicts (already shifted, as for the head), -100 where
            ignored; so the positions counted are exactly those that predict a response token.
    Returns:
        ches (B,), ches_norm (B,) in float32 (float64 for float64 input), detached. ``ches_norm`` is
        NaN for a pair where either response has no completion position.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2] or hidden.shape[0] % 2:
        raise ValueError(
            f"expected hidden (2B, T, d) and labels (2B, T); got hidden {tuple(hidden.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    B = hidden.shape[0] // 2
    h = hidden.detach().to(torch.promote_types(hidden.dtype, torch.float32))
    mask = (labels != IGNORE_INDEX).to(h.dtype)  # (R, T)
    S = torch.einsum("rt,rtd->rd", mask, h)  # (R, d)
    n = mask.sum(1)  # (R,)
    s_pos, s_neg = S[:B], S[B:]
    cross = (s_pos * s_neg).sum(-1)  # (B,)
    sq = s_pos.square().sum(-1)  # (B,)
    ches = cross - sq
    n_pos, n_neg = n[:B], n[B:]
    empty = (n_pos == 0) | (n_neg == 0)
    ches_norm = cross / (n_pos * n_neg).clamp_min(1) - sq / n_pos.square().clamp_min(1)
    return ches, ches_norm.masked_fill(empty, float("nan"))


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (unit-cost insert, delete, substitute) between two token sequences.

    Bit-parallel dynamic programming (Myers, J. ACM 1999; Hyyro 2001's global-distance form): one
    column of the ``(len(a)+1, len(b)+1)`` DP table is held as bit vectors of +-1 vertical deltas in
    Python integers, so the cost is ``len(b)`` big-integer steps instead of ``len(a) * len(b)`` cells.
    Equals the textbook ``D[i][j] = min(D[i-1][j] + 1, D[i][j-1] + 1, D[i-1][j-1] + [a_i != b_j])``.
    """
    m = len(a)
    if m == 0:
        return len(b)
    mask = (1 << m) - 1
    top = 1 << (m - 1)
    peq: dict[int, int] = {}
    for i, token in enumerate(a):
        peq[token] = peq.get(token, 0) | (1 << i)
    pv, mv, score = mask, 0, m  # column 0: D[i][0] = i, every vertical delta is +1
    for token in b:
        eq = peq.get(token, 0)
        xv = eq | mv
        xh = ((((eq & pv) + pv) & mask) ^ pv) | eq
        ph = mv | (~(xh | pv) & mask)
        mh = pv & xh
        if ph & top:
            score += 1
        elif mh & top:
            score -= 1
        ph = ((ph << 1) | 1) & mask  # row 0: D[0][j] = j, so the delta shifted in is +1
        mh = (mh << 1) & mask
        pv = mh | (~(xv | ph) & mask)
        mv = ph & xv
    return score


def normalized_edit_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """``edit_distance(a, b) / max(len(a), len(b))`` in [0, 1]; 0.0 for two empty sequences."""
    longest = max(len(a), len(b))
    return edit_distance(a, b) / longest if longest else 0.0

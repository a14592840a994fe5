"""Training diagnostics: tensors in, numbers out. Imports torch, the standard library and ``logitsam.core``.

- ``squeeze``: squeezing / likelihood-displacement metrics and TRL-named DPO metrics from a ``HeadOutput``.
- ``ches``: CHES (Razin et al., ICLR 2025) and the normalised token edit distance.
- ``hessian``: the closed-form logit-Hessian trace and a Hutchinson parameter-Hessian trace.
"""

from .ches import ches_scores, edit_distance, normalized_edit_distance
from .hessian import hutchinson_trace, logit_hessian_trace
from .squeeze import dpo_metrics, squeeze_metrics

__all__ = [
    "ches_scores",
    "dpo_metrics",
    "edit_distance",
    "hutchinson_trace",
    "logit_hessian_trace",
    "normalized_edit_distance",
    "squeeze_metrics",
]

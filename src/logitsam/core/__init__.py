"""Pure math: preference losses, LM-head log-prob ops and the SAM steps. Imports torch only."""

from .head import IGNORE_INDEX, HeadOutput, dense_head_logps, shift_labels
from .head_chunked import chunked_head_logps
from .sam import (
    VARIANTS,
    Ascent,
    FullSAM,
    first_order_ratio,
    head_fn,
    logits_sam,
    sam_ascent,
    sam_perturbation,
    sequence_logps,
)

__all__ = [
    "IGNORE_INDEX",
    "VARIANTS",
    "Ascent",
    "first_order_ratio",
    "FullSAM",
    "HeadOutput",
    "chunked_head_logps",
    "dense_head_logps",
    "head_fn",
    "logits_sam",
    "sam_ascent",
    "sam_perturbation",
    "sequence_logps",
    "shift_labels",
]

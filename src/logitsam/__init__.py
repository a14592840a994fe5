"""logitsam: preference optimization (DPO and variants) with logits-SAM on the LM head."""

from .core import FullSAM, HeadOutput, chunked_head_logps, dense_head_logps, logits_sam, sequence_logps

__version__ = "0.1.0"

__all__ = [
    "FullSAM",
    "HeadOutput",
    "chunked_head_logps",
    "dense_head_logps",
    "logits_sam",
    "sequence_logps",
    "__version__",
]

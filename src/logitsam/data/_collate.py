"""Pad tokenised preference pairs into one (2B, T) batch: chosen rows first, then rejected."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class PreferenceCollator:
    """Collate B examples into one right-padded batch of 2B rows; row ``i`` and row ``i + B`` are a pair.

    Args:
        pad_token_id: id written into ``input_ids`` at padding (masked out by ``attention_mask``).
        pad_to_multiple_of: round T up to a multiple of this (None: the longest row).

    Returns (from ``__call__``):
        ``input_ids (2B, T)`` long, ``attention_mask (2B, T)`` long, ``labels (2B, T)`` long with -100 at
        the prompt and at padding; ``completion_index (n,)`` long, the flat positions ``r * T + t`` whose next
        token is a label (``labels[r, t + 1] != -100``: the positions the LM head scores, found here on the
        host so the training step has no data-dependent shape); ``index (B,)`` long when the examples have an
        ``index``; and
        ``ref_chosen_logps (B,)``, ``ref_rejected_logps (B,)`` float32 when the examples have them.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        labels = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
        T = max(len(row) for row in ids)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(ids), T), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(ids), T), dtype=torch.long),
            "labels": torch.full((len(ids), T), IGNORE_INDEX, dtype=torch.long),
        }
        for r, (row_ids, row_labels) in enumerate(zip(ids, labels, strict=True)):
            n = len(row_ids)
            assert len(row_labels) == n, f"row {r}: {n} input_ids but {len(row_labels)} labels"
            batch["input_ids"][r, :n] = torch.as_tensor(row_ids, dtype=torch.long)
            batch["attention_mask"][r, :n] = 1
            batch["labels"][r, :n] = torch.as_tensor(row_labels, dtype=torch.long)
        predicts = batch["labels"][:, 1:] != IGNORE_INDEX  # (2B, T - 1): position t predicts token t + 1
        rows, cols = predicts.nonzero(as_tuple=True)
        batch["completion_index"] = rows * T + cols
        if "index" in features[0]:
            batch["index"] = torch.tensor([int(f["index"]) for f in features], dtype=torch.long)
        for key in REF_COLUMNS:
            if key in features[0]:
                batch[key] = torch.tensor([float(f[key]) for f in features], dtype=torch.float32)
        return batch

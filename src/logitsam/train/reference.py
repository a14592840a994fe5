"""Reference log-probs: one pass before training, cached on disk by a fingerprint.

The fingerprint covers the reference weights, the tokenised pairs and the head settings, so a
changed model, dataset, tokenisation or dtype never reuses a stale cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from ..core import sequence_logps
from ..core.head import shift_labels
from ..data import PreferenceCollator
from ..models import cache_root, forward_hidden, lm_head_of, reference_context

logger = logging.getLogger("logitsam.train")
COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def model_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(dataset) -> str:
    h = hashlib.blake2b(digest_size=16)
    for column in COLUMNS:
        for row in dataset[column]:
            h.update(len(row).to_bytes(4, "little"))
            h.update(torch.as_tensor(row, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def compute_reference_logps(model, dataset, *, pad_token_id: int, batch_size: int = 8, chunk_size=None,
                            use_adapter_off: bool = False, desc: str = "reference log-probs"):
    """Per-pair summed log-probs of ``model`` (adapters disabled when ``use_adapter_off``): (N,), (N,)."""
    collate = PreferenceCollator(pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    ctx = reference_context(model) if use_adapter_off else nullcontext()
    with ctx:
        for start in tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch"):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            hidden = forward_hidden(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            out = sequence_logps(hidden, lm_head_of(model), shift_labels(batch["labels"]).to(device),
                                 chunk_size=chunk_size, with_stats=False)
            chosen.append(out.chosen_logps.float().cpu())
            rejected.append(out.rejected_logps.float().cpu())
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def cached_reference_logps(model, dataset, *, pad_token_id: int, batch_size: int = 8, chunk_size=None,
                           use_adapter_off: bool = False, cache_dir=None, desc: str = "reference log-probs"):
    """``compute_reference_logps`` with an on-disk cache keyed by model + data + settings."""
    key = hashlib.blake2b(digest_size=16)
    key.update(model_fingerprint(model).encode())
    key.update(dataset_fingerprint(dataset).encode())
    key.update(f"{next(model.parameters()).dtype}|{chunk_size}|{use_adapter_off}".encode())
    path = cache_root(cache_dir) / "ref_logps" / f"{key.hexdigest()}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        logger.info("reference log-probs reused from cache %s", path)
        return saved["chosen"], saved["rejected"]
    chosen, rejected = compute_reference_logps(
        model, dataset, pad_token_id=pad_token_id, batch_size=batch_size, chunk_size=chunk_size,
        use_adapter_off=use_adapter_off, desc=desc,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save({"chosen": chosen, "rejected": rejected}, tmp)
    os.replace(tmp, path)
    logger.info("reference log-probs cached at %s", path)
    return chosen, rejected


def add_reference_columns(dataset, chosen: torch.Tensor, rejected: torch.Tensor):
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
    dataset = dataset.add_column("ref_chosen_logps", chosen.tolist())
    return dataset.add_column("ref_rejected_logps", rejected.tolist())

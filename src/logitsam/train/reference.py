"""Reference log-probs: one pass over the pairs the run will read, on the training device, cached on disk.

Which pairs: ``consumed_indices`` walks the Trainer's own train sampler through the run's optimizer
steps, so ``--max_steps 3`` computes 3 x batch x accumulation x world pairs (and one look-ahead
batch), not the whole file. The other rows hold NaN, and ``RequireReference`` turns a batch that
would read one into an error instead of a loss against a made-up reference.

Where: on the device the model sits on (the caller places it where the Trainer trains). Under
several processes each rank computes its own share; the shares are gathered once and only the
main process writes the cache file atomically (``logitsam._atomic``: a temporary name, then ``os.replace``).

Cache key: ``model_identity`` (config, name/path, revision, and every parameter's name, shape, dtype
and a strided sample of its elements: no full pass over the weights), the tokenised pairs and the head
settings. The file holds one value per row, NaN where not computed yet, so a longer run later
computes only the rows it adds.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from contextlib import nullcontext

import torch
from torch.utils.data import SequentialSampler
from tqdm.auto import tqdm

from .._atomic import atomic_path
from ..core import sequence_logps
from ..core.head import shift_labels
from ..core.weighting import ld_logps
from ..data import PreferenceCollator
from ..models import cache_root, forward_hidden, lm_head_of, reference_context, unwrap_model

logger = logging.getLogger("logitsam.train")
COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


# ---- cache key ------------------------------------------------------------------------------------
def _strided_sample(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` evenly spaced elements of ``tensor`` (all of them if it is smaller), on the CPU."""
    t = tensor.detach()
    if t.numel() <= n:
        return t.reshape(-1).cpu()
    flat = (torch.arange(n, dtype=torch.float64) * ((t.numel() - 1) / (n - 1))).long()
    # advanced indexing gathers only n elements, whatever the layout (no contiguous copy of t)
    return t[torch.unravel_index(flat.to(t.device), t.shape)].cpu()


def model_identity(model: torch.nn.Module, *, samples: int = 256) -> str:
    """A cheap fingerprint of a model's weights, the same on every rank and device.

    Hashes the config, ``_name_or_path`` and hub revision, and for every parameter its name, shape,
    dtype and the bytes of ``samples`` evenly spaced elements (first and last included): for a 7B
    model about 300 x 256 values instead of 14 GB per rank. PEFT adapters (``lora_`` parameters) are
    left out: the reference is the model with them off. Training or merging moves every element of
    a tensor it touches, so it moves the key; a change confined to unsampled elements is not seen,
    the price of not reading every byte.
    """
    base = unwrap_model(model)
    h = hashlib.blake2b(digest_size=16)
    h.update(base.config.to_json_string(use_diff=False).encode())
    h.update(f"{base.config._name_or_path}|{getattr(base.config, '_commit_hash', None)}".encode())
    for name, p in base.named_parameters():
        if "lora_" in name:
            continue
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype};".encode())
        h.update(_strided_sample(p, samples).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(dataset) -> str:
    h = hashlib.blake2b(digest_size=16)
    for column in COLUMNS:
        for row in dataset[column]:
            h.update(len(row).to_bytes(4, "little"))
            h.update(torch.as_tensor(row, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


# ---- which rows the run reads ------------------------------------------------------------------
def _base_sampler(dataloader):
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    inner = getattr(batch_sampler, "batch_sampler", batch_sampler)  # accelerate's BatchSamplerShard wraps one
    return batch_sampler, getattr(inner, "sampler", None)


def consumed_indices(dataloader, *, max_steps: int, num_train_epochs: float, grad_accum: int) -> list[int] | None:
    """Sorted indices of the rows this process reads from ``dataloader`` during training.

    Replays the Trainer's epoch loop over the prepared train dataloader's index batches (no data is
    loaded): ``max_steps`` optimizer steps of ``grad_accum`` micro-batches, or ``num_train_epochs``
    epochs when ``max_steps <= 0``, with ``set_epoch`` as the Trainer calls it, plus the one batch
    that accelerate reads ahead (collated, never trained on). Returns None when the order cannot be
    replayed (a sampler that draws from the global RNG, or batches dispatched from rank 0): the
    caller then computes every row. A resumed run reads a subset of these rows.
    """
    from accelerate.data_loader import SeedableRandomSampler

    batch_sampler, sampler = _base_sampler(dataloader)
    if batch_sampler is None or type(sampler) not in (SeedableRandomSampler, SequentialSampler) \
            or type(dataloader).__name__ == "DataLoaderDispatcher":
        return None
    per_epoch = max(math.ceil(len(dataloader) / grad_accum), 1)  # as Trainer.set_initial_training_values
    total = max_steps if max_steps > 0 else math.ceil(num_train_epochs * per_epoch)
    rows: set[int] = set()
    done, epoch, n = 0, 0, len(dataloader.dataset)
    while done < total and len(rows) < n:
        for target in (dataloader, getattr(batch_sampler, "batch_sampler", None)):  # as Trainer._run_epoch
            if hasattr(target, "set_epoch"):
                target.set_epoch(epoch)
        updates = min(per_epoch, total - done)
        # + 1: accelerate's DataLoaderShard collates one batch ahead of the one it yields
        for batch in itertools.islice(iter(batch_sampler), min(len(dataloader), updates * grad_accum + 1)):
            rows.update(int(i) for i in batch)
        done, epoch = done + updates, epoch + 1
    return sorted(rows)


# ---- the pass ------------------------------------------------------------------------------------
@torch.no_grad()
def compute_reference_logps(model, dataset, indices=None, *, pad_token_id: int, batch_size: int = 8,
                            chunk_size=None, use_adapter_off: bool = False, ld_alpha: float | None = None,
                            desc: str = "reference log-probs"):
    """Summed log-probs of ``dataset[indices]`` (all rows when None) under ``model``: (n,), (n,).

    With ``ld_alpha`` the sums are LD-DPO's (``core.weighting.ld_logps``), as the loss reads them.

    Runs on the device ``model`` sits on; adapters are disabled when ``use_adapter_off``. A NaN
    value is an error here, since NaN marks "not computed" in the cache and the dataset columns.
    """
    indices = list(range(len(dataset))) if indices is None else list(indices)
    collate = PreferenceCollator(pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    ctx = reference_context(model) if use_adapter_off else nullcontext()
    with ctx:
        for start in tqdm(range(0, len(indices), batch_size), desc=desc, unit="batch"):
            batch = collate([dataset[i] for i in indices[start:start + batch_size]])
            hidden = forward_hidden(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            labels = shift_labels(batch["labels"]).to(device)
            out = sequence_logps(hidden, lm_head_of(model), labels, chunk_size=chunk_size, with_stats=False)
            logps = out.logps if ld_alpha is None else ld_logps(out.token_logps, labels, ld_alpha)
            half = logps.shape[0] // 2
            chosen.append(logps[:half].float().cpu())
            rejected.append(logps[half:].float().cpu())
    model.train(was_training)
    if not indices:
        return torch.empty(0), torch.empty(0)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    bad = torch.isnan(chosen) | torch.isnan(rejected)
    if bad.any():
        rows = [indices[i] for i in bad.nonzero().flatten().tolist()[:5]]
        raise FloatingPointError(f"the reference pass gave NaN log-probs for dataset rows {rows}; "
                                 "check the reference model's dtype and weights")
    return chosen, rejected


def _gather(indices: list[int], chosen: torch.Tensor, rejected: torch.Tensor):
    """Every rank's (indices, chosen, rejected), concatenated; as given when not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return indices, chosen, rejected
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (indices, chosen, rejected))
    return ([i for p in parts for i in p[0]], torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def cached_reference_logps(model, dataset, indices=None, *, pad_token_id: int, batch_size: int = 8,
                           chunk_size=None, use_adapter_off: bool = False, ld_alpha: float | None = None,
                           cache_dir=None, desc: str = "reference log-probs"):
    """Reference log-probs of every row of ``dataset``: (N,), (N,), NaN where not computed.

    ``indices`` are this process's rows (None: all); rows missing from the on-disk cache are
    computed here, gathered from all ranks, merged into the cache and written by the main process.
    Every rank gets the same tensors. Collective under torch.distributed: call it on every rank.
    """
    key = hashlib.blake2b(digest_size=16)
    key.update(model_identity(model).encode())
    key.update(dataset_fingerprint(dataset).encode())
    key.update(f"{next(model.parameters()).dtype}|{chunk_size}|{use_adapter_off}".encode())
    if ld_alpha is not None:  # (absent otherwise: the caches written before LD-DPO existed stay valid)
        key.update(f"|ld_alpha={ld_alpha!r}".encode())
    path = cache_root(cache_dir) / "ref_logps" / f"{key.hexdigest()}.pt"
    n = len(dataset)
    chosen, rejected = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
    if path.exists():
        saved = torch.load(path, weights_only=True)
        if saved["chosen"].shape == (n,):
            chosen, rejected = saved["chosen"], saved["rejected"]
        else:
            logger.warning("ignoring reference cache %s: %d rows, the dataset has %d", path, len(saved["chosen"]), n)
    wanted = range(n) if indices is None else indices
    have = (~torch.isnan(chosen)).tolist()
    missing = [i for i in wanted if not have[i]]
    if missing:
        logger.info("%s: this process reads %d of %d rows; %d in the cache, computing %d on %s", desc, len(wanted),
                    n, len(wanted) - len(missing), len(missing), next(model.parameters()).device)
    else:
        logger.info("%s reused from cache %s (%d of %d rows read by this process)", desc, path, len(wanted), n)
    new = compute_reference_logps(model, dataset, missing, pad_token_id=pad_token_id, batch_size=batch_size,
                                  chunk_size=chunk_size, use_adapter_off=use_adapter_off, ld_alpha=ld_alpha,
                                  desc=desc)
    rows, new_chosen, new_rejected = _gather(missing, *new)
    if rows:
        chosen[rows], rejected[rows] = new_chosen, new_rejected
        if _is_main_process():
            with atomic_path(path) as tmp:
                torch.save({"chosen": chosen, "rejected": rejected}, tmp)
            logger.info("reference log-probs cached at %s (%d of %d rows)", path, int((~chosen.isnan()).sum()), n)
    return chosen, rejected


def add_reference_columns(dataset, chosen: torch.Tensor, rejected: torch.Tensor):
    for name in REF_COLUMNS:
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
    dataset = dataset.add_column("ref_chosen_logps", chosen.tolist())
    return dataset.add_column("ref_rejected_logps", rejected.tolist())


class RequireReference:
    """Wraps a collator: a batch with a pair whose reference log-prob was not precomputed is an error.

    The precompute covers only the rows the run was planned to read (NaN elsewhere); if training ever
    reads another row, this stops it rather than compute a loss against a NaN or stale reference.
    """

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, features):
        batch = self.collate(features)
        for key in REF_COLUMNS:
            if key in batch and torch.isnan(batch[key]).any():
                rows = [f.get("index") for f, bad in zip(features, torch.isnan(batch[key]).tolist(), strict=True)
                        if bad]
                raise RuntimeError(f"a training batch holds pairs without a precomputed {key} (dataset 'index' "
                                   f"{rows[:5]}): the run read rows the precompute did not plan for; set "
                                   "precompute_ref_log_probs: false or report this with your config")
        return batch

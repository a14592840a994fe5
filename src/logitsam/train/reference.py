"""Reference log-probs: one pass over the pairs the run will read, as training runs the model, cached on disk.

Which pairs: ``consumed_indices`` walks the Trainer's own train sampler through the run's optimizer
steps, so ``--max_steps 3`` computes 3 x batch x accumulation x world pairs (and one look-ahead
batch), not the whole file. The other rows hold NaN, and ``ReferenceLookup`` turns a batch that
would read one into an error instead of a loss against a made-up reference.

When and how: at train begin (``ReferencePrecompute``), after the Trainer has placed, wrapped, sharded and
(on resume) restored the models: the pass runs through the prepared model (DDP, an FSDP2 root that has
broadcast rank 0's weights, a DeepSpeed engine) on the training device, inside the wrapper's forward
(``head_inside_forward``: a sharded head is gathered there) and under the run's autocast, so a precomputed
reference equals the live one at step 0. Each rank computes its share; ranks with fewer batches run stand-in
batches so every rank issues the same collectives; the shares are gathered once.

Cache key: ``model_identity`` (config, name/path, revision, and every parameter's name, shape, dtype
and a strided sample of its elements: no full pass over the weights), taken on rank 0 before the model is
sharded and broadcast (``shared_identity``), the tokenised pairs, the compute precision (autocast dtype,
float32 matmul precision) and the head settings. Rank 0 reads the file and broadcasts it; it merges new
rows under a file lock (two runs sharing ``LOGITSAM_CACHE`` lose none) and writes atomically
(``logitsam._atomic``). The file holds one value per row, NaN where not computed yet, so a longer run later
computes only the rows it adds.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import logging
import math
from contextlib import nullcontext

import torch
from filelock import FileLock
from torch.utils.data import SequentialSampler
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .._atomic import atomic_path
from ..core import sequence_logps
from ..core.head import reduced_fp32_matmul, shift_labels
from ..core.weighting import ld_logps
from ..data import PreferenceCollator
from ..models import cache_root, reference_context, unwrap_model
from ._inside import head_inside_forward

logger = logging.getLogger("logitsam.train")
COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
REF_ROW = "ref_row"  # a pair's row in the run's reference table: train rows first, then eval rows


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
        with _gathered(p):  # ZeRO-3: the whole tensor for the moment (a collective: every rank calls this)
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype};".encode())
            h.update(_strided_sample(p, samples).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _gathered(p):
    if not hasattr(p, "ds_id"):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p])


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shared_identity(model: torch.nn.Module) -> str:
    """``model_identity`` as rank 0 sees it, on every rank (collective under torch.distributed).

    Call it before the model is sharded. With CPU-RAM-efficient loading only rank 0 is sure to hold the real
    weights until FSDP broadcasts them, so the key comes from rank 0; a ZeRO-3 model is partitioned from load on,
    and every rank gathers each tensor in turn.
    """
    import torch.distributed as dist

    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return model_identity(model)
    if not _distributed():
        return model_identity(model)
    box = [model_identity(model) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def compute_settings(accelerator=None, device=None) -> str:
    """The precision the reference pass runs in, for the cache key: the autocast (mixed precision) and whether
    float32 matmuls round their inputs (TF32, ``set_float32_matmul_precision("high"/"medium")``)."""
    mixed = getattr(accelerator, "mixed_precision", "no") if accelerator is not None else "no"
    return f"mixed={mixed}|reduced_fp32_matmul={reduced_fp32_matmul(device)}"


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
                            desc: str = "reference log-probs", device=None, autocast=None, batches: int = 0):
    """Summed log-probs of ``dataset[indices]`` (all rows when None) under ``model``: (n,), (n,).

    With ``ld_alpha`` the sums are LD-DPO's (``core.weighting.ld_logps``), as the loss reads them.

    ``model`` may be prepared (DDP, an FSDP2 root, a DeepSpeed engine): the head pass runs inside its forward
    (``head_inside_forward``), as in training, on ``device`` (default: the first parameter's) and under
    ``autocast`` (a context manager factory, e.g. ``accelerator.autocast``; default none). ``batches``: run at
    least this many forwards, the extra ones on a stand-in batch whose values are dropped, so every rank of a
    sharded model issues the same collectives. Adapters are disabled when ``use_adapter_off``. A NaN value is an
    error here, since NaN marks "not computed" in the cache and the lookup table.
    """
    indices = list(range(len(dataset))) if indices is None else list(indices)
    collate = PreferenceCollator(pad_token_id)
    device = device if device is not None else next(model.parameters()).device
    own = -(-len(indices) // batch_size)
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    ctx = reference_context(model) if use_adapter_off else nullcontext()
    with ctx:
        for b in tqdm(range(max(own, batches)), desc=desc, unit="batch"):
            rows = indices[b * batch_size:(b + 1) * batch_size] or [indices[0] if indices else 0]
            batch = collate([dataset[i] for i in rows])
            labels = shift_labels(batch["labels"]).to(device)
            index = batch["completion_index"].to(device)

            def head_pass(hidden, head, labels=labels, index=index):  # where a sharded head is gathered
                out = sequence_logps(hidden, head, labels, chunk_size=chunk_size, with_stats=False, index=index)
                return out.logps if ld_alpha is None else ld_logps(out.token_logps, labels, ld_alpha)

            with autocast() if autocast is not None else nullcontext():
                logps = head_inside_forward(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                            head_pass)
            if b < own:
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

    if not _distributed():
        return indices, chosen, rejected
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (indices, chosen, rejected))
    return ([i for p in parts for i in p[0]], torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))


def _max_over_ranks(n: int) -> int:
    import torch.distributed as dist

    if not _distributed():
        return n
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, n)
    return max(values)


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _read_cache(path, n: int):
    """(chosen, rejected) from the cache file, NaN where absent; rank 0 reads and broadcasts to the others."""
    import torch.distributed as dist

    box = [None]
    if _is_main_process():
        chosen, rejected = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
        if path.exists():
            saved = torch.load(path, weights_only=True)
            if saved["chosen"].shape == (n,):
                chosen, rejected = saved["chosen"], saved["rejected"]
            else:
                logger.warning("ignoring reference cache %s: %d rows, the dataset has %d", path,
                               len(saved["chosen"]), n)
        box = [(chosen, rejected)]
    if _distributed():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _merge_into_cache(path, n: int, rows: list[int], chosen: torch.Tensor, rejected: torch.Tensor):
    """Write ``rows`` into the cache file under a file lock: the file as it is now (another run sharing the cache
    may have added rows since it was read) plus these, written atomically. Returns the merged (chosen, rejected)."""
    lock = path.parent.parent / "locks" / f"{path.name}.lock"  # beside the cache files, not among them
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        have_c, have_r = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
        if path.exists():
            saved = torch.load(path, weights_only=True)
            if saved["chosen"].shape == (n,):
                have_c, have_r = saved["chosen"], saved["rejected"]
        have_c[rows], have_r[rows] = chosen, rejected
        with atomic_path(path) as tmp:
            torch.save({"chosen": have_c, "rejected": have_r}, tmp)
    return have_c, have_r


def reference_cache_key(identity: str, dataset, *, chunk_size, use_adapter_off: bool, compute: str,
                        ld_alpha: float | None = None) -> str:
    """The cache file's name: the reference's weights, the tokenised pairs, the precision and the head settings."""
    key = hashlib.blake2b(digest_size=16)
    key.update(identity.encode())
    key.update(dataset_fingerprint(dataset).encode())
    key.update(f"{compute}|{chunk_size}|{use_adapter_off}".encode())
    if ld_alpha is not None:
        key.update(f"|ld_alpha={ld_alpha!r}".encode())
    return key.hexdigest()


def cached_reference_logps(model, dataset, indices=None, *, pad_token_id: int, batch_size: int = 8,
                           chunk_size=None, use_adapter_off: bool = False, ld_alpha: float | None = None,
                           cache_dir=None, desc: str = "reference log-probs", identity: str | None = None,
                           accelerator=None, device=None):
    """Reference log-probs of every row of ``dataset``: (N,), (N,), NaN where not computed.

    ``indices`` are this process's rows (None: all); rows missing from the on-disk cache are computed here
    (under ``accelerator``'s autocast when given), gathered from all ranks, merged into the cache by the main
    process and broadcast: every rank gets the same tensors. ``identity``: the reference's ``shared_identity``
    (default: ``model_identity(model)``, for an unsharded model). Collective under torch.distributed: call it
    on every rank.
    """
    identity = model_identity(model) if identity is None else identity
    compute = compute_settings(accelerator, device)
    key = reference_cache_key(identity, dataset, chunk_size=chunk_size, use_adapter_off=use_adapter_off,
                              compute=compute, ld_alpha=ld_alpha)
    path = cache_root(cache_dir) / "ref_logps" / f"{key}.pt"
    n = len(dataset)
    chosen, rejected = _read_cache(path, n)
    wanted = range(n) if indices is None else indices
    have = (~torch.isnan(chosen)).tolist()
    missing = [i for i in wanted if not have[i]]
    if missing:
        logger.info("%s: this process reads %d of %d rows; %d in the cache, computing %d on %s (%s)", desc,
                    len(wanted), n, len(wanted) - len(missing), len(missing),
                    device if device is not None else next(model.parameters()).device, compute)
    else:
        logger.info("%s reused from cache %s (%d of %d rows read by this process)", desc, path, len(wanted), n)
    batches = _max_over_ranks(-(-len(missing) // batch_size))
    new = compute_reference_logps(model, dataset, missing, pad_token_id=pad_token_id, batch_size=batch_size,
                                  chunk_size=chunk_size, use_adapter_off=use_adapter_off, ld_alpha=ld_alpha,
                                  desc=desc, device=device, batches=batches,
                                  autocast=None if accelerator is None else accelerator.autocast)
    rows, new_chosen, new_rejected = _gather(missing, *new)
    if rows:
        chosen[rows], rejected[rows] = new_chosen, new_rejected
        if _is_main_process():
            merged = _merge_into_cache(path, n, rows, new_chosen, new_rejected)
            logger.info("reference log-probs cached at %s (%d of %d rows)", path, int((~merged[0].isnan()).sum()), n)
    return chosen, rejected


def with_reference_rows(train_dataset, eval_dataset=None):
    """The datasets with a ``ref_row`` column: each pair's row in the run's reference table (train, then eval)."""
    train_dataset = train_dataset.add_column(REF_ROW, list(range(len(train_dataset))))
    if eval_dataset is not None:
        start = len(train_dataset)
        eval_dataset = eval_dataset.add_column(REF_ROW, list(range(start, start + len(eval_dataset))))
    return train_dataset, eval_dataset


class ReferenceLookup:
    """Wraps a collator: adds each pair's precomputed reference log-probs, looked up by its ``ref_row``.

    The table is filled at train begin (``ReferencePrecompute``), after the Trainer built its data loaders, so it
    lives here rather than in dataset columns. A batch read before the table exists, or holding a pair whose value
    was not computed (NaN: the precompute covers only the rows the run was planned to read), is an error rather
    than a loss against a NaN or stale reference.
    """

    def __init__(self, collate):
        self.collate = collate
        self.chosen = self.rejected = None

    def set(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """(R,), (R,): the values of every ``ref_row``, NaN where not computed."""
        self.chosen, self.rejected = chosen.float(), rejected.float()

    def __call__(self, features):
        rows = torch.tensor([int(f[REF_ROW]) for f in features], dtype=torch.long)
        batch = self.collate(features)
        if self.chosen is None:
            raise RuntimeError("a batch was read before the reference log-probs were precomputed (they are "
                               "computed at train begin); set precompute_ref_log_probs: false or report this")
        for key, table in zip(REF_COLUMNS, (self.chosen, self.rejected), strict=True):
            batch[key] = table[rows]
            if torch.isnan(batch[key]).any():
                bad = [f.get("index") for f, nan in zip(features, torch.isnan(batch[key]).tolist(), strict=True)
                       if nan]
                raise RuntimeError(f"a training batch holds pairs without a precomputed {key} (dataset 'index' "
                                   f"{bad[:5]}): the run read rows the precompute did not plan for; set "
                                   "precompute_ref_log_probs: false or report this with your config")
        return batch


class ReferencePrecompute(TrainerCallback):
    """Fills a ``ReferenceLookup`` at train begin, from the models as the Trainer prepared them.

    Train rows: those the Trainer's own sampler hands this process in the run's optimizer steps
    (``consumed_indices``); eval rows: every row, split over the processes. ``source``: "policy" (PEFT: the
    prepared policy with its adapters off) or "reference" (``trainer.precompute_ref``, prepared and sharded as the
    policy is, and dropped once the values are in the table). The values are computed under the run's autocast.
    """

    def __init__(self, trainer, lookup: ReferenceLookup, *, source: str, identity: str, chunk_size,
                 batch_size: int | None = None, ld_alpha: float | None = None):
        self.trainer, self.lookup, self.source, self.identity = trainer, lookup, source, identity
        self.chunk_size, self.batch_size, self.ld_alpha = chunk_size, batch_size, ld_alpha

    def on_train_begin(self, args, state, control, **kwargs):
        if self.lookup.chosen is None:
            self.run()

    def run(self) -> None:
        trainer, args = self.trainer, self.trainer.args
        use_adapter_off = self.source == "policy"
        model = trainer.model if use_adapter_off else trainer.precompute_ref
        kw = dict(pad_token_id=trainer.processing_class.pad_token_id, chunk_size=self.chunk_size,
                  use_adapter_off=use_adapter_off, ld_alpha=self.ld_alpha, identity=self.identity,
                  accelerator=trainer.accelerator, device=args.device)
        rows = consumed_indices(trainer.get_train_dataloader(), max_steps=args.max_steps,
                                num_train_epochs=args.num_train_epochs, grad_accum=args.gradient_accumulation_steps)
        if rows is None:
            logger.info("the train sampler's order cannot be replayed: reference log-probs for every train row")
        # TRL's batch sizes: precompute_ref_batch_size, else the train / eval micro-batch
        tables = [cached_reference_logps(model, trainer.train_dataset, rows,
                                         batch_size=self.batch_size or args.per_device_train_batch_size, **kw)]
        if trainer.eval_dataset is not None:
            share = range(args.process_index, len(trainer.eval_dataset), args.world_size)
            tables.append(cached_reference_logps(model, trainer.eval_dataset, share, desc="reference log-probs (eval)",
                                                 batch_size=self.batch_size or args.per_device_eval_batch_size, **kw))
        self.lookup.set(torch.cat([t[0] for t in tables]), torch.cat([t[1] for t in tables]))
        if not use_adapter_off:  # the values are in the table: free the model (accelerate's list holds it too)
            accelerator = trainer.accelerator
            accelerator._models = [m for m in accelerator._models if m is not model]
            trainer.precompute_ref = None
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

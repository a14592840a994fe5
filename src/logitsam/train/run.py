"""The training recipe: config -> model, data -> PreferenceTrainer (places the model) -> reference -> checkpoint.

The only code that reads ``TrainConfig``; everything it calls takes plain arguments.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import TrainingArguments

from .._atomic import commit_files, staging_dir, start_staging
from .._atomic import write_json as atomic_write_json
from ..core.head_chunked import DEFAULT_CHUNK_SIZE
from ..core.losses import requires_reference
from ..data import PreferenceCollator, build_preference_dataset, train_eval_split
from ..models import (
    check_linear_head,
    lm_head_of,
    load_model,
    load_reference,
    load_tokenizer,
    quantization_config,
)
from .checkpoints import remove_unfinished_writes, resolve_resume
from .config import TRAINING_DEFAULTS, ConfigError, TrainConfig, save_config
from .reference import RequireReference, add_reference_columns, cached_reference_logps, consumed_indices
from .trainer import CostCallback, MetricsJsonlCallback, PreferenceTrainer

logger = logging.getLogger("logitsam.train")

# `sam_chunk_size: auto` switches to the chunked head when one micro-batch's fp32 logits would exceed this
LOGITS_BUDGET_BYTES = 1 << 30


def resolve_chunk_size(chunk_size: int | str | None, *, tokens: int, vocab_size: int,
                       budget_bytes: int = LOGITS_BUDGET_BYTES) -> int | None:
    """``sam_chunk_size`` as the head takes it: an int (chunked) or None (dense).

    "auto" picks the chunked head (``DEFAULT_CHUNK_SIZE`` tokens per chunk) when the dense head's fp32
    logits, ``tokens x vocab_size x 4`` bytes, would exceed ``budget_bytes``, and the dense one
    otherwise. The dense head holds several such tensors in a logits-SAM step (clean, perturbed, their
    softmaxes), so the budget is on one copy. Example: V = 151,936 at 8,192 tokens is 4.6 GiB: chunked.
    """
    if chunk_size != "auto":
        return chunk_size
    return DEFAULT_CHUNK_SIZE if tokens * vocab_size * 4 > budget_bytes else None


def ranks_in_sync(model) -> bool | None:
    """Under torch.distributed: do all ranks hold the same weights? (None when not distributed.)

    A cheap end-of-run check that gradient synchronisation really happened: a logits-SAM step that
    bypassed the DDP wrapper would let the replicas drift apart. A sharded weight (an FSDP2 ``DTensor``, a
    DeepSpeed ZeRO-3 partition) is summed as the full tensor every rank gathers, so replicated shards (HSDP)
    are compared too; the gathers are collectives, issued in the same parameter order on every rank.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    if not (dist.is_available() and dist.is_initialized()):
        return None

    def full_sum(p):
        if isinstance(p, DTensor):
            return p.full_tensor().double().sum()
        if hasattr(p, "ds_id"):  # ZeRO-3: an empty partition outside a forward
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                return p.detach().double().sum()
        return p.detach().double().sum()

    with torch.no_grad():
        checksum = torch.stack([full_sum(p) for p in model.parameters()]).sum().reshape(1)
        gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def variant_name(cfg: TrainConfig) -> str:
    loss = cfg.loss_type if isinstance(cfg.loss_type, str) else "+".join(cfg.loss_type)
    if cfg.sam == "none":
        return loss
    return f"{loss}+{cfg.sam}-sam(rho={cfg.sam_rho:g})"


def build_training_args(cfg: TrainConfig) -> TrainingArguments:
    values = {**TRAINING_DEFAULTS, **cfg.training_args}
    values.pop("resume_from_checkpoint", None)
    values["remove_unused_columns"] = False  # our columns are not model.forward arguments
    return TrainingArguments(**values)


def build_datasets(cfg: TrainConfig, tokenizer, seed: int):
    if not cfg.dataset_name:
        raise ValueError("config key 'dataset_name' is required (a hub id, a local dir, or a JSON/JSONL/Parquet file)")
    common = dict(data_format=cfg.data_format, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                  truncation_mode=cfg.truncation_mode, on_invalid=cfg.on_invalid, chat_rendering=cfg.chat_rendering,
                  apply_chat_template=cfg.apply_chat_template, num_proc=cfg.dataset_num_proc)
    dataset, report = build_preference_dataset(cfg.dataset_name, tokenizer, split=cfg.dataset_split,
                                               max_samples=cfg.max_samples, **common)
    reports = {"train": report}
    if cfg.eval_dataset_name:
        eval_dataset, reports["eval"] = build_preference_dataset(cfg.eval_dataset_name, tokenizer,
                                                                 split=cfg.eval_dataset_split, **common)
        return dataset, eval_dataset, reports
    if cfg.eval_size:
        size = int(cfg.eval_size) if cfg.eval_size >= 1 else float(cfg.eval_size)
        train, evaluation = train_eval_split(dataset, size, seed=seed)
        return train, evaluation, reports
    return dataset, None, reports


def attach_reference_logps(trainer: PreferenceTrainer, source, *, use_adapter_off: bool, chunk_size,
                           batch_size: int | None = None, ld_alpha: float | None = None) -> None:
    """Precompute the reference log-probs of the rows the run reads and add them to the trainer's datasets.

    Train: the rows the Trainer's own sampler hands this process in the run's optimizer steps
    (``consumed_indices``); eval: every row, split over the processes. Each process computes its
    share on ``source``'s device, the shares are gathered, and rows nobody reads stay NaN
    (``RequireReference`` stops a batch that reads one).
    """
    args = trainer.args
    kw = dict(pad_token_id=trainer.processing_class.pad_token_id, chunk_size=chunk_size,
              use_adapter_off=use_adapter_off, ld_alpha=ld_alpha)
    rows = consumed_indices(trainer.get_train_dataloader(), max_steps=args.max_steps,
                            num_train_epochs=args.num_train_epochs, grad_accum=args.gradient_accumulation_steps)
    if rows is None:
        logger.info("the train sampler's order cannot be replayed: reference log-probs for every train row")
    # TRL's batch sizes: precompute_ref_batch_size, else the train / eval micro-batch
    trainer.train_dataset = add_reference_columns(trainer.train_dataset, *cached_reference_logps(
        source, trainer.train_dataset, rows, batch_size=batch_size or args.per_device_train_batch_size, **kw))
    if trainer.eval_dataset is not None:
        share = range(args.process_index, len(trainer.eval_dataset), args.world_size)
        trainer.eval_dataset = add_reference_columns(trainer.eval_dataset, *cached_reference_logps(
            source, trainer.eval_dataset, share, desc="reference log-probs (eval)",
            batch_size=batch_size or args.per_device_eval_batch_size, **kw))


def save_final_model(trainer: PreferenceTrainer, tokenizer, out_dir: Path) -> None:
    """The trained weights and the tokenizer into ``out_dir``: written aside, then each file renamed into place,
    so a run killed while saving leaves every file whole (the old one or the new one)."""
    staged = staging_dir(out_dir / "final-model")
    if trainer.args.should_save:
        start_staging(out_dir / "final-model")
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staged))  # on every rank: sharded (FSDP, DeepSpeed) saves gather first
    if trainer.args.should_save:
        tokenizer.save_pretrained(str(staged))
        commit_files(staged, out_dir)
    trainer.accelerator.wait_for_everyone()


def warn_one_of_many(world_size: int) -> None:
    """Say so when ``accelerate launch --cpu --num_processes N`` (N > 1) started this run as a single process.

    accelerate 1.15 starts several CPU processes only through mpirun (``--mpirun_hostfile``); without it, it
    starts one and only sets ``MASTER_ADDR``. ``--multi_gpu`` with ``--use_cpu true`` runs N gloo processes.
    """
    if world_size == 1 and "MASTER_ADDR" in os.environ and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        logger.warning("accelerate launch --cpu started one process (world size 1): several CPU processes need "
                       "--mpirun_hostfile, or --multi_gpu --num_processes N with the training key use_cpu: true")


def model_init_kwargs(cfg: TrainConfig) -> dict:
    """``from_pretrained`` arguments beyond dtype: TRL's ``model_init_kwargs``, then the model keys over them."""
    kwargs = dict(cfg.model_init_kwargs or {})
    if cfg.model_revision != "main":
        kwargs["revision"] = cfg.model_revision
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.load_in_4bit or cfg.load_in_8bit:
        kwargs["quantization_config"] = quantization_config(bits=4 if cfg.load_in_4bit else 8,
                                                            quant_type=cfg.bnb_4bit_quant_type,
                                                            nested=cfg.use_bnb_nested_quant)
    return kwargs


def load_policy(cfg: TrainConfig):
    """(tokenizer, model): the policy in train mode, with LoRA / DoRA / rsLoRA / QLoRA as configured."""
    tokenizer = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code,
                               revision=None if cfg.model_revision == "main" else cfg.model_revision)
    lora = None
    if cfg.use_peft:
        lora = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                "target_modules": cfg.lora_target_modules, "use_dora": cfg.use_dora, "use_rslora": cfg.use_rslora}
    model = load_model(cfg.model_name_or_path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                       gradient_checkpointing=bool(cfg.training_args.get("gradient_checkpointing", False)),
                       lora=lora, init_kwargs=model_init_kwargs(cfg))
    model.train()
    return tokenizer, model


def head_chunking(cfg: TrainConfig, args, head_weight) -> int | None:
    """``sam_chunk_size`` resolved for this run's micro-batches, logged with the arithmetic behind it."""
    # the dense head's logits are (2 x batch x length, V) for a train or eval micro-batch
    tokens = 2 * max(args.per_device_train_batch_size, args.per_device_eval_batch_size) * cfg.max_length
    vocab = getattr(head_weight, "ds_shape", head_weight.shape)[0]  # ZeRO-3 partitions at load: ds_shape is real
    chunk_size = resolve_chunk_size(cfg.sam_chunk_size, tokens=tokens, vocab_size=vocab,
                                    budget_bytes=LOGITS_BUDGET_BYTES)
    logger.info("LM head: %s (sam_chunk_size=%s; fp32 logits of one micro-batch: %d tokens x V=%d = %.2f GiB, "
                "budget %.2f GiB)", "dense" if chunk_size is None else f"chunked, {chunk_size} tokens per chunk",
                cfg.sam_chunk_size, tokens, vocab, tokens * vocab * 4 / 2**30, LOGITS_BUDGET_BYTES / 2**30)
    return chunk_size


def run_training(cfg: TrainConfig) -> dict:
    """Train and save; returns the final metrics and where things are."""
    args = build_training_args(cfg)
    warn_one_of_many(args.world_size)
    out_dir = Path(args.output_dir)
    resume = resolve_resume(cfg.training_args.get("resume_from_checkpoint"), out_dir)  # before any loading
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.process_index == 0:
        remove_unfinished_writes(out_dir)
        save_config(cfg, out_dir / "logitsam_config.yaml")
    torch.manual_seed(args.seed)

    tokenizer, model = load_policy(cfg)
    train_ds, eval_ds, reports = build_datasets(cfg, tokenizer, seed=args.data_seed or args.seed)

    needs_ref = requires_reference(cfg.loss_type)
    precompute = needs_ref and cfg.precompute_ref_log_probs
    ref_adapter_off = needs_ref and cfg.use_peft and not cfg.ref_model_name_or_path
    collator = PreferenceCollator(tokenizer.pad_token_id, pad_to_multiple_of=cfg.pad_to_multiple_of)
    # logitsam's log-probs are hidden @ W^T: refuse a soft-capped or scaled head on a few real rows, once
    first = collator([train_ds[i] for i in range(min(2, len(train_ds)))])
    head_weight = lm_head_of(model).weight
    zero3 = hasattr(head_weight, "ds_tensor")  # weights partitioned at load: no forward outside the engine
    ref_model = None
    if needs_ref and not ref_adapter_off:
        # on the device the Trainer trains on, whether it is used for the precompute or at every step. Under
        # ZeRO-3 loaded from the policy's path (a deep copy would copy empty partitions), as TRL does
        ref_path = cfg.ref_model_name_or_path or (cfg.model_name_or_path if zero3 else None)
        ref_model = load_reference(model, ref_path, trust_remote_code=cfg.trust_remote_code, device=args.device)
        if cfg.ref_model_name_or_path and not zero3:  # while unsharded: PreferenceTrainer shards it under FSDP2
            check_linear_head(ref_model, first["input_ids"], first["attention_mask"], name=cfg.ref_model_name_or_path)
    chunk_size = head_chunking(cfg, args, head_weight)

    trainer = PreferenceTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=RequireReference(collator) if precompute else collator, processing_class=tokenizer,
        chunk_size=chunk_size, ref_model=None if precompute else ref_model,
        ref_adapter_off=ref_adapter_off and not precompute,
        callbacks=[MetricsJsonlCallback(out_dir), cost := CostCallback()],
        **trainer_options(cfg),
    )
    if zero3:
        logger.warning("DeepSpeed ZeRO-3: the numeric head check and the reference precompute need a forward "
                       "outside the engine and are not supported yet; use a reference-free loss or "
                       "precompute_ref_log_probs: false")
        if precompute:
            raise ConfigError("config key 'precompute_ref_log_probs' = true is not supported under DeepSpeed ZeRO-3 "
                              "yet (the pass would run outside the engine on empty partitions); set it to false")
    else:
        check_linear_head(trainer.model, first["input_ids"], first["attention_mask"], name=cfg.model_name_or_path)
    if precompute:
        # after Trainer placed the policy: the pass runs where training will
        attach_reference_logps(trainer, trainer.model if ref_adapter_off else ref_model,
                               use_adapter_off=ref_adapter_off, chunk_size=chunk_size,
                               batch_size=cfg.precompute_ref_batch_size, ld_alpha=cfg.ld_alpha)
        del ref_model  # the values ride in the datasets; free the model
    result = trainer.train(resume_from_checkpoint=resume)
    return finish_run(trainer, tokenizer, model, out_dir, eval_ds, result, cost, reports, cfg, args)


def trainer_options(cfg: TrainConfig) -> dict:
    """The PreferenceTrainer arguments that come straight from the config (the loss, SAM and TRL features)."""
    return dict(
        loss_type=cfg.loss_type, beta=cfg.beta, loss_params=cfg.loss_params(), sam=cfg.sam, sam_rho=cfg.sam_rho,
        sam_norm=cfg.sam_norm, sam_variant=cfg.sam_variant, vocab_chunk_size=cfg.sam_vocab_chunk_size,
        ref_is_initial_policy=cfg.ref_model_name_or_path is None, on_nonfinite=cfg.on_nonfinite,
        ld_alpha=cfg.ld_alpha, use_weighting=cfg.use_weighting, disable_dropout=cfg.disable_dropout,
        router_aux_loss_coef=cfg.router_aux_loss_coef, sync_ref_model=cfg.sync_ref_model,
        ref_model_mixup_alpha=cfg.ref_model_mixup_alpha, ref_model_sync_steps=cfg.ref_model_sync_steps,
    )


def finish_run(trainer, tokenizer, model, out_dir: Path, eval_ds, result, cost, reports, cfg, args) -> dict:
    """Final evaluation, the saved model and run_info.json; the summary ``run_training`` returns."""
    final_metrics = dict(result.metrics)
    if eval_ds is not None:
        final_metrics.update(trainer.evaluate())
    save_final_model(trainer, tokenizer, out_dir)
    info = {"variant": cfg.variant or variant_name(cfg), "seed": args.seed, **cost.summary(),
            "global_step": trainer.state.global_step, "world_size": args.world_size,
            "ranks_in_sync": ranks_in_sync(model)}
    if info["ranks_in_sync"] is False:
        logger.error("the ranks' weights differ after training: gradient synchronisation did not happen")
    if args.process_index == 0:
        atomic_write_json(out_dir / "run_info.json", info, indent=2)
    logger.info("saved the final model to %s", out_dir)
    return {"output_dir": str(out_dir), "metrics": final_metrics, "global_step": trainer.state.global_step,
            "data": {k: {"read": r.rows_read, "dropped": r.dropped, "by_reason": dict(r.counts)}
                     for k, r in reports.items()}}

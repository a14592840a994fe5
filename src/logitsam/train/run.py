"""The training recipe: config -> model, data -> PreferenceTrainer -> (at train begin, on the prepared models: the
head check, the reference precompute) -> training -> checkpoint.

The only code that reads ``TrainConfig``; everything it calls takes plain arguments.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from .._atomic import commit_files, staging_dir, start_staging
from .._atomic import write_json as atomic_write_json
from ..core.head_chunked import DEFAULT_CHUNK_SIZE
from ..core.losses import requires_reference
from ..data import PreferenceCollator, build_preference_dataset, train_eval_split
from ..models import (
    lm_head_of,
    load_model,
    load_reference,
    load_tokenizer,
    quantization_config,
)
from ._inside import check_linear_head_inside
from .checkpoints import remove_unfinished_writes, resolve_resume
from .config import TRAINING_DEFAULTS, TrainConfig, save_config
from .reference import ReferenceLookup, ReferencePrecompute, shared_identity, with_reference_rows
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
    """Under torch.distributed: do all ranks hold the same replicated weights? None when not distributed, or when
    no weight is replicated.

    DDP keeps a full copy of every weight on each rank: a logits-SAM step that bypassed the wrapper would let the
    copies drift apart, and each rank's checksum of its own copy is compared with the other ranks'. A sharded
    weight (an FSDP2 ``DTensor``, a DeepSpeed ZeRO-3 partition) exists once, a different piece on each rank, so
    there is no copy to compare: gathering the full tensor on every rank would agree by construction. Such weights
    are left out (a fully sharded model gives None); sharded steps are checked against DDP in the tests instead.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    if not (dist.is_available() and dist.is_initialized()):
        return None
    replicated = [p for p in model.parameters() if not isinstance(p, DTensor) and not hasattr(p, "ds_id")]
    if not replicated:
        return None
    with torch.no_grad():
        checksum = torch.stack([p.detach().double().sum() for p in replicated]).sum().reshape(1)
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
    checkpointing = values.get("gradient_checkpointing") or values.get("activation_checkpointing")
    if checkpointing and not any(values.get(f"{k}_checkpointing_kwargs") for k in ("gradient", "activation")):
        # Trainer.train enables checkpointing again with these kwargs: non-reentrant, as load_model enabled it
        # (reentrant checkpointing drops the gradients of frozen-input blocks, LoRA's, and breaks under FSDP2)
        values["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
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


class CheckHeadsAtTrainBegin(TrainerCallback):
    """The numeric head check (``check_linear_head_inside``) on the models as training runs them.

    At train begin the Trainer has placed, wrapped and sharded the policy (an FSDP2 root that broadcast rank 0's
    weights, a DeepSpeed engine over ZeRO-3 partitions) and prepared a separate reference likewise; the probes run
    inside the wrapper's forward, on every rank, under the run's autocast.
    """

    def __init__(self, trainer, batch, *, policy_name, ref_name=None):
        self.trainer, self.batch, self.policy_name, self.ref_name = trainer, batch, policy_name, ref_name

    def on_train_begin(self, args, state, control, **kwargs):
        trainer, ids, mask = self.trainer, self.batch["input_ids"], self.batch["attention_mask"]
        # the module whose forward gathers a sharded head: the DeepSpeed engine, else trainer.model (an FSDP2 root
        # is the model itself; under DDP or torch.compile it is the bare module: no extra compiled graph)
        policy = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
        with trainer.accelerator.autocast():
            check_linear_head_inside(policy, ids, mask, name=self.policy_name, device=args.device)
            ref = trainer.ref_model if trainer.ref_model is not None else trainer.precompute_ref
            if self.ref_name is not None and ref is not None:
                check_linear_head_inside(ref, ids, mask, name=self.ref_name, device=args.device)


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
    # logitsam's log-probs are hidden @ W^T: the head check runs on a few real rows, once, at train begin
    first = collator([train_ds[i] for i in range(min(2, len(train_ds)))])
    head_weight = lm_head_of(model).weight
    zero3 = hasattr(head_weight, "ds_tensor")  # weights partitioned at load: no forward outside the engine
    fsdp = bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    ref_model = None
    if needs_ref and not ref_adapter_off:
        # sharded runs load the reference from its path (the policy's when none is set; a deep copy would copy
        # empty partitions, or weights that FSDP's CPU-RAM-efficient loading leaves to rank 0) and the Trainer
        # shards it as the policy (FSDP2 from the CPU, broadcasting rank 0's weights; a DeepSpeed engine).
        # Unsharded: on the device the Trainer trains on
        ref_path = cfg.ref_model_name_or_path or (cfg.model_name_or_path if zero3 or fsdp else None)
        ref_model = load_reference(model, ref_path, trust_remote_code=cfg.trust_remote_code,
                                   device="cpu" if fsdp else args.device)
    chunk_size = head_chunking(cfg, args, head_weight)
    data_collator, identity = collator, None
    if precompute:
        # the cache key from rank 0's weights, before sharding
        identity = shared_identity(model if ref_adapter_off else ref_model)
        train_ds, eval_ds = with_reference_rows(train_ds, eval_ds)
        data_collator = ReferenceLookup(collator)

    trainer = PreferenceTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=data_collator, processing_class=tokenizer,
        chunk_size=chunk_size, ref_model=None if precompute else ref_model,
        precompute_ref_model=ref_model if precompute else None,
        ref_adapter_off=ref_adapter_off and not precompute,
        callbacks=[MetricsJsonlCallback(out_dir), cost := CostCallback()],
        **trainer_options(cfg),
    )
    del ref_model  # the trainer holds it (prepared), or the precompute drops it once its values are in
    trainer.add_callback(CheckHeadsAtTrainBegin(trainer, first, policy_name=cfg.model_name_or_path,
                                                ref_name=cfg.ref_model_name_or_path))
    if precompute:
        trainer.add_callback(ReferencePrecompute(trainer, data_collator, source="policy" if ref_adapter_off
                                                 else "reference", identity=identity, chunk_size=chunk_size,
                                                 batch_size=cfg.precompute_ref_batch_size, ld_alpha=cfg.ld_alpha))
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

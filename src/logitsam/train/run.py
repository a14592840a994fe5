"""The training recipe: config -> model, data, reference -> PreferenceTrainer -> checkpoint.

The only code that reads ``TrainConfig``; everything it calls takes plain arguments.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import TrainingArguments

from ..core.losses import requires_reference
from ..data import PreferenceCollator, build_preference_dataset, train_eval_split
from ..models import load_model, load_reference, load_tokenizer
from .config import TrainConfig, save_config
from .reference import add_reference_columns, cached_reference_logps
from .trainer import CostCallback, MetricsJsonlCallback, PreferenceTrainer

logger = logging.getLogger("logitsam.train")

# logitsam's defaults for TrainingArguments keys the user did not set
TRAINING_DEFAULTS = {
    "output_dir": "runs/train",
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "learning_rate": 5e-7,
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 500,
    "report_to": "none",
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.1,
}


def ranks_in_sync(model) -> bool | None:
    """Under torch.distributed: do all ranks hold the same weights? (None when not distributed.)

    A cheap end-of-run check that gradient synchronisation really happened: a logits-SAM step that
    bypassed the DDP wrapper would let the replicas drift apart.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    with torch.no_grad():
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
        checksum = checksum.to(next(model.parameters()).device)
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
                  truncation_mode=cfg.truncation_mode, on_invalid=cfg.on_invalid)
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


def run_training(cfg: TrainConfig) -> dict:
    """Train and save; returns the final metrics and where things are."""
    args = build_training_args(cfg)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.process_index == 0:
        save_config(cfg, out_dir / "logitsam_config.yaml")
    torch.manual_seed(args.seed)

    tokenizer = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    lora = None
    if cfg.use_peft:
        lora = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                "target_modules": cfg.lora_target_modules}
    model = load_model(cfg.model_name_or_path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                       gradient_checkpointing=bool(cfg.training_args.get("gradient_checkpointing", False)),
                       lora=lora)
    model.train()
    train_ds, eval_ds, reports = build_datasets(cfg, tokenizer, seed=args.data_seed or args.seed)

    needs_ref = requires_reference(cfg.loss_type)
    ref_model, ref_adapter_off = None, False
    if needs_ref:
        if cfg.use_peft and not cfg.ref_model_name_or_path:
            ref_adapter_off = True
        else:
            ref_model = load_reference(model, cfg.ref_model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        if cfg.precompute_ref_log_probs:
            source = model if ref_adapter_off else ref_model
            kw = dict(pad_token_id=tokenizer.pad_token_id, batch_size=args.per_device_eval_batch_size,
                      chunk_size=cfg.sam_chunk_size, use_adapter_off=ref_adapter_off)
            train_ds = add_reference_columns(train_ds, *cached_reference_logps(source, train_ds, **kw))
            if eval_ds is not None:
                eval_ds = add_reference_columns(eval_ds, *cached_reference_logps(
                    source, eval_ds, desc="reference log-probs (eval)", **kw))
            ref_model, ref_adapter_off = None, False  # the values ride in the dataset; free the model

    trainer = PreferenceTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=PreferenceCollator(tokenizer.pad_token_id), processing_class=tokenizer,
        loss_type=cfg.loss_type, beta=cfg.beta, loss_params=cfg.loss_params(), sam=cfg.sam, sam_rho=cfg.sam_rho,
        sam_norm=cfg.sam_norm, sam_adaptive=cfg.sam_adaptive, sam_asam=cfg.sam_asam,
        chunk_size=cfg.sam_chunk_size, vocab_chunk_size=cfg.sam_vocab_chunk_size, ref_model=ref_model,
        ref_adapter_off=ref_adapter_off, ref_is_initial_policy=cfg.ref_model_name_or_path is None,
        on_nonfinite=cfg.on_nonfinite, callbacks=[MetricsJsonlCallback(out_dir), cost := CostCallback()],
    )
    resume = cfg.training_args.get("resume_from_checkpoint")
    result = trainer.train(resume_from_checkpoint=resume)
    final_metrics = dict(result.metrics)
    if eval_ds is not None:
        final_metrics.update(trainer.evaluate())
    trainer.save_model(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    info = {"variant": cfg.variant or variant_name(cfg), "seed": args.seed, **cost.summary(),
            "global_step": trainer.state.global_step, "world_size": args.world_size,
            "ranks_in_sync": ranks_in_sync(model)}
    if info["ranks_in_sync"] is False:
        logger.error("the ranks' weights differ after training: gradient synchronisation did not happen")
    if args.process_index == 0:
        (out_dir / "run_info.json").write_text(json.dumps(info, indent=2))
    logger.info("saved the final model to %s", out_dir)
    return {"output_dir": str(out_dir), "metrics": final_metrics, "global_step": trainer.state.global_step,
            "data": {k: {"read": r.rows_read, "dropped": r.dropped, "by_reason": dict(r.counts)}
                     for k, r in reports.items()}}

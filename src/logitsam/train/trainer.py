"""`PreferenceTrainer`: transformers.Trainer with DPO-family losses and logits-SAM / full SAM.

One training micro-batch, readable in one sitting (``compute_loss``):
  one forward of the outermost (DDP / FSDP2 / DeepSpeed / PEFT-wrapped) model, inside which the backbone gives the
  final hidden states (2B, T, d) and the LM head's forward runs the head step (``step.HeadStep``, shared with
  ``LogitsSAMDPOTrainer``): plain or logits-SAM -> preference loss (``_inside.py``: the wrapper gathers a sharded
  head there) -> metrics with TRL's names, kept on the device and reduced once per logging step. No host sync
  per micro-batch. Full SAM wraps ``training_step`` in two passes instead.
Checkpointing, resume, accumulation, mixed precision, ``report_to``, DDP, FSDP2 and DeepSpeed come from Trainer.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .._atomic import commit_dir, staging_dir, start_staging
from .._atomic import write_text as atomic_write_text
from .._memory import peak_rss_bytes
from ..core import FullSAM, sequence_logps
from ..core.head import HALF_DTYPES, shift_labels
from ..core.losses import requires_reference
from ..diagnostics.squeeze import dpo_metrics, squeeze_metrics
from ..models import reference_context, unwrap_model
from ._inside import head_inside_forward
from ._sharding import (  # noqa: F401  (nonfinite_parameters, sync_reference: public here as before)
    check_reference_keys,
    deepspeed_inference_engine,
    disable_dropout_in_model,
    nonfinite_parameters,
    sync_reference,
)
from .checkpoints import rotate_checkpoints
from .config import ConfigError
from .step import COMPLETION_INDEX, DeferredMetrics, HeadStep, ratio_out_of_band

logger = logging.getLogger("logitsam.train")


class NonFiniteLossError(RuntimeError):
    pass


# sam/first_order_ratio outside this band means eps was rounded away (low) or rho is far too large (high)
RATIO_BAND = (0.5, 2.0)


def ratio_is_measurable(loss_pre: float, first_order: float) -> bool:
    """Is the predicted change ``<g, eps>`` far enough above float32 rounding of the loss to be checked?"""
    return abs(first_order) > 64 * torch.finfo(torch.float32).eps * max(1.0, abs(loss_pre))


def unmastered_half_params(model, args) -> tuple[int, torch.dtype | None]:
    """Trainable parameters kept in bf16/fp16 with no float32 master copy in the optimizer: (count, dtype).

    A plain torch optimizer updates such weights in their own dtype: an update smaller than half the
    spacing of the weight's dtype (bf16 at |w| ~ 0.02: ~6e-5) is rounded away. DeepSpeed keeps fp32
    master weights of its own, so it is not counted.
    """
    if getattr(args, "deepspeed", None):
        return 0, None
    half = [p for p in model.parameters() if p.requires_grad and p.dtype in HALF_DTYPES]
    return sum(p.numel() for p in half), (half[0].dtype if half else None)


def router_coefficient(model, coef: float | None) -> float:
    """The MoE load-balancing loss weight (TRL 1.16): ``coef``, else the model config's own, 0 for a dense model."""
    config = unwrap_model(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    moe = hasattr(config, "output_router_logits")
    if coef and not moe:
        raise ConfigError(f"config key 'router_aux_loss_coef' = {coef} needs a mixture-of-experts model that returns "
                          f"router logits; {type(unwrap_model(model)).__name__} has none")
    if not moe:
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", 0.0) if coef is None else coef)


class PreferenceTrainer(Trainer):
    """Trainer for preference pairs (chosen rows first, then rejected) with an optional SAM mode.

    Args (besides Trainer's):
        loss_type, beta, loss_params: the preference loss (``logitsam.losses.preference_loss``).
        sam: "none", "logits" or "full"; sam_rho, sam_norm, sam_variant (plain, adaptive, asam): its settings.
        chunk_size, vocab_chunk_size: the LM-head chunking of every head pass (None: dense).
        ref_model: a frozen reference, or None when log-probs are precomputed in the dataset,
            the loss is reference-free, or ``ref_adapter_off`` (PEFT: the policy without adapters).
        ref_is_initial_policy: the reference equals the step-0 policy, so "vs step 0" = "vs reference".
        on_nonfinite: "stop" raises on a non-finite loss; "skip" drops the whole optimizer step.
    """

    def __init__(self, *args, loss_type="sigmoid", beta=0.1, loss_params=None, sam="none", sam_rho=1e-4,
                 sam_norm="local", sam_variant="plain", chunk_size=None, vocab_chunk_size=8192,
                 ref_model=None, ref_adapter_off=False, ref_is_initial_policy=True, on_nonfinite="stop",
                 ld_alpha=None, use_weighting=False, disable_dropout=True, router_aux_loss_coef=None,
                 sync_ref_model=False, ref_model_mixup_alpha=0.6, ref_model_sync_steps=512, precompute_ref_model=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._check_sharding(sam)
        if on_nonfinite == "skip" and self.is_deepspeed_enabled:
            raise ConfigError(
                "config key 'on_nonfinite' = 'skip' cannot run with DeepSpeed: accelerate runs the engine's optimizer "
                "step inside backward at each accumulation boundary, before a skip could be decided, and the "
                "partitioned gradients are the engine's, so the poisoned update would be applied. Use on_nonfinite: "
                "stop (the default: stops without checkpointing the poisoned state), or skip with DDP or FSDP2")
        self.loss_type, self.beta, self.loss_params = loss_type, beta, dict(loss_params or {})
        self.ld_alpha, self.use_weighting = ld_alpha, use_weighting
        if disable_dropout:  # TRL 1.16's default: deterministic log-probs in the clean and perturbed passes alike
            for m in (self.model, ref_model):
                if m is not None:
                    disable_dropout_in_model(m)
        self.router_aux_loss_coef = router_coefficient(self.model, router_aux_loss_coef)
        self.sam, self.sam_rho, self.sam_norm = sam, sam_rho, sam_norm
        self.sam_variant = sam_variant
        self.chunks = {"chunk_size": chunk_size, "vocab_chunk_size": vocab_chunk_size}
        # sam: logits with sam_rho 0 is plain DPO: the step takes the plain path (no SAM cost)
        self.step = HeadStep({"loss_type": loss_type, "beta": beta, **self.loss_params},
                             rho=sam_rho if sam == "logits" else 0.0, norm=sam_norm, variant=sam_variant,
                             ld_alpha=ld_alpha, use_weighting=use_weighting,
                             aux_coef=self.router_aux_loss_coef, **self.chunks)
        self.ref_model = None if ref_model is None else self._prepare_reference(ref_model)
        # a reference used only by the precompute at train begin (``reference.ReferencePrecompute``), prepared and
        # sharded as the live one would be, and dropped once its values are in the lookup table
        self.precompute_ref = None if precompute_ref_model is None else self._prepare_reference(precompute_ref_model)
        self.ref_adapter_off, self.on_nonfinite = ref_adapter_off, on_nonfinite
        self.ref_is_initial_policy = ref_is_initial_policy
        self.needs_reference = requires_reference(loss_type)
        # our loss is a mean over pairs: let Trainer divide it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self.full_sam = FullSAM(self.model.parameters(), sam_rho, norm=sam_norm, variant=sam_variant) \
            if sam == "full" else None
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._nonfinite = None  # device flag: this rank saw a non-finite loss in the current optimizer step
        self._bad_loss = None  # the last non-finite loss (device), for the message
        self._deferred = DeferredMetrics()
        self._record = True
        self._ratio_warned = False
        self._check_master_weights()
        self.add_callback(_SkipPoisonedStep(self))  # the once-per-step non-finite decision (stop or skip)
        if sync_ref_model:
            if self.ref_model is None:
                raise ConfigError("config key 'sync_ref_model' = true needs a separate reference model updated from "
                                  "the policy; this run has none (precomputed log-probs, a reference-free loss or "
                                  "PEFT's adapters-off reference)")
            self.ref_is_initial_policy = False  # after the first update "vs reference" is no longer "vs step 0"
            self.add_callback(SyncReferenceCallback(self, ref_model_mixup_alpha, ref_model_sync_steps))
        self.sync_ref_model = sync_ref_model
        logger.info("sam=%s rho=%g norm=%s variant=%s head=%s", sam, sam_rho, sam_norm, sam_variant,
                    "dense" if chunk_size is None else f"chunked({chunk_size})")

    def _check_sharding(self, sam):
        """Refuse full SAM on sharded weights; say so when accelerate quietly drops ``fsdp`` (CPU, one process)."""
        sharded = [k for k, on in (("fsdp", self.is_fsdp_enabled), ("deepspeed", self.is_deepspeed_enabled)) if on]
        if sam == "full" and sharded:
            raise ConfigError(
                f"config key 'sam' = 'full' cannot run with {sharded[0]!r} (sharded weights or gradients): full "
                "SAM saves and perturbs every parameter outside the wrapper's forward, where each rank holds only a "
                "shard, and takes its parameter list before the wrapper replaces the parameters. Use sam: logits "
                f"(exact under sharding), or full SAM without {sharded[0]} (DDP)")
        if getattr(self.args, "fsdp_plugin_args", None) is not None and not self.is_fsdp_enabled:
            logger.warning("fsdp is set, but accelerate did not enable it (it does for distributed runs on GPUs and "
                           "other accelerators only): this %s run is not sharded (%s)", self.accelerator.device.type,
                           self.accelerator.distributed_type)

    def _check_master_weights(self):
        n_half, half_dtype = unmastered_half_params(self.model, self.args)
        if not n_half:
            return
        if half_dtype == torch.float16:
            raise ConfigError(
                "config key 'dtype' = 'float16': float16 weights cannot be trained here (the fp16 gradient scaler "
                "refuses fp16 parameters and updates would underflow): load float32 weights (dtype: float32) and "
                "set fp16: true for fp16 autocast, or use bf16: true")
        logger.warning(
            "%d trainable parameters are %s and the optimizer keeps no float32 copy: AdamW updates smaller "
            "than ~1/256 of a weight are rounded away (at learning_rate 5e-7 almost every update). "
            "Recommended: dtype: float32 (master weights) with bf16: true (bf16 compute under autocast).",
            n_half, str(half_dtype).replace("torch.", ""))

    # ---- reference -------------------------------------------------------------------------
    def _prepare_reference(self, ref):
        """A separate reference, placed and sharded as the policy will be (TRL 1.16's preparation).

        FSDP2: accelerate's own layout for the policy (decoder blocks, embedding, final norm + head, root), every
        group resharding after forward: each rank holds a shard between forwards, and the head is gathered inside
        the forward, as the policy's is. DeepSpeed: an inference engine (no optimizer) whose forward gathers the
        ZeRO-3 partitions made at load. Otherwise ``prepare_model(evaluation_mode=True)``: moved to the device,
        never wrapped in DDP (no gradients to reduce).
        The reference forward then runs through ``head_inside_forward`` on the returned (outermost) module.
        """
        ref.requires_grad_(False)
        if self.is_deepspeed_enabled:
            ref = deepspeed_inference_engine(ref, self.accelerator)
        elif self.is_fsdp_enabled:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            if self.accelerator.state.fsdp_plugin.fsdp_version != 2:
                raise ConfigError("config key 'fsdp_config.fsdp_version' = 1: a separate reference model is sharded "
                                  "with FSDP2 only; set fsdp_version: 2")
            ref = fsdp2_prepare_model(self.accelerator, ref)
            # groups kept gathered after forward (the head's, the root) wait for a backward that a frozen
            # model never runs: reshard them after each forward, so the reference stays a shard between steps
            ref.set_reshard_after_forward(True)
        else:
            ref = self.accelerator.prepare_model(ref, evaluation_mode=True)
        ref.eval()  # (DeepSpeedEngine.eval returns None)
        return ref

    @torch.no_grad()
    def _reference_logps(self, inputs, labels, index=None):
        if not self.needs_reference:
            return None, None
        if "ref_chosen_logps" in inputs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        if self.ref_model is not None:
            model, ctx = self.ref_model, nullcontext()
        elif self.ref_adapter_off:
            model, ctx = self.model, reference_context(self.model)
        else:
            raise ValueError("loss needs reference log-probs, but no reference model or precomputed values exist")

        def head_pass(hidden, head):  # inside the model's forward, where a sharded head is gathered
            out = sequence_logps(hidden, head, labels, with_stats=False, index=index, **self.chunks)
            return self.step.logps(out, labels)  # (2B,)

        with ctx, self.accelerator.autocast():  # the policy's autocast (a sharded reference has none of its own)
            logps = head_inside_forward(model, inputs["input_ids"], inputs["attention_mask"], head_pass).detach()
        n = logps.shape[0] // 2
        return logps[:n], logps[n:]

    # ---- one micro-batch ---------------------------------------------------------------------
    def _loss_fn(self, ref_chosen, ref_rejected, labels, kept):
        """The loss closure of one head pass (``HeadStep.loss_fn``): the seam where tests poison the loss."""
        return self.step.loss_fn(ref_chosen, ref_rejected, labels, kept)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = shift_labels(inputs["labels"])  # (2B, T): the token each position predicts
        index = inputs.get(COMPLETION_INDEX)  # (n,) from the collator: no host sync in the head
        ref_chosen, ref_rejected = self._reference_logps(inputs, labels, index)
        kept: dict = {}  # the clean pass's rewards and WPO weights
        loss_fn = self._loss_fn(ref_chosen, ref_rejected, labels, kept)
        # backbone and the whole head computation inside the outermost wrapper's forward (see _inside.py, step.py)
        res = self.step(model, inputs["input_ids"], inputs["attention_mask"], labels, index, ref_chosen,
                        ref_rejected, sam=self.sam == "logits" and model.training, loss_fn=loss_fn, kept=kept)
        loss = res.loss
        finite = torch.isfinite(loss.detach())  # a device flag: read once per optimizer step, not here
        if self._record:
            mode = "train" if model.training else "eval"
            extra = {**res.extra, **{f"sam/{k}": v for k, v in res.sam.items()}}
            self._record_metrics(mode, res, ref_chosen, ref_rejected, inputs, extra, finite)
        if model.training:
            self._nonfinite = ~finite if self._nonfinite is None else self._nonfinite | ~finite
            self._bad_loss = torch.where(finite, loss.detach() if self._bad_loss is None else self._bad_loss,
                                         loss.detach())
        elif self.on_nonfinite == "stop" and not bool(finite):  # evaluation: not the training hot path
            self._raise_nonfinite(loss.detach())
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def _counts_tokens(self, mode) -> bool:
        """TRL's ``num_tokens``: non-padding tokens trained on so far, over all ranks, kept in the Trainer's state
        (``num_input_tokens_seen``, so resume continues it). Trainer counts instead when asked to
        (``include_num_input_tokens_seen``)."""
        return mode == "train" and self.args.include_num_input_tokens_seen == "no"

    def _warn_ratio(self, flushed) -> None:
        """One clear warning per run when a logged ``sam/first_order_ratio`` leaves ``RATIO_BAND``."""
        found = None if self._ratio_warned else ratio_out_of_band(flushed, ratio_is_measurable, RATIO_BAND)
        if found:
            self._ratio_warned = True
            why = ("the perturbation is below the working precision: logits-SAM is acting as plain DPO. "
                   "Keep float32 head weights (dtype: float32 with bf16: true) or raise sam_rho" if found[1] == "low"
                   else "sam_rho is so large that the loss is far from linear over the perturbation; lower sam_rho")
            logger.warning("sam/first_order_ratio = %.3g at step %d (expected ~1, band %s): %s.",
                           found[0], self.state.global_step, RATIO_BAND, why)

    def _raise_nonfinite(self, loss) -> None:
        raise NonFiniteLossError(f"non-finite loss ({float(loss)}) at step {self.state.global_step}; lower the "
                                 "learning rate or sam_rho, or check the data (on_nonfinite=stop: no checkpoint is "
                                 "written from this state)")

    def _agree_on_skip(self) -> bool:
        """Right before ``optimizer.step``: did any rank see a non-finite loss in this step? One collective and one
        host read per optimizer step (the micro-batches only OR a device flag).

        ``on_nonfinite: stop`` raises. ``skip``: the poisoned micro-batch's backward ran like any other, so every
        rank issued the same gradient collectives (DDP all-reduce, FSDP2 reduce-scatter, ZeRO-3): no rank waited
        for one that bailed out. Every rank now drops the step's gradients (all micro-batches), so AdamW and
        friends leave the weights and their state untouched; the learning-rate schedule still advances.
        """
        if self._nonfinite is None:
            return False
        flag = self._nonfinite.reshape(1).float()
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        bad_loss, self._nonfinite, self._bad_loss = self._bad_loss, None, None
        if float(flag) == 0:
            return False
        if self.on_nonfinite == "stop":
            self._raise_nonfinite(bad_loss if bad_loss is not None else float("nan"))
        logger.warning("non-finite loss (%s) at step %d; lower the learning rate or sam_rho, or check the data: "
                       "skipping this optimizer step (on_nonfinite=skip)", float(bad_loss), self.state.global_step)
        self.model.zero_grad(set_to_none=True)
        self._metrics["train"]["nonfinite_skipped"].append(1.0)
        return True

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.full_sam is None:
            return super().training_step(model, inputs, num_items_in_batch)
        return self._full_sam_step(model, inputs, num_items_in_batch)

    def _full_sam_step(self, model, inputs, num_items_in_batch):
        """Two passes on this micro-batch: gradient at w, ascend to w + eps, gradient there, restore w.

        The ascent pass sees this micro-batch alone (earlier micro-batches' gradients are set aside) and runs
        without DDP gradient sync: per-device SAM (``sam_norm: global`` all-reduces only the squared norm).
        The earlier gradients are put back *before* the second pass, so the second pass accumulates onto them
        and DDP's all-reduce on the step's last micro-batch reduces the whole accumulated SAM gradient.
        """
        params = self.full_sam.params
        earlier = [p.grad for p in params]  # gradients accumulated from earlier micro-batches
        for p in params:
            p.grad = None
        no_sync = self.accelerator.no_sync(model) if self.accelerator.num_processes > 1 else nullcontext()
        with no_sync:
            loss_pre = super().training_step(model, inputs, num_items_in_batch)
        grad_norm = self.full_sam.first_step()
        for p, g in zip(params, earlier, strict=True):
            p.grad = g
        self._record = False
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._record = True
            self.full_sam.second_step()
        scale = self.current_gradient_accumulation_steps
        # means over ranks at the logging step, as every other metric (each rank perturbs with its own gradient);
        # Trainer divided the loss by the accumulation steps before backward: the norm is the micro-batch loss's
        self._deferred.add("train", means={"sam/loss_pre": loss_pre.detach() * scale,
                                           "sam/loss_post": loss.detach() * scale,
                                           "sam/grad_norm": torch.tensor(grad_norm * scale, device=loss.device)})
        return loss

    # ---- metrics -----------------------------------------------------------------------------
    def _record_metrics(self, mode, res, ref_chosen, ref_rejected, inputs, extra, finite):
        """Keep this micro-batch's metrics on the device (``DeferredMetrics``); a non-finite micro-batch records NaN,
        so it is left out of the logged means on every rank."""
        init = (inputs.get("init_chosen_logps"), inputs.get("init_rejected_logps"))
        if init[0] is None and self.ref_is_initial_policy:
            init = (ref_chosen, ref_rejected)  # the reference is the step-0 policy
        metrics = dpo_metrics(*res.rewards, res.out, as_tensors=True)
        metrics.update(squeeze_metrics(res.out, ref_chosen, ref_rejected, *init, as_tensors=True))
        metrics.update(extra)
        nan = torch.full((), float("nan"), device=finite.device)
        metrics = {k: torch.where(finite, v.float(), nan) for k, v in metrics.items()}
        # TRL's num_tokens: summed over ranks (a poisoned micro-batch's tokens still count)
        sums = {"num_tokens": inputs["attention_mask"].sum()} if self._counts_tokens(mode) else {}
        self._deferred.add(mode, means=metrics, sums=sums)

    def _flush_metrics(self, mode) -> None:
        """Reduce the micro-batches' metrics since the last flush over ranks (every rank calls this together)."""
        flushed = self._deferred.flush(mode, self.accelerator.gather, self.accelerator.num_processes)
        tokens = flushed.pop("num_tokens", [])
        self.state.num_input_tokens_seen += int(sum(tokens))
        for key, values in flushed.items():
            self._metrics[mode][key].extend(values)
        if mode == "train":
            self._warn_ratio(flushed)

    def log(self, logs, start_time=None):
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        self._flush_metrics(mode)
        for key, values in self._metrics[mode].items():
            values = [v for v in values if not math.isnan(v)]
            if values:
                logs[prefix + key] = sum(values) / len(values)
        self._metrics[mode].clear()
        logs[prefix + "num_tokens"] = float(self.state.num_input_tokens_seen)  # TRL's: the running total
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---- checkpoints: never a poisoned state, never a partial folder ----------------------------
    _checkpoint_run_dir = None  # set while Trainer writes a checkpoint: the staging folder it writes into

    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint, built in a hidden staging folder and renamed to ``checkpoint-N`` once every
        rank has written its part (weights, optimizer, scheduler, RNG, trainer_state.json): a run killed at
        any moment leaves each ``checkpoint-N`` complete or absent. Rotation (``save_total_limit``) runs after."""
        self._flush_metrics("train")  # num_input_tokens_seen in the saved state counts every step so far
        bad = nonfinite_parameters(self.model, self.accelerator)
        if bad:
            raise NonFiniteLossError(f"refusing to checkpoint at step {self.state.global_step}: "
                                     f"non-finite values in {bad[:3]}{'...' if len(bad) > 3 else ''}")
        run_dir = self._get_output_dir(trial)
        final = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged = staging_dir(final)
        if self.args.should_save:
            start_staging(final)
        self.accelerator.wait_for_everyone()
        self._checkpoint_run_dir = str(staged.parent)  # Trainer writes <run dir>/checkpoint-N: the staged one
        try:
            super()._save_checkpoint(model, trial)
            if self.sync_ref_model:
                self._save_reference(staged)
        finally:
            self._checkpoint_run_dir = None
        if self.state.best_model_checkpoint == str(staged):
            self.state.best_model_checkpoint = str(final)
            if self.args.should_save:
                self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states, shards) are in
        if self.args.should_save:
            commit_dir(staged, final)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()  # no rank goes on before checkpoint-N exists

    def _save_reference(self, folder: Path) -> None:
        """TR-DPO's reference as it stands, so resume continues with it (a full copy, written by the main process)."""
        from safetensors.torch import save_file

        ref = self.ref_model
        if type(ref).__name__ == "DeepSpeedEngine":
            logger.warning("sync_ref_model under DeepSpeed: the updated reference is not saved with the checkpoint; "
                           "a resumed run starts its reference again from the initial policy")
            return
        if self.is_fsdp_enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(ref, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            state = {k: v.detach().cpu() for k, v in ref.state_dict().items()}
        if self.args.should_save:
            unique, seen = {}, set()
            for k, v in state.items():  # tied weights: one copy
                if v.data_ptr() not in seen:
                    seen.add(v.data_ptr())
                    unique[k] = v.contiguous()
            save_file(unique, str(folder / REFERENCE_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / REFERENCE_STATE_NAME
        if self.sync_ref_model and path.exists() and type(self.ref_model).__name__ != "DeepSpeedEngine":
            from safetensors.torch import load_file

            state = load_file(str(path))
            check_reference_keys(self.ref_model, state.keys(), path)
            if self.is_fsdp_enabled:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                set_model_state_dict(self.ref_model, state, options=StateDictOptions(full_state_dict=True,
                                                                                     strict=False))
            else:
                self.ref_model.load_state_dict(state, strict=False)  # checked above: only tied copies are absent
            logger.info("TR-DPO: reference restored from %s", path)

    def _get_output_dir(self, trial):
        return self._checkpoint_run_dir or super()._get_output_dir(trial)


class _SkipPoisonedStep(TrainerCallback):
    """``on_nonfinite: skip``: one decision per optimizer step, agreed by all ranks (see ``_agree_on_skip``)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._agree_on_skip()


REFERENCE_STATE_NAME = "reference_model.safetensors"  # TR-DPO: the moving reference, saved with each checkpoint


class SyncReferenceCallback(TrainerCallback):
    """TR-DPO (Gorbatovski et al., "Learn Your Reference Model for Real Good Alignment", arXiv:2404.09656, the
    soft update of Eq. 5): every ``ref_model_sync_steps`` optimizer steps, mix the policy into the reference."""

    def __init__(self, trainer, alpha: float, every: int):
        self.trainer, self.alpha, self.every = trainer, alpha, every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            sync_reference(self.trainer.model, self.trainer.ref_model, self.alpha)


class CostCallback(TrainerCallback):
    """Seconds per optimizer step (median, first step excluded as warm-up) and peak memory of the run.

    Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's peak resident set
    size (VmHWM), which covers everything the process did: run one training per process (as
    ``logitsam compare`` does) to compare variants.
    """

    def __init__(self):
        self.durations: list[float] = []
        self._start = None

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self._start is not None:
            self.durations.append(time.perf_counter() - self._start)

    def summary(self) -> dict:
        steps = self.durations[1:] or self.durations
        if torch.cuda.is_available():
            peak, device = torch.cuda.max_memory_allocated(), "cuda"
        else:
            peak, device = peak_rss_bytes(), "cpu"
        return {"seconds_per_step": statistics.median(steps) if steps else None, "steps_timed": len(steps),
                "peak_memory_bytes": peak, "device": device}


class MetricsJsonlCallback(TrainerCallback):
    """Appends every log record to ``output_dir/metrics.jsonl``.

    At train begin (fresh or resumed) the file is cut back to the records up to the starting step, so each
    step is in it once; the cut is one atomic rewrite, and a last line that a killed run left half-written
    is dropped.
    """

    def __init__(self, output_dir):
        self.path = Path(output_dir) / "metrics.jsonl"

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append((json.loads(line), line))
            except json.JSONDecodeError as e:
                if i < len(lines) - 1:
                    raise ValueError(f"{self.path}: line {i + 1} is not JSON ({e})") from e
                logger.warning("%s: dropping a last line cut short by a killed run: %r", self.path, line[:80])
        # a finished run's end-of-run summary (train_runtime, ...) no longer holds once the run continues
        keep = [line for record, line in records
                if record.get("step", 0) <= state.global_step and "train_runtime" not in record]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))  # a kill here keeps the old file

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

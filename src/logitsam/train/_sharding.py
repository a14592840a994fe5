"""Weights across wrappers: what the trainer does to every parameter of a policy or reference, whether it is
plain, wrapped by DDP, sharded by FSDP2 (``DTensor``) or partitioned by DeepSpeed ZeRO-3.

Kept apart from ``trainer.py`` (the training step); each function works on the outermost module it is given.
"""

from __future__ import annotations

import copy

import torch

from ..models import ModelError, unwrap_model

# float attributes that attention modules apply as functional dropout (Llama/Qwen/Mistral: ``attention_dropout``)
FUNCTIONAL_DROPOUT = ("attention_dropout", "attn_dropout_p", "dropout_p")


def disable_dropout_in_model(model) -> None:
    """Dropout off (``disable_dropout``): the log-probs become a function of the weights, the same in the clean
    and the perturbed pass. TRL 1.16 sets every ``nn.Dropout`` to p = 0; Llama-family attention applies its
    dropout functionally from the module's ``attention_dropout``, which TRL leaves on: zeroed here too."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in FUNCTIONAL_DROPOUT:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def deepspeed_inference_engine(model, accelerator):
    """``model`` (frozen) inside a DeepSpeed engine without optimizer, as TRL's ``prepare_deepspeed`` builds it.

    ZeRO-3: the engine's forward gathers the partitions ``zero.Init`` made at load; sizes the run's config leaves
    at "auto" get TRL's values from the hidden size d (the user's own values are kept, e.g. a persistence
    threshold of 0). ZeRO-1/2 shard only optimizer state and gradients, which a frozen model has none of: stage 0.
    """
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):  # training-only blocks: no optimizer to attach them to
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if zero.get("stage", 0) != 3:
        zero["stage"] = 0
    else:
        d = max(getattr(model.config, "hidden_sizes", None) or [model.config.hidden_size])
        for key, value in (("reduce_bucket_size", d * d), ("stage3_param_persistence_threshold", 10 * d),
                           ("stage3_prefetch_bucket_size", int(0.9 * d * d))):
            if zero.get(key, "auto") == "auto":
                zero[key] = value
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine


def _local_values(p: torch.Tensor) -> torch.Tensor:
    """This rank's own values of a parameter: the local shard of an FSDP2 DTensor, a ZeRO-3 partition."""
    if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3: the parameter itself is an empty placeholder
        return p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p


def nonfinite_parameters(model, accelerator) -> list[str]:
    """Names of parameters holding a non-finite value on *any* rank (one all-reduce of per-parameter flags).

    Under sharding each rank sees only its shard, so a local check alone would let one rank raise while the
    others enter the collective save and wait forever.
    """
    named = list(model.named_parameters())
    # one device flag per parameter, stacked: one host read for the whole model, not one per parameter
    flags = torch.stack([~torch.isfinite(_local_values(p).detach()).all() for _, p in named]).float()
    flags = flags.to(accelerator.device)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    return [n for (n, _), f in zip(named, flags.tolist(), strict=True) if f > 0]


def sync_reference(policy, reference, alpha: float) -> None:
    """TR-DPO's soft update ``ref <- (1 - alpha) ref + alpha policy``, parameter by parameter (paired by name).

    Unsharded and FSDP2 (both models sharded in the same layout: each rank mixes its own shard) run on every
    rank; under DeepSpeed ZeRO-3 each pair is gathered in turn (the whole of one tensor of each model at a time,
    never both models at once) and rank 0 writes it, as TRL 1.16's ``SyncRefModelCallback`` does for all at once.
    """
    policy = unwrap_model(policy)
    ref_module = reference.module if type(reference).__name__ == "DeepSpeedEngine" else reference
    ref = dict(unwrap_model(ref_module).named_parameters())
    pairs = [(ref[name], p) for name, p in policy.named_parameters() if name in ref]
    if len(pairs) != len(ref):
        missing = sorted(set(ref) - {n for n, _ in policy.named_parameters()})[:3]
        raise ValueError(f"sync_ref_model: the reference has parameters the policy lacks: {missing}")

    def mix(target, source):
        with torch.no_grad():
            target.data.mul_(1.0 - alpha).add_(source.data.to(target.dtype), alpha=alpha)

    if any(hasattr(t, "ds_id") for t, _ in pairs):
        import deepspeed

        rank0 = deepspeed.comm.get_rank() == 0
        for target, source in pairs:  # collective gathers, in the same order on every rank
            with deepspeed.zero.GatheredParameters([target, source], modifier_rank=0):
                if rank0:
                    mix(target, source)
    else:
        for target, source in pairs:
            mix(target, source)


def check_reference_keys(reference, keys, path) -> None:
    """The saved TR-DPO reference (``path``) must match the model it is loaded into: no unknown names, and every
    absent name a tied copy of one that is present (``_save_reference`` writes tied weights once). Raises
    ``ModelError`` naming the file and the first names, instead of a silent partial load."""
    module = unwrap_model(reference)
    expected = set(module.state_dict())
    keys = set(keys)
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    tied = {n for names in groups.values() if len(names) > 1 and keys & set(names) for n in names}
    unknown, missing = sorted(keys - expected), sorted(expected - keys - tied)
    if unknown or missing:
        detail = "; ".join(f"{what}: {names[:3]}{'...' if len(names) > 3 else ''}"
                           for what, names in (("not in the model", unknown), ("missing", missing)) if names)
        raise ModelError(f"{path}: the saved TR-DPO reference does not match the model ({detail}); resume with "
                         "the model the checkpoint was trained from")

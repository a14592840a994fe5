"""Run the whole LM-head computation inside the outermost wrapper's forward (DDP, FSDP2, DeepSpeed ZeRO-3).

A sharding wrapper gathers a module's weights in that module's forward pre-hook and reduces their gradients
through hooks its forward registered. A head applied after ``model(...)`` has returned reads whatever the
layout left behind: a sharded ``DTensor`` (FSDP2, when the head's group reshards after forward) or an empty
partition (ZeRO-3); calling ``DTensor.full_tensor()`` on it would leave the head's gradient unreduced.

So for one call, the LM head module's ``forward`` is replaced by ``head_pass`` (an instance attribute, put
back afterwards). The outermost module is called as usual, with ``logits_to_keep=0``: its hooks run (FSDP2
unshard/reshard and backward hooks, DDP's gradient sync, PEFT adapters), the model's own forward runs the
backbone and calls the head on the final hidden states of every position, and ``head_pass`` computes
everything the step needs from the head's gathered weight -- clean pass, eps, perturbed pass, loss -- and
returns one tensor, which the model returns as its ``logits``. No (B, T, V) logits are built.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from ..models import lm_head_of, unwrap_model


def head_inside_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        head_pass: Callable[[torch.Tensor, nn.Module], torch.Tensor],
                        aux: dict | None = None) -> torch.Tensor:
    """``head_pass(hidden, lm_head)`` run as the LM head's forward, inside ``model``'s forward.

        out = head_inside_forward(model, ids, mask, lambda hidden, head: f(hidden, head.weight))
        # == f(forward_hidden(model, ids, mask), lm_head_of(model).weight) for an unsharded model

    Args:
        model: the outermost module (DDP, FSDP2 root, DeepSpeed engine, PEFT around a transformers causal LM).
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        head_pass: maps ``hidden (B, T, d)`` (attached to the backbone's graph) and the head module, whose
            ``weight (V, d)`` is the gathered one while it runs, to the tensor to return (a loss, or
            detached log-probs). Side results (statistics) go out through the caller's closure.
        aux: when a dict, the forward also asks a mixture-of-experts model for its router logits and stores
            the model's load-balancing loss under ``aux["aux_loss"]`` (nothing for a model without one).

    Returns:
        what ``head_pass`` returned, after the wrapper's post-forward hooks (FSDP2 registers its
        pre-backward hook on it: the head's weight is gathered again for the backward).
    """
    base = unwrap_model(model.module if type(model).__name__ == "DeepSpeedEngine" else model)
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        raise TypeError(f"{type(base).__name__}.forward has no logits_to_keep; it would build full logits")
    head = lm_head_of(base)
    calls = []

    def forward(hidden: torch.Tensor) -> torch.Tensor:  # (B, T, d): logits_to_keep=0 keeps every position
        calls.append(hidden.shape)
        return head_pass(hidden, head)

    own = head.__dict__.get("forward")  # a forward already bound on the instance (accelerate's hooks)
    head.forward = forward
    try:
        extra = {"output_router_logits": True} if aux is not None else {}
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=0, use_cache=False, **extra)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
    assert len(calls) == 1, f"the LM head ran {len(calls)} times in one forward"
    assert tuple(calls[0][:2]) == tuple(input_ids.shape), f"head saw {tuple(calls[0])} for {tuple(input_ids.shape)}"
    if aux is not None and getattr(out, "aux_loss", None) is not None:
        aux["aux_loss"] = out.aux_loss
    return out.logits

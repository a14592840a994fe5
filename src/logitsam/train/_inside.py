"""Run the whole LM-head computation inside the outermost wrapper's forward (DDP, FSDP2, DeepSpeed ZeRO-3).

A sharding wrapper gathers a module's weights in that module's forward pre-hook and reduces their gradients
through hooks its forward registered. A head applied after ``model(...)`` has returned reads whatever the
layout left behind: a sharded ``DTensor`` (FSDP2, when the head's group reshards after forward) or an empty
partition (ZeRO-3); calling ``DTensor.full_tensor()`` on it would leave the head's gradient unreduced.

So for one call, the LM head module runs ``head_pass`` as its forward. The outermost module is called as
usual, with ``logits_to_keep=0``: its hooks run (FSDP2 unshard/reshard and backward hooks, DDP's gradient
sync, PEFT adapters), the model's own forward runs the backbone and calls the head on the final hidden states
of every position, and ``head_pass`` computes everything the step needs from the head's gathered weight --
clean pass, eps, perturbed pass, loss -- and returns one tensor, which the model returns as its ``logits``.
No (B, T, V) logits are built.

torch.compile: the head gets one persistent forward (``_head_forward``, bound on the instance at first use),
which runs the pass set in a slot on the head for the duration of the call, else the head's own forward. What
dynamo guards on -- the bound forward and a bool -- is the same at every step, so the compiled model is not
recompiled per step. The pass itself runs eager (``torch.compiler.disable``): a new closure each step that
writes side results into the caller's dicts, with ``torch.autograd.grad`` in logits-SAM, it is one deliberate
graph break (traced instead, it split into 24 graphs, recompiled over the first five steps). The backbone
before it compiles to one graph.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable

import torch
from torch import nn

from ..models import lm_head_of, unwrap_model


def _head_forward(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The head's forward: the current head pass inside ``head_inside_forward``, else the head's own forward."""
    if head._logitsam_active:  # a bool: dynamo guards on its value, the same at every step
        return _run_head_pass(head, hidden)
    own = head._logitsam_own_forward  # a forward bound on the instance before ours (accelerate's hooks), or None
    return own(hidden) if own is not None else type(head).forward(head, hidden)


@torch.compiler.disable
def _run_head_pass(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return head._logitsam_pass(hidden)  # a new closure each call: read only here, outside the compiled graph


def _install_head_forward(head: nn.Module) -> None:
    """Bind ``_head_forward`` on the head at its first use; later calls change nothing.

    A wrapper bound on the instance later (accelerate's ``add_hook_to_module``) calls ours in turn, so the
    pass still runs, with the wrapper's hooks around it.
    """
    if "_logitsam_own_forward" in head.__dict__:
        return
    head._logitsam_own_forward = head.__dict__.get("forward")
    head._logitsam_active, head._logitsam_pass = False, None
    head.forward = types.MethodType(_head_forward, head)


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
    base = unwrap_model(model)
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        raise TypeError(f"{type(base).__name__}.forward has no logits_to_keep; it would build full logits")
    head = lm_head_of(base)
    calls = []

    def forward(hidden: torch.Tensor) -> torch.Tensor:  # (B, T, d): logits_to_keep=0 keeps every position
        calls.append(hidden.shape)
        return head_pass(hidden, head)

    _install_head_forward(head)
    outer = head._logitsam_active, head._logitsam_pass
    head._logitsam_active, head._logitsam_pass = True, forward
    try:
        extra = {"output_router_logits": True} if aux is not None else {}
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=0, use_cache=False, **extra)
    finally:
        head._logitsam_active, head._logitsam_pass = outer
    assert len(calls) == 1, f"the LM head ran {len(calls)} times in one forward"
    assert tuple(calls[0][:2]) == tuple(input_ids.shape), f"head saw {tuple(calls[0])} for {tuple(input_ids.shape)}"
    if aux is not None and getattr(out, "aux_loss", None) is not None:
        aux["aux_loss"] = out.aux_loss
    return out.logits


def check_linear_head_inside(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                             name=None, device=None) -> None:
    """``models.check_linear_head`` for a model as training runs it: prepared, wrapped and possibly sharded.

    The two probes (the batch's last-position hidden states, and the same scaled until the largest logit is
    ``PROBE_LOGIT``) run as the LM head's forward inside the outermost wrapper's forward, where FSDP2 and ZeRO-3
    have gathered the head, under whatever autocast the prepared model applies. The head returns both probes'
    ``hidden @ W^T (+ b)`` as a (B, 2, V) tensor; a model that soft-caps, scales or multiplies its logits does so to
    what the head returned, and the model's logits then differ from it. One forward on every rank (a collective
    under sharding): call it on all ranks with the same batch shape.

    Args:
        model: the outermost module (DDP, FSDP2 root, DeepSpeed engine, PEFT, or a plain causal LM).
        input_ids, attention_mask: (B, T), a few real rows; moved to ``device`` (default: the first parameter's).
        name: the model's path or id, for the message.

    Raises:
        ModelError: as ``check_linear_head``.
    """
    from ..models import PROBE_LOGIT, ModelError, compare_head_probes

    base = unwrap_model(model)
    label = f"{str(name)!r} ({type(base).__name__})" if name is not None else type(base).__name__
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        raise ModelError(f"{label}: its forward has no logits_to_keep, so logitsam cannot run it without "
                         "building (B, T, V) logits")
    device = device if device is not None else next(base.parameters()).device
    kept: dict = {}

    def head_pass(hidden: torch.Tensor, head: nn.Module) -> torch.Tensor:
        last = hidden[:, -1:]  # (B, 1, d)
        weight, bias = head.weight, getattr(head, "bias", None)
        plain = torch.nn.functional.linear(last, weight, bias)  # (B, 1, V)
        scale = PROBE_LOGIT / plain.float().abs().amax().clamp_min(1e-6)
        amplified = torch.nn.functional.linear(last * scale.to(last.dtype), weight, bias)
        kept["want"] = torch.cat([plain, amplified], dim=1)  # (B, 2, V)
        kept["scale"] = scale
        return kept["want"]

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = head_inside_forward(model, input_ids.to(device), attention_mask.to(device), head_pass)
    finally:
        model.train(was_training)
    want = kept["want"]
    checks = [("its own hidden states", logits[:, 0], want[:, 0]),
              (f"hidden states x {float(kept['scale']):.3g}", logits[:, 1], want[:, 1])]
    compare_head_probes(base, label, checks, want.dtype)

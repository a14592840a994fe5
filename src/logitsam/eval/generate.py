"""Batched, seeded sampling of responses (left padding, KV cache) for judged evaluation and benchmark exports."""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

Prompt = str | list[dict[str, str]]


def render_prompt(tokenizer: Any, prompt: Prompt, apply_chat_template: bool | None = None) -> tuple[str, bool]:
    """The prompt text and whether the tokenizer should add its special tokens.

    Same rule as training (``logitsam.data`` tokenisation): a message list is rendered with the chat
    template (``add_generation_prompt=True``); a string is used as-is, or as one user message with
    ``apply_chat_template=True``. A chat-rendered prompt gets no extra special tokens (the template
    writes them); a raw string gets them (a BOS where the tokenizer adds one).
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    is_messages = isinstance(prompt, list)
    use_template = apply_chat_template or (apply_chat_template is None and is_messages)
    if not use_template:
        if is_messages:
            raise ValueError("a message-list prompt needs apply_chat_template=None or True; render it to a "
                             "string first (e.g. logitsam.data.render_hh_transcript) to use it raw")
        return prompt, True
    if not has_template:
        raise ValueError("the tokenizer has no chat_template; pass string prompts (e.g. rendered with "
                         "logitsam.data.render_hh_transcript) or a tokenizer with a template")
    messages = prompt if is_messages else [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False


def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a response: the generation config's EOS ids (an int or a list), then the tokenizer's.

    Chat models often list several (Llama 3: ``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>``); passing
    only ``tokenizer.eos_token_id`` to ``generate`` would replace that list and run past the turn's end.
    """
    config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = config if isinstance(config, list | tuple) else [config]
    return list(dict.fromkeys(int(i) for i in [*ids, tokenizer.eos_token_id] if i is not None))


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids, mask


def generation_settings(*, max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                        batch_size: int = 8, seed: int = 0) -> dict:
    """The settings ``generate_token_ids`` samples with, as recorded next to its samples (``eval_results.json``).

    ``do_sample`` is False for ``temperature=0`` (greedy decoding; ``top_p`` and ``top_k`` then play no part).
    Every batch is left-padded and decoded with the KV cache (``padding_side``, ``use_cache``).

    Raises:
        ValueError: a setting out of range, named with its value.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must both be >= 1")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"temperature={temperature} must be >= 0, top_p={top_p} in (0, 1] and top_k={top_k} >= 0")
    return {"do_sample": temperature > 0, "temperature": float(temperature), "top_p": float(top_p),
            "top_k": int(top_k), "max_new_tokens": int(max_new_tokens), "seed": int(seed),
            "batch_size": int(batch_size), "padding_side": "left", "use_cache": True}


@torch.no_grad()
def generate_token_ids(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[Prompt],
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 8,
    seed: int = 0,
    apply_chat_template: bool | None = None,
    progress: bool = True,
) -> list[list[int]]:
    """Sample one response per prompt, in order, deterministically for a given seed and batch size.

    Prompts are rendered by ``render_prompt``, left-padded (so every row's new tokens start at the same
    column) and sampled with ``model.generate`` and its KV cache, ``batch_size`` prompts at a time.
    ``temperature=0`` decodes greedily; otherwise plain ancestral sampling with nucleus ``top_p`` and, if
    ``top_k > 0``, top-k (our arguments override any sampling settings in the model's ``generation_config``).
    Batch ``k`` draws from ``torch.manual_seed(seed + k)`` inside ``torch.random.fork_rng``, so the caller's
    global RNG state is untouched. Generation stops at any of ``stop_token_ids`` (the generation config's EOS
    ids and the tokenizer's). The model runs in eval mode (restored afterwards). ``generation_settings``
    checks the settings and records them.

    Args:
        model: a causal LM (the device is taken from its parameters).
        tokenizer: its tokenizer; needs a pad or an eos token.
        prompts: strings or chat message lists.
    Returns:
        Each prompt's new tokens, up to and including the first stop id (none when the response was cut off
        at ``max_new_tokens``); the padding after it is dropped.
    """
    settings = generation_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   top_k=top_k, batch_size=batch_size, seed=seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token")
    device = next(model.parameters()).device
    eos_ids = stop_token_ids(model, tokenizer)
    encoded = []
    for prompt in prompts:
        text, special = render_prompt(tokenizer, prompt, apply_chat_template)
        encoded.append(tokenizer(text, add_special_tokens=special)["input_ids"])
    sampling = {"do_sample": False}
    if settings["do_sample"]:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    was_training = model.training
    model.eval()
    responses: list[list[int]] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for k, start in enumerate(tqdm(range(0, len(encoded), batch_size), desc="generate", unit="batch",
                                           disable=not progress)):
                ids, mask = _left_pad(encoded[start:start + batch_size], pad_id)
                torch.manual_seed(seed + k)
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id, eos_token_id=eos_ids or None, use_cache=True, **sampling,
                )
                responses.extend(_until_stop(row, eos_ids) for row in out[:, ids.shape[1]:].tolist())  # (b, <= new)
    finally:
        model.train(was_training)
    return responses


def _until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """``ids`` up to and including its first stop id (``generate`` pads the rows that ended early)."""
    stops = set(stop_ids)
    return next((ids[:i + 1] for i, t in enumerate(ids) if t in stops), ids)


def generate_responses(model: torch.nn.Module, tokenizer: Any, prompts: list[Prompt], **settings) -> list[str]:
    """``generate_token_ids`` (same keyword arguments) decoded, special tokens stripped: one string per prompt."""
    return tokenizer.batch_decode(generate_token_ids(model, tokenizer, prompts, **settings), skip_special_tokens=True)

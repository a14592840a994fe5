"""Render, tokenise and truncate normalised examples into DPO features.

Rendering (``apply_chat_template=None``, the default):

- a message-list prompt (``hh``, ``conversational``) with a tokenizer that has a chat template:
  ``apply_chat_template(messages, add_generation_prompt=True)``; the completion is the bare response.
- a message-list prompt without a chat template (or ``apply_chat_template=False``): the HH transcript
  ``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:"``; the completion is ``" " + response``. This is
  the raw HH-RLHF text that base models such as Pythia are trained on.
- a string prompt (``prompt_chosen_rejected``): the string as-is, completion verbatim. With
  ``apply_chat_template=True`` it becomes one user message rendered with the template.

A chat-rendered prompt is tokenised with ``add_special_tokens=False`` (the template writes its own
special tokens); a raw prompt with ``add_special_tokens=True`` (a BOS where the tokenizer adds one).
Completions never get special tokens from the tokenizer; ``add_eos`` appends ``eos_token_id``.

Truncation (`truncate_pair`), per pair, prompt first:

1. if ``len(prompt) > max_prompt_length``: ``keep_end`` keeps the prompt's last ``max_prompt_length``
   tokens, ``keep_start`` its first;
2. each completion (EOS included) keeps its first ``max_length - len(prompt)`` tokens, so a cut
   completion loses its EOS;
3. a pair with no completion token left is invalid (``prompt_too_long``).

Step 1 is the prompt truncation of TRL 0.x (``max_prompt_length`` cut per ``truncation_mode``).
TRL 1.x removed ``max_prompt_length`` (deprecated in 0.28) and applies ``truncation_mode`` to the whole
prompt + completion sequence, with ``keep_end`` deprecated. Step 2 is what TRL's ``keep_start`` does to
that sequence once the prompt fits: a completion is only ever cut at its tail. So with
``max_prompt_length=None`` this rule equals TRL 1.x ``keep_start``, except that a prompt filling all of
``max_length`` is reported instead of kept with no completion tokens.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, NamedTuple

from ._formats import PreferenceExample
from ._report import DropReport, logger

TRUNCATION_MODES = ("keep_end", "keep_start")
IGNORE_INDEX = -100
_HH_SPEAKER = {"user": "Human", "assistant": "Assistant"}


def truncate_pair(
    prompt_ids: list[int],
    completion_ids: list[int],
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    truncation_mode: str = "keep_end",
) -> tuple[list[int], list[int]]:
    """Apply the truncation rule of this module to one prompt and one completion.

    Returns:
        ``(prompt_ids, completion_ids)``; the completion may come back empty (no room left).
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode={truncation_mode!r}; allowed: {', '.join(TRUNCATION_MODES)}")
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        keep_end = truncation_mode == "keep_end"
        prompt_ids = prompt_ids[-max_prompt_length:] if keep_end else prompt_ids[:max_prompt_length]
    if max_length is not None:
        completion_ids = completion_ids[: max(0, max_length - len(prompt_ids))]
    return prompt_ids, completion_ids


def render_hh_transcript(messages: list[dict[str, str]]) -> str:
    """Messages as an HH-RLHF prompt: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` + ``"\\n\\nAssistant:"``.

    A system message is written as plain text, where it stands.
    """
    turns = [
        m["content"] if m["role"] == "system" else f"\n\n{_HH_SPEAKER[m['role']]}: {m['content']}"
        for m in messages
    ]
    return "".join(turns) + "\n\nAssistant:"


def tokenize_examples(
    examples: list[PreferenceExample],
    tokenizer: Any,
    *,
    max_length: int | None = 512,
    max_prompt_length: int | None = 256,
    truncation_mode: str = "keep_end",
    add_eos: bool = True,
    apply_chat_template: bool | None = None,
    report: DropReport | None = None,
) -> dict[str, list]:
    """Tokenise normalised examples into DPO feature columns.

    Args:
        examples: from `normalize_rows`.
        tokenizer: a Hugging Face tokenizer (a fast one tokenises thousands of rows in a second).
        max_length, max_prompt_length, truncation_mode: see the module docstring; None disables a limit.
        add_eos: append ``tokenizer.eos_token_id`` to each completion.
        apply_chat_template: None renders message prompts with the chat template when the tokenizer has
            one; True also renders string prompts with it (error without one); False never uses it.
        report: receives ``prompt_too_long`` and ``chat_template_error`` rows; None raises on them.

    Returns:
        Columns, one entry per kept example: ``row`` (source row), ``prompt_length`` (tokens),
        ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels``. Labels are
        unshifted (aligned with input_ids): -100 over the prompt, the token id over the completion.
    """
    report = report if report is not None else DropReport("<examples>")
    _check_lengths(max_length, max_prompt_length, truncation_mode)
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError("add_eos=True but the tokenizer has no eos_token_id; pass add_eos=False")
    if apply_chat_template and not tokenizer.chat_template:
        raise ValueError("apply_chat_template=True but the tokenizer has no chat_template")

    rendered = _render_prompts(examples, tokenizer, apply_chat_template, report)
    kept = [(ex, r) for ex, r in zip(examples, rendered, strict=True) if r is not None]
    styles = Counter(r.style for _, r in kept)
    logger.info("%s: prompts rendered: %s", report.source, ", ".join(f"{k}={v}" for k, v in styles.items()))
    # One batched call per group into the (fast) tokenizer; special tokens only on raw-text prompts.
    prompt_ids: list[list[int]] = [[] for _ in kept]
    for special in (True, False):
        where = [i for i, (_, r) in enumerate(kept) if r.add_special_tokens == special]
        for i, ids in zip(where, _encode(tokenizer, [kept[i][1].prompt for i in where], special), strict=True):
            prompt_ids[i] = ids
    completions = {
        side: _encode(tokenizer, [r.completion_prefix + ex[side] for ex, r in kept], False)
        for side in ("chosen", "rejected")
    }
    eos = [tokenizer.eos_token_id] if add_eos else []

    columns: dict[str, list] = {k: [] for k in ("row", "prompt_length", "chosen_input_ids", "chosen_labels",
                                                "rejected_input_ids", "rejected_labels")}
    for i, (ex, _) in enumerate(kept):
        pair = {}
        for side in ("chosen", "rejected"):
            completion = completions[side][i]
            if eos and completion[-1:] != eos:
                completion = completion + eos
            pair[side] = truncate_pair(prompt_ids[i], completion, max_length=max_length,
                                       max_prompt_length=max_prompt_length, truncation_mode=truncation_mode)
        (prompt, chosen), (_, rejected) = pair["chosen"], pair["rejected"]
        if not chosen or not rejected:
            report.reject(ex["row"], "prompt", "prompt_too_long",
                          f"prompt of {len(prompt)} tokens leaves no room in max_length={max_length}")
            continue
        columns["row"].append(ex["row"])
        columns["prompt_length"].append(len(prompt))
        for side, completion in (("chosen", chosen), ("rejected", rejected)):
            columns[f"{side}_input_ids"].append(prompt + completion)
            columns[f"{side}_labels"].append([IGNORE_INDEX] * len(prompt) + completion)
    return columns


def _check_lengths(max_length: int | None, max_prompt_length: int | None, truncation_mode: str) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode={truncation_mode!r}; allowed: {', '.join(TRUNCATION_MODES)}")
    for key, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and value < 1:
            raise ValueError(f"{key}={value}; must be a positive integer or None")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be < max_length={max_length}, "
                         "or no completion token fits after a full-length prompt")


class _Rendered(NamedTuple):
    prompt: str
    completion_prefix: str
    add_special_tokens: bool
    style: str  # "chat_template", "hh_transcript" or "raw"


def _render_prompts(examples, tokenizer, apply_chat_template, report) -> list[_Rendered | None]:
    """Each example's prompt text; None where the chat template refused it (the row is rejected)."""
    from jinja2.exceptions import TemplateError

    has_template = bool(tokenizer.chat_template)
    rendered: list[_Rendered | None] = []
    for ex in examples:
        prompt = ex["prompt"]
        is_messages = isinstance(prompt, list)
        if not (apply_chat_template or (apply_chat_template is None and is_messages and has_template)):
            if is_messages:
                rendered.append(_Rendered(render_hh_transcript(prompt), " ", True, "hh_transcript"))
            else:
                rendered.append(_Rendered(prompt, "", True, "raw"))
            continue
        messages = prompt if is_messages else [{"role": "user", "content": prompt}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:
            report.reject(ex["row"], "prompt", "chat_template_error", str(e))
            rendered.append(None)
            continue
        rendered.append(_Rendered(text, "", False, "chat_template"))
    return rendered


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]

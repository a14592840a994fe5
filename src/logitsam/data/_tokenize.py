"""Render, tokenise and truncate normalised examples into DPO features, by default as TRL 1.16 does.

Rendering, ``chat_rendering="trl"`` (the default; TRL 1.16 ``DPOTrainer._prepare_dataset``):

- a message-list prompt (``conversational``): the chat template over the whole conversation.
  ``prompt = apply_chat_template(prompt, add_generation_prompt=True)`` and
  ``prompt + chosen = apply_chat_template(prompt + [{"role": "assistant", "content": chosen}])``, both
  tokenised without added special tokens; the completion is everything after the prompt, so the
  template's end of turn is trained (ChatML ``<|im_end|>\\n``, Llama-3 ``<|eot_id|>``, Gemma
  ``<end_of_turn>\\n``, Zephyr ``</s>\\n``). No EOS is appended.
- text (``hh`` transcripts, string prompts): ``tokenizer(prompt)`` and ``tokenizer(prompt + chosen + eos)``
  with the tokenizer's own special tokens; ``eos_token`` is appended as text unless the response ends
  with it. HH transcripts are the raw text, split at the character level as TRL's ``extract_prompt`` does
  (`logitsam.data._formats.extract_prompt_text`): a response prefix that chosen and rejected share
  belongs to the prompt.

Either way the completion starts where the tokenised prompt and the tokenised ``prompt + response``
first differ (TRL's ``common_prefix_length``); rows where that cuts the prompt short are counted and logged.

``apply_chat_template`` changes what goes through the template: None (default) renders message prompts
with it and the rest as text; True also renders HH transcripts (as messages) and string prompts (as one
user message); False renders message prompts as an HH transcript ``"\\n\\nHuman: ...\\n\\nAssistant:"`` +
``" " + response``. A message prompt with no chat template to render it is an error.

``chat_rendering="per_message"`` is logitsam's earlier rendering: the prompt and each response are
tokenised on their own. A templated prompt is ``apply_chat_template(prompt, add_generation_prompt=True)``
and its completion the bare response + ``eos_token_id``, so a template's turn end after the response is
not trained. With ``apply_chat_template=None``, HH transcripts go through the template too, and
message prompts fall back to the HH transcript when the tokenizer has no template.

BOS: a chat-rendered sequence gets ``tokenizer.bos_token_id`` in front when the tokenizer adds a BOS to
plain text (``tokenizer("a")`` starts with it) and the template did not write one. Zephyr's template
does not write ``<s>``, yet its model was trained after a BOS (the SFT recipe tokenised the rendered
text with special tokens). TRL 1.16 does not add it; here it is not lost. Templates that write their
BOS (Llama-3, Gemma) and tokenizers without one (ChatML, Qwen) are unchanged.

Truncation (`truncate_pair`), per sequence:

1. ``max_prompt_length`` (not a TRL 1.x key; default None): the prompt keeps its last
   ``max_prompt_length`` tokens, those nearest the response.
2. ``truncation_mode`` on the whole prompt + completion sequence (TRL 1.16): ``keep_start`` keeps its
   first ``max_length`` tokens, ``keep_end`` (deprecated in TRL) its last.
3. with ``keep_start``, a pair whose prompt alone has ``>= max_length`` tokens is dropped
   (``prompt_too_long``), as TRL drops it; ``keep_end`` drops nothing.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from ._formats import PreferenceExample
from ._report import DataError, DropReport, logger

TRUNCATION_MODES = ("keep_start", "keep_end")
CHAT_RENDERINGS = ("trl", "per_message")
IGNORE_INDEX = -100
_HH_SPEAKER = {"user": "Human", "assistant": "Assistant"}


def truncate_pair(
    prompt_ids: list[int],
    completion_ids: list[int],
    *,
    max_length: int | None,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_start",
) -> tuple[list[int], list[int]]:
    """Apply steps 1-2 of the module's truncation rule to one prompt + completion sequence.

    Returns:
        ``(prompt_ids, completion_ids)`` as kept in the sequence. With ``keep_start`` the completion comes
        back empty when the prompt fills ``max_length``; with ``keep_end`` the prompt can come back short
        or empty.
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise DataError(f"truncation_mode={truncation_mode!r}; allowed: {', '.join(TRUNCATION_MODES)}")
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if max_length is None or len(prompt_ids) + len(completion_ids) <= max_length:
        return prompt_ids, completion_ids
    if truncation_mode == "keep_start":
        return prompt_ids[:max_length], completion_ids[: max(0, max_length - len(prompt_ids))]
    room = max(0, max_length - len(completion_ids))
    return prompt_ids[len(prompt_ids) - room:], completion_ids[-max_length:]


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
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_start",
    chat_rendering: str = "trl",
    apply_chat_template: bool | None = None,
    add_eos: bool = True,
    report: DropReport | None = None,
) -> dict[str, list]:
    """Tokenise normalised examples into DPO feature columns.

    Args:
        examples: from `normalize_rows`.
        tokenizer: a Hugging Face tokenizer (a fast one tokenises thousands of rows in a second).
        max_length, max_prompt_length, truncation_mode: see the module docstring; None disables a limit.
        chat_rendering: "trl" (TRL 1.16's tokenisation) or "per_message" (logitsam's earlier one).
        apply_chat_template: which prompts the chat template renders (module docstring).
        add_eos: append the EOS token to text completions ("trl") or to every completion ("per_message").
            A "trl" chat-rendered completion ends with the template's turn end instead.
        report: receives ``prompt_too_long`` and ``chat_template_error`` rows; None raises on them.

    Returns:
        Columns, one entry per kept example: ``row`` (source row), ``prompt_length`` (prompt tokens before
        ``max_length`` truncation, which only ``keep_end`` applies to the prompt), ``chosen_input_ids``,
        ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels``. Labels are unshifted (aligned with
        input_ids): -100 over the prompt, the token id over the completion.
    """
    report = report if report is not None else DropReport("<examples>")
    _check_settings(tokenizer, max_length, max_prompt_length, truncation_mode, chat_rendering, add_eos,
                    apply_chat_template)
    if chat_rendering == "trl":
        encoded = _encode_trl(examples, tokenizer, apply_chat_template, add_eos, report)
    else:
        encoded = _encode_per_message(examples, tokenizer, apply_chat_template, add_eos, report)

    columns: dict[str, list] = {k: [] for k in ("row", "prompt_length", "chosen_input_ids", "chosen_labels",
                                                "rejected_input_ids", "rejected_labels")}
    for ex, prompt, chosen, rejected in encoded:
        if max_prompt_length is not None:
            prompt = prompt[-max_prompt_length:]
        if truncation_mode == "keep_start" and max_length is not None and len(prompt) >= max_length:
            report.reject(ex["row"], "prompt", "prompt_too_long", f"prompt of {len(prompt)} tokens fills "
                          f"max_length={max_length}; truncation_mode=keep_start leaves no completion token")
            continue
        columns["row"].append(ex["row"])
        columns["prompt_length"].append(len(prompt))
        for side, completion in (("chosen", chosen), ("rejected", rejected)):
            kept_prompt, kept = truncate_pair(prompt, completion, max_length=max_length,
                                              truncation_mode=truncation_mode)
            columns[f"{side}_input_ids"].append(kept_prompt + kept)
            columns[f"{side}_labels"].append([IGNORE_INDEX] * len(kept_prompt) + kept)
    return columns


def _check_settings(tokenizer, max_length, max_prompt_length, truncation_mode, chat_rendering, add_eos,
                    apply_chat_template) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise DataError(f"truncation_mode={truncation_mode!r}; allowed: {', '.join(TRUNCATION_MODES)}")
    if chat_rendering not in CHAT_RENDERINGS:
        raise DataError(f"chat_rendering={chat_rendering!r}; allowed: {', '.join(CHAT_RENDERINGS)}")
    for key, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and value < 1:
            raise DataError(f"{key}={value}; must be a positive integer or None")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise DataError(f"max_prompt_length={max_prompt_length} must be < max_length={max_length}, "
                        "or no completion token fits after a full-length prompt")
    if add_eos and tokenizer.eos_token_id is None:
        raise DataError("add_eos=True but the tokenizer has no eos_token_id; pass add_eos=False")
    if apply_chat_template and not tokenizer.chat_template:
        raise DataError("apply_chat_template=True but the tokenizer has no chat_template")


# --- chat_rendering="trl" ---------------------------------------------------------------------------

def _encode_trl(examples, tokenizer, apply_chat_template, add_eos, report):
    """``(example, prompt_ids, chosen_ids, rejected_ids)`` per kept example, as TRL 1.16 tokenises them."""
    from jinja2.exceptions import TemplateError

    eos = tokenizer.eos_token if add_eos else None
    bos = _bos_to_restore(tokenizer)
    texts: list[tuple[PreferenceExample, tuple[str, str, str], bool]] = []  # (ex, 3 texts, chat-rendered)
    for ex in examples:
        messages = _prompt_messages(ex, apply_chat_template, default_hh_template=False)
        if messages is None:
            prompt, chosen, rejected = _prompt_text(ex)
            chosen, rejected = (_with_eos(t, eos) for t in (chosen, rejected))
            texts.append((ex, (prompt, prompt + chosen, prompt + rejected), False))
            continue
        if not tokenizer.chat_template:
            raise DataError(f"row {ex['row']}: a message-list prompt needs a chat template, and the tokenizer "
                            "has none; set apply_chat_template: false to render it as an HH transcript")
        try:
            rendered = (
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                *(tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": ex[side]}],
                                                tokenize=False) for side in ("chosen", "rejected")),
            )
        except TemplateError as e:
            report.reject(ex["row"], "prompt", "chat_template_error", str(e))
            continue
        texts.append((ex, rendered, True))
    _log_styles(report, Counter("chat_template" if chat else "text" for *_, chat in texts))

    ids: list[list[list[int]]] = [[] for _ in texts]
    for chat in (False, True):  # one batched tokenizer call per kind; special tokens only on text
        where = [i for i, t in enumerate(texts) if t[2] == chat]
        flat = [s for i in where for s in texts[i][1]]
        encoded = tokenizer(flat, add_special_tokens=not chat)["input_ids"] if flat else []
        for k, i in enumerate(where):
            ids[i] = encoded[3 * k: 3 * k + 3]
            if chat and bos is not None:
                ids[i] = [row if row[:1] == [bos] else [bos] + row for row in ids[i]]

    out, cut = [], 0
    for (ex, _, _), (prompt, prompt_chosen, prompt_rejected) in zip(texts, ids, strict=True):
        # The completion starts where prompt and prompt + response diverge (TRL's common_prefix_length).
        n = min(_common_prefix_length(prompt, prompt_chosen), _common_prefix_length(prompt, prompt_rejected))
        cut += n < len(prompt)
        out.append((ex, prompt[:n], prompt_chosen[n:], prompt_rejected[n:]))
    if cut:
        logger.info("%s: %d rows: the tokenised prompt is not a prefix of prompt + response (the template "
                    "renders it differently, or tokens merge across the boundary); their completion starts "
                    "where the two diverge, as in TRL", report.source, cut)
    return out


def _prompt_text(ex: PreferenceExample) -> tuple[str, str, str]:
    """``(prompt, chosen, rejected)`` as text: an HH row's raw split, a string prompt, or an HH rendering."""
    if "text" in ex:
        return ex["text"]
    if isinstance(ex["prompt"], str):
        return ex["prompt"], ex["chosen"], ex["rejected"]
    return render_hh_transcript(ex["prompt"]), " " + ex["chosen"], " " + ex["rejected"]


def _with_eos(text: str, eos: str | None) -> str:
    return text + eos if eos is not None and not text.endswith(eos) else text


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b]))


# --- chat_rendering="per_message" -------------------------------------------------------------------

def _encode_per_message(examples, tokenizer, apply_chat_template, add_eos, report):
    """``(example, prompt_ids, chosen_ids, rejected_ids)``: prompt and responses tokenised on their own."""
    from jinja2.exceptions import TemplateError

    bos = _bos_to_restore(tokenizer)
    rendered = []  # (ex, prompt text, completion prefix, chat-rendered)
    for ex in examples:
        messages = _prompt_messages(ex, apply_chat_template, default_hh_template=True)
        if messages is not None and tokenizer.chat_template:
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except TemplateError as e:
                report.reject(ex["row"], "prompt", "chat_template_error", str(e))
                continue
            rendered.append((ex, text, "", True))
        elif isinstance(ex["prompt"], list):  # no template, or apply_chat_template=False
            rendered.append((ex, render_hh_transcript(ex["prompt"]), " ", False))
        else:
            rendered.append((ex, ex["prompt"], "", False))
    _log_styles(report, Counter("chat_template" if chat else "text" for *_, chat in rendered))

    prompt_ids: list[list[int]] = [[] for _ in rendered]
    for chat in (False, True):  # one batched call per kind; special tokens only on text prompts
        where = [i for i, r in enumerate(rendered) if r[3] == chat]
        for i, ids in zip(where, _encode(tokenizer, [rendered[i][1] for i in where], not chat), strict=True):
            prompt_ids[i] = [bos] + ids if chat and bos is not None and ids[:1] != [bos] else ids
    eos = [tokenizer.eos_token_id] if add_eos else []
    completions = {
        side: [c if not eos or c[-1:] == eos else c + eos
               for c in _encode(tokenizer, [prefix + ex[side] for ex, _, prefix, _ in rendered], False)]
        for side in ("chosen", "rejected")
    }
    return [(ex, prompt_ids[i], completions["chosen"][i], completions["rejected"][i])
            for i, (ex, *_) in enumerate(rendered)]


# --- shared -----------------------------------------------------------------------------------------

def _prompt_messages(ex: PreferenceExample, apply_chat_template: bool | None, *, default_hh_template: bool):
    """The messages the chat template renders for this example, or None to render it as text."""
    if apply_chat_template is False:
        return None
    if isinstance(ex["prompt"], str):
        return [{"role": "user", "content": ex["prompt"]}] if apply_chat_template else None
    if "text" in ex and not (apply_chat_template or default_hh_template):  # an HH transcript
        return None
    return ex["prompt"]


def _bos_to_restore(tokenizer) -> int | None:
    """The BOS id when the tokenizer adds one to plain text (a template may not write it), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    return bos if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else None


def _log_styles(report: DropReport, styles: Counter) -> None:
    logger.info("%s: prompts rendered: %s", report.source, ", ".join(f"{k}={v}" for k, v in styles.items()))


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]

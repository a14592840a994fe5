"""The three preference formats, their detection, and validation into one normalised example.

A normalised example is ``{"prompt": str | list[message], "chosen": str, "rejected": str, "row": int}``
where a message is ``{"role": "system" | "user" | "assistant", "content": str}``, ``chosen`` and
``rejected`` are the final assistant responses only, and ``row`` is the 0-based source row.

- ``hh``: Anthropic HH-RLHF. ``chosen``/``rejected`` are whole transcripts of ``"\\n\\nHuman: ..."`` and
  ``"\\n\\nAssistant: ..."`` turns. The prompt is their longest shared prefix that ends in
  ``"\\n\\nAssistant:"``, parsed into messages (turn text stripped of surrounding whitespace). Rows
  whose transcripts share no such prefix are ``unparseable_transcript``. Consecutive turns of one role
  are kept as they are. The example also keeps ``text``: the raw transcripts split as TRL splits them
  (`extract_prompt_text`), which is what the default tokenisation trains on.
- ``prompt_chosen_rejected``: three strings. The prompt stays a string and, by default, is rendered
  as-is; the responses are kept verbatim.
- ``conversational``: ``chosen``/``rejected`` are message lists whose last message is the assistant
  response (UltraFeedback-binarized style). Any earlier turns are the prompt and must match between
  the two; without earlier turns the prompt comes from the ``prompt`` column (a string becomes one
  user message, or a message list).
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, NotRequired, TypedDict

from ._report import DataError, DropReport
from ._sources import BadJSON

DATA_FORMATS = ("hh", "prompt_chosen_rejected", "conversational")
ROLES = ("system", "user", "assistant")

_HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


class PreferenceExample(TypedDict):
    prompt: str | list[dict[str, str]]
    chosen: str
    rejected: str
    row: int
    text: NotRequired[tuple[str, str, str]]  # hh only: (prompt, chosen, rejected) raw text, TRL's split


class _Invalid(ValueError):
    """One invalid row, before the source and row number are known."""

    def __init__(self, reason: str, field: str | None, detail: str):
        self.reason, self.field, self.detail = reason, field, detail
        super().__init__(f"field {field!r}: {detail} [{reason}]")


def detect_format(records: list[Any], source: str = "<rows>") -> str:
    """The format of a source, from its columns and the type of its first non-null ``chosen``.

    ``chosen`` holding message lists -> ``conversational``; strings with a ``prompt`` column ->
    ``prompt_chosen_rejected``; strings without one -> ``hh``.
    """
    columns = set().union(*(r.keys() for r in records if isinstance(r, dict)))
    missing = {"chosen", "rejected"} - columns
    if missing:
        raise DataError(
            f"{source}: cannot detect the data format: no {' or '.join(sorted(missing))} column "
            f"(columns: {', '.join(sorted(columns)) or 'none'}); formats: {', '.join(DATA_FORMATS)}"
        )
    chosen = next((r["chosen"] for r in records if isinstance(r, dict) and r.get("chosen") is not None), None)
    if isinstance(chosen, list):
        return "conversational"
    return "prompt_chosen_rejected" if "prompt" in columns else "hh"


def normalize_rows(
    rows: list[tuple[int, Any]], data_format: str, report: DropReport
) -> list[PreferenceExample]:
    """Validate ``(row number, record)`` pairs of one format into normalised examples.

    Invalid rows go to ``report.reject``, which raises or counts them as the report is configured.
    """
    if data_format not in DATA_FORMATS:
        raise DataError(f"data_format={data_format!r}; allowed: auto, {', '.join(DATA_FORMATS)}")
    parse = _PARSERS[data_format]
    examples = []
    for row, record in rows:
        try:
            if isinstance(record, BadJSON):
                raise _Invalid("invalid_json", None, record.detail)
            if not isinstance(record, dict):
                raise _Invalid("wrong_type", None, f"expected a JSON object, got {type(record).__name__}")
            prompt, chosen, rejected = parse(record)
            _check_responses(chosen, rejected)
        except _Invalid as bad:
            report.reject(row, bad.field, bad.reason, bad.detail)
            continue
        example = PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected, row=row)
        if data_format == "hh":
            example["text"] = extract_prompt_text(record["chosen"], record["rejected"])
        examples.append(example)
    return examples


def extract_prompt_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two texts at their first differing character, as TRL 1.16's ``extract_prompt`` does for strings.

    The prompt is the shared prefix, less a trailing space (which goes to both completions), so a response
    start shared by chosen and rejected (``" I think"``) belongs to the prompt. Like TRL's loop, when one
    text is a prefix of the other the split falls one character before the shorter one's end.

    Returns:
        ``(prompt, chosen_completion, rejected_completion)``; ``prompt + completion`` gives back each text.
    """
    n = len(os.path.commonprefix([chosen, rejected]))
    if n == min(len(chosen), len(rejected)):
        n -= 1
    elif n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def parse_hh_transcript(chosen: str, rejected: str) -> tuple[list[dict[str, str]], str, str]:
    """Split two HH-RLHF transcripts into the shared prompt messages and the two final responses.

    The prompt is the longest shared prefix ending in ``"\\n\\nAssistant:"``. Looking for that marker
    in the shared prefix, not in each transcript, keeps rows whose response itself contains a
    ``"\\n\\nAssistant:"`` (the model continuing the dialogue on its own) parseable.

    Returns:
        ``(messages, chosen_response, rejected_response)``, all text stripped of surrounding whitespace.

    Raises:
        ValueError: the transcripts share no prompt ending in ``"\\n\\nAssistant:"``, or the prompt
            does not start with a ``"Human:"`` turn.
    """
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(_HH_ASSISTANT)
    if cut < 0:
        field = next((f for f, t in (("chosen", chosen), ("rejected", rejected)) if _HH_ASSISTANT not in t), None)
        detail = "no '\\n\\nAssistant:' turn" if field else "chosen and rejected share no prompt"
        raise _Invalid("unparseable_transcript", field or "rejected", f"{detail} ending in '\\n\\nAssistant:'")
    end = cut + len(_HH_ASSISTANT)
    prompt = chosen[:end]
    if prompt.startswith("Human:"):
        prompt = "\n\n" + prompt
    parts = _HH_TURN.split(prompt)  # ["", "Human", text, "Assistant", text, ..., "Assistant", ""]
    if parts[0].strip() or len(parts) < 5 or parts[1] != "Human":
        raise _Invalid("unparseable_transcript", "chosen", "the prompt does not start with a 'Human:' turn")
    messages = [
        {"role": _HH_ROLE[role], "content": text.strip()}
        for role, text in zip(parts[1:-2:2], parts[2:-2:2], strict=True)
    ]
    return messages, chosen[end:].strip(), rejected[end:].strip()


def _parse_hh(record: dict) -> tuple[list[dict[str, str]], str, str]:
    return parse_hh_transcript(_string(record, "chosen"), _string(record, "rejected"))


def _parse_prompt_chosen_rejected(record: dict) -> tuple[str, str, str]:
    return _string(record, "prompt"), _string(record, "chosen"), _string(record, "rejected")


def _parse_conversational(record: dict) -> tuple[list[dict[str, str]], str, str]:
    chosen, rejected = _messages(record, "chosen"), _messages(record, "rejected")
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise _Invalid("malformed_messages", field, f"last message has role {messages[-1]['role']!r}, "
                           "expected 'assistant'")
    if chosen[:-1] != rejected[:-1]:
        raise _Invalid("malformed_messages", "rejected", "its prompt turns differ from those of 'chosen'")
    prompt = chosen[:-1]
    if not prompt:
        value = record.get("prompt")
        prompt = [{"role": "user", "content": value}] if isinstance(value, str) else _messages(record, "prompt")
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


_PARSERS = {
    "hh": _parse_hh,
    "prompt_chosen_rejected": _parse_prompt_chosen_rejected,
    "conversational": _parse_conversational,
}


def _missing(record: dict, field: str) -> str:
    """Why ``field`` counts as missing, with the row's columns (and a likely misspelling) when it is absent."""
    if field in record:
        return "null"
    hint = difflib.get_close_matches(field, [k for k in record if k not in ("prompt", "chosen", "rejected")], n=1)
    columns = ", ".join(map(str, record)) or "none"
    return f"missing (the row's columns: {columns})" + (f"; did you mean {hint[0]!r}?" if hint else "")


def _string(record: dict, field: str) -> str:
    value = record.get(field)
    if value is None:
        raise _Invalid("missing_field", field, _missing(record, field))
    if not isinstance(value, str):
        raise _Invalid("wrong_type", field, f"expected a string, got {type(value).__name__}")
    return value


def _messages(record: dict, field: str) -> list[dict[str, str]]:
    value = record.get(field)
    if value is None:
        raise _Invalid("missing_field", field, f"{_missing(record, field)}; expected a non-empty message list")
    if value == []:
        raise _Invalid("missing_field", field, "an empty message list")
    if not isinstance(value, list):
        raise _Invalid("wrong_type", field, f"expected a list of messages, got {type(value).__name__}")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise _Invalid("wrong_type", field, f"message {i} is not a {{'role', 'content': str}} dict")
        if message.get("role") not in ROLES:
            raise _Invalid("malformed_messages", field, f"message {i} has role {message.get('role')!r}; "
                           f"allowed: {', '.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_responses(chosen: str, rejected: str) -> None:
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise _Invalid("empty_response", field, "empty or whitespace-only response")
    if chosen.strip() == rejected.strip():
        raise _Invalid("identical_responses", "rejected", "same text as 'chosen'")

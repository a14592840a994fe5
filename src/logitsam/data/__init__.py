"""Preference data: read (chosen, rejected) pairs, validate, tokenise and collate them.

Typical use::

    dataset, report = build_preference_dataset("pairs.jsonl.gz", tokenizer, on_invalid="drop")
    train, eval = train_eval_split(dataset, eval_size=0.05, seed=0)
    loader = DataLoader(train, batch_size=8, collate_fn=PreferenceCollator(tokenizer.pad_token_id))

Formats, rendering and the truncation rule are documented in `_formats` and `_tokenize`; by default the
tokens are those TRL 1.16's DPOTrainer builds from the same rows.
"""

from ._build import build_preference_dataset, load_preference_examples, train_eval_split
from ._collate import PreferenceCollator
from ._formats import (
    DATA_FORMATS,
    PreferenceExample,
    detect_format,
    extract_prompt_text,
    normalize_rows,
    parse_hh_transcript,
)
from ._report import ON_INVALID, REASONS, DataError, DropReport, InvalidRowError
from ._sources import check_source, load_rows
from ._tokenize import CHAT_RENDERINGS, TRUNCATION_MODES, render_hh_transcript, tokenize_examples, truncate_pair

__all__ = [
    "CHAT_RENDERINGS",
    "DATA_FORMATS",
    "DataError",
    "ON_INVALID",
    "REASONS",
    "TRUNCATION_MODES",
    "DropReport",
    "InvalidRowError",
    "PreferenceCollator",
    "PreferenceExample",
    "build_preference_dataset",
    "check_source",
    "detect_format",
    "extract_prompt_text",
    "load_preference_examples",
    "load_rows",
    "normalize_rows",
    "parse_hh_transcript",
    "render_hh_transcript",
    "tokenize_examples",
    "train_eval_split",
    "truncate_pair",
]

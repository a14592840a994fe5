"""Preference data: read (chosen, rejected) pairs, validate, tokenise and collate them.

Typical use::

    dataset, report = build_preference_dataset("pairs.jsonl.gz", tokenizer, on_invalid="drop")
    train, eval = train_eval_split(dataset, eval_size=0.05, seed=0)
    loader = DataLoader(train, batch_size=8, collate_fn=PreferenceCollator(tokenizer.pad_token_id))

Formats, rendering and the truncation rule are documented in `_formats` and `_tokenize`.
"""

from ._build import build_preference_dataset, load_preference_examples, train_eval_split
from ._collate import PreferenceCollator
from ._formats import DATA_FORMATS, PreferenceExample, detect_format, normalize_rows, parse_hh_transcript
from ._report import ON_INVALID, REASONS, DropReport, InvalidRowError
from ._sources import load_rows
from ._tokenize import TRUNCATION_MODES, render_hh_transcript, tokenize_examples, truncate_pair

__all__ = [
    "DATA_FORMATS",
    "ON_INVALID",
    "REASONS",
    "TRUNCATION_MODES",
    "DropReport",
    "InvalidRowError",
    "PreferenceCollator",
    "PreferenceExample",
    "build_preference_dataset",
    "detect_format",
    "load_preference_examples",
    "load_rows",
    "normalize_rows",
    "parse_hh_transcript",
    "render_hh_transcript",
    "tokenize_examples",
    "train_eval_split",
    "truncate_pair",
]

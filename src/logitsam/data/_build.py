"""Source -> tokenised `datasets.Dataset`, and a deterministic train/eval split."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from ._formats import DATA_FORMATS, PreferenceExample, detect_format, normalize_rows
from ._report import DataError, DropReport, logger
from ._sources import load_rows
from ._tokenize import tokenize_examples

# The columns each format reads; any others are reported once and ignored.
_COLUMNS = {"hh": ("chosen", "rejected"), "prompt_chosen_rejected": ("prompt", "chosen", "rejected"),
            "conversational": ("prompt", "chosen", "rejected")}


def load_preference_examples(
    source: str | Path,
    *,
    split: str = "train",
    data_format: str = "auto",
    on_invalid: str = "error",
    max_samples: int | None = None,
) -> tuple[list[PreferenceExample], DropReport]:
    """Read and validate a source into normalised examples (see `logitsam.data._formats`).

    Args:
        source: local ``.jsonl``/``.json`` (optionally ``.gz``) or ``.parquet`` file, dataset folder or hub id.
        split: ``datasets`` split syntax, e.g. ``"train"``, ``"test[:100]"``.
        data_format: "auto" (from the columns) or one of `DATA_FORMATS`.
        on_invalid: "error" raises `InvalidRowError` at the first invalid row; "drop" counts it.
        max_samples: read only the first ``max_samples`` rows of the split (before validation).

    Returns:
        ``(examples, report)``; the report counts rows read and dropped, per reason.
    """
    if data_format != "auto" and data_format not in DATA_FORMATS:
        raise DataError(f"data_format={data_format!r}; allowed: auto, {', '.join(DATA_FORMATS)}")
    report = DropReport(str(source), on_invalid=on_invalid)
    rows = load_rows(source, split, max_samples=max_samples, report=report)
    records = [record for _, record in rows]
    if data_format == "auto":
        # With no JSON object to look at (every line broken, say), any format rejects each row for what it is.
        has_objects = any(isinstance(r, dict) for r in records)
        data_format = detect_format(records, str(source)) if has_objects else "prompt_chosen_rejected"
    unused = sorted(set().union(*(r.keys() for r in records if isinstance(r, dict))) - set(_COLUMNS[data_format]))
    if unused:
        logger.info("%s: format %s; columns not used: %s", source, data_format, ", ".join(map(str, unused)))
    return normalize_rows(rows, data_format, report), report


def build_preference_dataset(
    source: str | Path,
    tokenizer: Any,
    *,
    split: str = "train",
    data_format: str = "auto",
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_start",
    chat_rendering: str = "trl",
    apply_chat_template: bool | None = None,
    on_invalid: str = "error",
    max_samples: int | None = None,
    add_eos: bool = True,
    num_proc: int | None = None,
):
    """Read, validate and tokenise a preference source in one call.

    Rendering and truncation follow `logitsam.data._tokenize`; the defaults tokenise as TRL 1.16 does
    (chat template over the whole conversation, HH as raw text, ``keep_start`` on the whole sequence
    at ``max_length=1024``).

    Returns:
        ``(dataset, report)``. The dataset has one row per kept pair with columns ``index`` (0..N-1, the
        key for cached reference log-probs; it survives `train_eval_split`), ``row`` (source row),
        ``prompt_length``, ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``,
        ``rejected_labels``. The report has been logged on the ``logitsam.data`` logger.
    """
    from datasets import Dataset

    examples, report = load_preference_examples(
        source, split=split, data_format=data_format, on_invalid=on_invalid, max_samples=max_samples
    )
    options = dict(max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode,
                   chat_rendering=chat_rendering, apply_chat_template=apply_chat_template, add_eos=add_eos)
    columns = tokenize_in_processes(examples, tokenizer, num_proc, report, **options)
    report.log_summary()
    if not columns["row"]:
        raise DataError(f"{report}: no valid preference pairs left")
    dataset = Dataset.from_dict({"index": list(range(len(columns["row"]))), **columns})
    return dataset, report


def _tokenize_part(examples, tokenizer, source, on_invalid, options):
    report = DropReport(source, on_invalid=on_invalid)
    try:
        return tokenize_examples(examples, tokenizer, report=report, **options), report
    except DataError as e:  # re-raised by the parent (an exception with its own __init__ may not unpickle)
        return str(e), None


def tokenize_in_processes(examples, tokenizer, num_proc: int | None, report: DropReport, **options) -> dict:
    """``tokenize_examples`` over ``num_proc`` processes (TRL's ``dataset_num_proc``): contiguous parts, merged
    in order, their drop counts added to ``report``. The same columns as one process, row for row."""
    if not num_proc or num_proc <= 1 or len(examples) < 2 * num_proc:
        return tokenize_examples(examples, tokenizer, report=report, **options)
    from concurrent.futures import ProcessPoolExecutor

    size = -(-len(examples) // num_proc)
    parts = [examples[i:i + size] for i in range(0, len(examples), size)]
    with ProcessPoolExecutor(max_workers=len(parts)) as pool:
        results = list(pool.map(_tokenize_part, parts, [tokenizer] * len(parts), [report.source] * len(parts),
                                [report.on_invalid] * len(parts), [options] * len(parts)))
    for part, part_report in results:
        if part_report is None:
            raise DataError(part)
    columns = {key: [v for part, _ in results for v in part[key]] for key in results[0][0]}
    for _, part in results:
        for reason, count in part.counts.items():
            report.counts[reason] = report.counts.get(reason, 0) + count
            listed = report.first_rows.setdefault(reason, [])
            listed.extend(part.first_rows.get(reason, [])[: max(0, report.max_listed - len(listed))])
    return columns


def train_eval_split(dataset, eval_size: int | float, seed: int = 0):
    """Split a dataset into (train, eval) by a seeded random draw; each part keeps dataset order.

    Args:
        dataset: any `datasets.Dataset` (or object with ``__len__`` and ``select``).
        eval_size: number of eval rows (int >= 1), or a fraction in (0, 1) rounded up.
        seed: the same seed and length always give the same split.
    """
    n = len(dataset)
    if isinstance(eval_size, float) and not isinstance(eval_size, bool):
        if not 0.0 < eval_size < 1.0:
            raise DataError(f"eval_size={eval_size}; a fraction must lie in (0, 1)")
        n_eval = math.ceil(eval_size * n)
    elif isinstance(eval_size, int) and not isinstance(eval_size, bool):
        n_eval = eval_size
    else:
        raise TypeError(f"eval_size={eval_size!r}; expected an int or a float fraction")
    if not 1 <= n_eval < n:
        raise DataError(f"eval_size={eval_size} gives {n_eval} eval rows of {n}; both parts must be non-empty")
    eval_rows = set(random.Random(seed).sample(range(n), n_eval))
    train = dataset.select([i for i in range(n) if i not in eval_rows])
    return train, dataset.select(sorted(eval_rows))

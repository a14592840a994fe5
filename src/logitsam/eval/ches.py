"""`logitsam ches`: per-pair CHES scores under a model, and a dataset without the top-k % of pairs.

CHES (Razin et al., ICLR 2025) flags pairs whose chosen and rejected responses have similar hidden
representations; DPO on such pairs tends to push the chosen likelihood down. The filtered dataset keeps
the original records of the source, so it is read back exactly like the input.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._atomic import atomic_path, write_text
from ..core import shift_labels
from ..data import DropReport, PreferenceCollator, build_preference_dataset, load_rows
from ..diagnostics import ches_scores, normalized_edit_distance
from ..models import forward_hidden, load_model, load_tokenizer
from .run import default_device

logger = logging.getLogger("logitsam.eval")


def _completion(ids, labels):
    return [t for t, lab in zip(ids, labels, strict=True) if lab != -100]


@torch.no_grad()
def score_pairs(model, dataset, *, pad_token_id: int, batch_size: int = 8) -> list[dict]:
    """One record per pair: index, source row, ches, ches_norm, edit distance of the completions."""
    collate = PreferenceCollator(pad_token_id)
    device = next(model.parameters()).device
    model.eval()
    records = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="CHES", unit="batch"):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate(rows)
        hidden = forward_hidden(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        ches, ches_norm = ches_scores(hidden, shift_labels(batch["labels"]).to(device))
        for r, c, cn in zip(rows, ches.tolist(), ches_norm.tolist(), strict=True):
            chosen = _completion(r["chosen_input_ids"], r["chosen_labels"])
            rejected = _completion(r["rejected_input_ids"], r["rejected_labels"])
            records.append({"index": r["index"], "row": r["row"], "ches": c, "ches_norm": cn,
                            "edit_distance": normalized_edit_distance(chosen, rejected),
                            "chosen_tokens": len(chosen), "rejected_tokens": len(rejected)})
    return records


def rows_to_drop(records: list[dict], top_percent: float, key: str = "ches") -> set[int]:
    """Source rows of the ``top_percent`` % highest-scoring pairs (NaN scores are never dropped)."""
    if not 0 <= top_percent < 100:
        raise ValueError(f"top_percent={top_percent} must be in [0, 100)")
    scored = [r for r in records if not math.isnan(r[key])]
    k = math.ceil(len(scored) * top_percent / 100)
    ranked = sorted(scored, key=lambda r: r[key], reverse=True)
    return {r["row"] for r in ranked[:k]}


def write_filtered(source: str, split: str, drop_rows: set[int], path: Path, max_samples: int | None = None) -> int:
    """Write the source's original records minus ``drop_rows`` as JSON Lines (gzip if ``.gz``)."""
    report = DropReport(str(source), on_invalid="drop")
    kept = 0
    opener = gzip.open if path.name.endswith(".gz") else open
    with atomic_path(path) as tmp, opener(tmp, "wt") as f:
        for row, record in load_rows(source, split, max_samples=max_samples, report=report):
            if row not in drop_rows and isinstance(record, dict):
                f.write(json.dumps(record) + "\n")
                kept += 1
    return kept


def run_ches(model_name_or_path: str, dataset_name: str, output_dir: str | Path, *, split: str = "train",
             data_format: str = "auto", max_samples: int | None = None, max_length: int = 1024,
             max_prompt_length: int | None = None, truncation_mode: str = "keep_start", chat_rendering: str = "trl",
             apply_chat_template: bool | None = None, on_invalid: str = "drop",
             batch_size: int = 8, filter_top_percent: float | None = None, filter_key: str = "ches",
             dtype: str = "float32", device: str | None = None) -> dict:
    """Score every valid pair of ``dataset_name`` under the model, loaded in ``dtype`` on ``device`` (default:
    ``default_device()``); write ``ches_scores.jsonl`` (and ``filtered.jsonl``) into ``output_dir``.

    CHES needs the final hidden states only (no LM head, so no head chunking); they are summed in float32.
    The summary records the device and the dtype the weights were actually loaded in.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = device or default_device()
    tokenizer = load_tokenizer(model_name_or_path)
    model = load_model(model_name_or_path, dtype=dtype, device=device)
    dataset, report = build_preference_dataset(
        dataset_name, tokenizer, split=split, data_format=data_format, max_length=max_length,
        max_prompt_length=max_prompt_length, truncation_mode=truncation_mode, chat_rendering=chat_rendering,
        apply_chat_template=apply_chat_template, on_invalid=on_invalid,
        max_samples=max_samples)
    records = score_pairs(model, dataset, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size)
    scores_path = out / "ches_scores.jsonl"
    write_text(scores_path, "".join(json.dumps(r) + "\n" for r in records))
    summary = {"scores": str(scores_path), "pairs": len(records), "dropped_invalid": report.dropped,
               "device": str(device), "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    if filter_top_percent:
        drop = rows_to_drop(records, filter_top_percent, filter_key)
        filtered = out / "filtered.jsonl"
        kept = write_filtered(dataset_name, split, drop | _invalid_rows(records, report), filtered, max_samples)
        summary.update({"filtered": str(filtered), "removed_top": len(drop), "kept": kept})
        logger.info("removed the top %.1f%% of pairs by %s (%d) and %d invalid rows; kept %d in %s",
                    filter_top_percent, filter_key, len(drop), report.dropped, kept, filtered)
    return summary


def _invalid_rows(records, report) -> set[int]:
    """Rows the validation dropped are not written to the filtered file either (they were counted)."""
    scored = {r["row"] for r in records}
    return set(range(report.rows_read)) - scored

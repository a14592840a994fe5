"""Read the raw rows of a preference source: a local file, a local dataset folder or a hub id.

Local JSON and JSON Lines files (gzip included) are read with the standard library, so every row
keeps its exact JSON types and a broken line is reported by number instead of failing the whole
load inside Arrow. Parquet files, dataset folders and hub ids go through `datasets`.

Splits use the `datasets` slicing syntax (``"train"``, ``"test[:100]"``, ``"train[10%:20%]"``). A
local file holds one split, ``"train"``. Row numbers count from the start of the named split, so
``"train[100:]"`` reports its first row as row 100.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any, NamedTuple

from ._report import DropReport

JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
_SPLIT = re.compile(r"([\w.-]+)(\[[^\]]*\])?")
_COLUMNS = ("prompt", "chosen", "rejected")


class BadJSON(NamedTuple):
    """Stands in for a JSON Lines row that does not parse."""

    detail: str


def load_rows(
    source: str | Path, split: str = "train", *, max_samples: int | None = None, report: DropReport
) -> list[tuple[int, Any]]:
    """The rows of ``source`` as ``(row number, record)`` pairs; records are normally dicts.

    Args:
        source: path to a ``.jsonl``, ``.json``, their ``.gz`` forms or ``.parquet``; a folder written by
            ``save_to_disk`` or loadable by ``load_dataset``; or a hub dataset id.
        split: split name with an optional slice, ``datasets`` syntax.
        max_samples: keep only the first ``max_samples`` rows of the (sliced) split.
        report: its ``rows_read`` grows by the number of rows returned.

    Returns:
        ``(row, record)`` pairs; a JSON Lines line that does not parse comes back as a `BadJSON`
        record, for validation to reject in row order.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples={max_samples}; must be a positive integer or None")
    name = _split_name(split)
    path = Path(source)
    if path.is_file():
        suffix = next((s for s in JSON_SUFFIXES + PARQUET_SUFFIXES if path.name.endswith(s)), None)
        if suffix is None:
            raise ValueError(
                f"{source}: unsupported file type; allowed: {', '.join(JSON_SUFFIXES + PARQUET_SUFFIXES)}"
            )
        if name != "train":
            raise ValueError(f"{source}: split {split!r}: a local file holds only the 'train' split")
        if suffix in PARQUET_SUFFIXES:
            rows = _dataset_rows(_load_parquet(path), split, name, max_samples)
        else:
            rows = _json_rows(path, split, name, max_samples)
    else:
        rows = _dataset_rows(_load_dataset(source, path, name), split, name, max_samples)
    report.rows_read += len(rows)
    return rows


def _split_name(split: str) -> str:
    match = _SPLIT.fullmatch(split)
    if match is None:
        raise ValueError(f"split={split!r}; expected one split name with an optional slice, like 'train[:100]'")
    return match.group(1)


def _slice(split: str, name: str, n: int) -> range:
    from datasets import ReadInstruction

    (instruction,) = ReadInstruction.from_spec(split).to_absolute({name: n})
    return range(instruction.from_, instruction.to)


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def _json_rows(path: Path, split: str, name: str, max_samples: int | None) -> list[tuple[int, Any]]:
    with _open_text(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):  # one JSON array of objects
        try:
            items = [(None, record) for record in json.loads(text)]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
    else:  # JSON Lines; blank lines are skipped and do not count as rows
        items = [(lineno, line) for lineno, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for row in _take(_slice(split, name, len(items)), max_samples):
        lineno, item = items[row]
        if lineno is None:
            rows.append((row, item))
            continue
        try:
            rows.append((row, json.loads(item)))
        except json.JSONDecodeError as e:
            # Kept in place, so that validation reports it in file order among the other rows.
            rows.append((row, BadJSON(f"line {lineno} is not valid JSON: {e}")))
    return rows


def _take(rows: range, max_samples: int | None) -> range:
    return rows if max_samples is None else rows[:max_samples]


def _load_parquet(path: Path):
    from datasets import load_dataset

    return load_dataset("parquet", data_files=str(path), split="train")


def _load_dataset(source: str | Path, path: Path, name: str):
    import datasets

    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if name not in loaded:
                raise ValueError(f"{source}: no split {name!r}; available: {', '.join(loaded)}")
            return loaded[name]
        if name != "train":
            raise ValueError(f"{source}: split {name!r}: a saved Dataset holds only the 'train' split")
        return loaded
    return datasets.load_dataset(str(source), split=name)


def _dataset_rows(dataset, split: str, name: str, max_samples: int | None) -> list[tuple[int, Any]]:
    rows = _take(_slice(split, name, len(dataset)), max_samples)
    # Only the preference columns: hub sets carry large extras (UltraFeedback's `messages`, scores).
    columns = [c for c in _COLUMNS if c in dataset.column_names]
    if {"chosen", "rejected"} <= set(columns):
        dataset = dataset.select_columns(columns)
    if len(rows) != len(dataset):
        dataset = dataset.select(rows)
    return list(zip(rows, dataset.to_list(), strict=True))

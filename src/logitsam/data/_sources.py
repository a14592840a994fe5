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

from ._report import DataError, DropReport

JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
# What a missing local file is usually called; such a name is reported, not tried as a hub id.
_FILE_SUFFIXES = (*JSON_SUFFIXES, *PARQUET_SUFFIXES, ".gz", ".csv", ".tsv", ".txt", ".arrow")
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
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise DataError(f"max_samples={max_samples!r}; must be a positive integer or None")
    name = _split_name(split)
    path = Path(source).expanduser()
    if path.is_file():
        suffix = next((s for s in JSON_SUFFIXES + PARQUET_SUFFIXES if path.name.endswith(s)), None)
        if suffix is None:
            raise DataError(
                f"{source}: unsupported file type; allowed: {', '.join(JSON_SUFFIXES + PARQUET_SUFFIXES)}"
            )
        if name != "train":
            raise DataError(f"{source}: split {split!r}: a local file holds only the 'train' split")
        if suffix in PARQUET_SUFFIXES:
            rows = _dataset_rows(_load_parquet(path), split, name, max_samples)
        else:
            rows = _json_rows(path, split, name, max_samples)
    else:
        check_source(source)
        rows = _dataset_rows(_load_dataset(source, path, name), split, name, max_samples)
    if not rows:
        raise DataError(f"{source}: split {split!r} has no rows")
    report.rows_read += len(rows)
    return rows


def check_source(source: str | Path) -> None:
    """Raise DataError for a name that can only mean a local file or folder and does not exist.

    Such names (a path prefix like ``./`` or ``/``, or a data file suffix like ``.jsonl``) are never
    looked up on the hub, which would only report a confusing connection or "not found" error.
    """
    name = str(source)
    if not name.strip():
        raise DataError(f"the dataset name {name!r} is empty")
    looks_local = name.startswith(("/", "./", "../", "~")) or name.endswith(_FILE_SUFFIXES)
    if looks_local and not Path(name).expanduser().exists():
        raise DataError(f"{source}: no such file or directory")


def _split_name(split: str) -> str:
    match = _SPLIT.fullmatch(split)
    if match is None:
        raise DataError(f"split={split!r}; expected one split name with an optional slice, like 'train[:100]'")
    return match.group(1)


def _slice(split: str, name: str, n: int) -> range:
    from datasets import ReadInstruction

    try:
        (instruction,) = ReadInstruction.from_spec(split).to_absolute({name: n})
    except ValueError as e:  # a malformed slice such as "train[a:b]"
        raise DataError(f"split={split!r}: {e}") from e
    return range(instruction.from_, instruction.to)


def _read_bytes(path: Path) -> bytes:
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError) as e:  # not gzip, or cut short
        raise DataError(f"{path}: not a complete gzip file: {e}") from e
    return data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as some editors write


def _json_rows(path: Path, split: str, name: str, max_samples: int | None) -> list[tuple[int, Any]]:
    data = _read_bytes(path)
    if data.lstrip().startswith(b"["):  # one JSON array of objects
        try:
            items = [(None, record) for record in json.loads(data.decode("utf-8"))]
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from e
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON: {e}") from e
    else:  # JSON Lines; blank lines are skipped and do not count as rows
        items = [(lineno, line) for lineno, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    rows = []
    for row in _take(_slice(split, name, len(items)), max_samples):
        lineno, item = items[row]
        if lineno is None:
            rows.append((row, item))
            continue
        # A bad line is kept in place, so that validation reports it in file order among the other rows.
        try:
            rows.append((row, json.loads(item.decode("utf-8"))))
        except UnicodeDecodeError as e:
            rows.append((row, BadJSON(f"line {lineno} is not UTF-8 text (byte {item[e.start]:#04x} at column "
                                      f"{e.start + 1})")))
        except json.JSONDecodeError as e:
            rows.append((row, BadJSON(f"line {lineno} is not valid JSON: {e}")))
    return rows


def _take(rows: range, max_samples: int | None) -> range:
    return rows if max_samples is None else rows[:max_samples]


def _load_parquet(path: Path):
    from datasets import load_dataset

    try:
        return load_dataset("parquet", data_files=str(path), split="train")
    except ValueError as e:  # pyarrow's ArrowInvalid: not a Parquet file, or a damaged one
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e


def _load_dataset(source: str | Path, path: Path, name: str):
    import datasets

    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if name not in loaded:
                raise DataError(f"{source}: no split {name!r}; available: {', '.join(loaded)}")
            return loaded[name]
        if name != "train":
            raise DataError(f"{source}: split {name!r}: a saved Dataset holds only the 'train' split")
        return loaded
    try:
        return datasets.load_dataset(str(source), split=name)
    except (OSError, ValueError) as e:  # not found locally or on the hub, offline, no data files, no such split
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{source}: cannot load it as a local dataset folder or a hub dataset: {detail}") from e


def _dataset_rows(dataset, split: str, name: str, max_samples: int | None) -> list[tuple[int, Any]]:
    rows = _take(_slice(split, name, len(dataset)), max_samples)
    # Only the preference columns: hub sets carry large extras (UltraFeedback's `messages`, scores).
    columns = [c for c in _COLUMNS if c in dataset.column_names]
    if {"chosen", "rejected"} <= set(columns):
        dataset = dataset.select_columns(columns)
    if len(rows) != len(dataset):
        dataset = dataset.select(rows)
    return list(zip(rows, dataset.to_list(), strict=True))

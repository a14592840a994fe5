"""Atomic writes: a process killed at any moment leaves the old file (or directory) or the new one, never a part.

Each writer fills a temporary sibling of the target (same directory, so the same filesystem), fsyncs it,
and ``os.replace``-s it onto the target: a rename is atomic on POSIX and on Windows. The temporary names
start with a dot, so tools that look for ``checkpoint-*`` or ``*.json`` never pick up a half-written one;
``remove_staged`` clears the ones a killed process left behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STAGING_SUFFIX = ".tmp"


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a power cut after ``os.replace`` keeps the new entry)."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows: directories cannot be opened for fsync
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())


def _new_temp_file(path: Path) -> Path:
    """An empty new file ``.NAME.RANDOM.tmpSUFFIX`` beside ``path``, with the permissions a plain ``open`` gives
    (``tempfile.mkstemp`` would make it owner-only)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{STAGING_SUFFIX}{path.suffix}"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path next to ``path`` for any writer (``torch.save``, ``savefig``); on success it
    replaces ``path``, on an exception it is removed. The temporary name keeps ``path``'s suffix, so writers
    that pick the format from the extension still do."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(path)
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def write_json(path: str | Path, obj: Any, **dump_kwargs) -> None:
    """``json.dumps(obj, **dump_kwargs)`` plus a final newline, written atomically."""
    write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def staging_dir(path: str | Path) -> Path:
    """Where a directory ``parent/name`` is built before ``commit_dir`` renames it: ``parent/.name.tmp/name``.

    The staged directory keeps the final name (writers that record their own folder name see the right
    one); the hidden parent marks it as unfinished.
    """
    path = Path(path)
    return path.parent / f".{path.name}{STAGING_SUFFIX}" / path.name


def start_staging(path: str | Path) -> Path:
    """Create an empty ``staging_dir(path)`` (clearing one a killed process left) and return it."""
    staged = staging_dir(path)
    shutil.rmtree(staged.parent, ignore_errors=True)
    staged.mkdir(parents=True)
    return staged


def commit_dir(staged: str | Path, path: str | Path) -> None:
    """Fsync every file under ``staged`` and rename it to ``path`` in one step.

    An existing ``path`` is first renamed into the staging area and removed afterwards, so whenever the
    process dies ``path`` is the old directory, the new one, or absent: never a mixture.
    """
    staged, path = Path(staged), Path(path)
    _fsync_tree(staged)
    if path.exists():
        os.replace(path, staged.parent / f".old-{path.name}")
    os.replace(staged, path)
    _fsync_dir(path.parent)
    shutil.rmtree(staged.parent)


def commit_files(staged: str | Path, directory: str | Path) -> None:
    """Move each entry of ``staged`` into ``directory`` in one rename each (fsynced first), then remove the
    staging area: every file and subfolder in ``directory`` is whole at any moment, the old one or the new."""
    staged, directory = Path(staged), Path(directory)
    _fsync_tree(staged)
    for entry in sorted(staged.iterdir()):
        target = directory / entry.name
        if entry.is_dir() and target.is_dir():
            remove_dir(target)  # os.replace cannot put a folder onto a non-empty one
        os.replace(entry, target)
    _fsync_dir(directory)
    shutil.rmtree(staged.parent)


def remove_dir(path: str | Path) -> None:
    """Delete a directory so that it vanishes at once: rename it to a hidden name, then remove that."""
    path = Path(path)
    doomed = path.parent / f".{path.name}{STAGING_SUFFIX}.deleting"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yields an empty directory to fill; on success it becomes ``path`` in one rename (see ``commit_dir``),
    on an exception it is removed."""
    staged = start_staging(path)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged.parent, ignore_errors=True)
        raise
    commit_dir(staged, path)


def remove_staged(directory: str | Path, pattern: str = "*") -> list[Path]:
    """Remove what killed writers left in ``directory``: the staging folders (``.NAME.tmp``, ``.NAME.tmp.deleting``)
    and temporary files (``.NAME.RANDOM.tmpSUFFIX``) of targets whose NAME matches ``pattern``. Returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.glob(f".{pattern}{STAGING_SUFFIX}*"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
    return removed

"""Checkpoint folders that are complete or absent, and which one ``resume_from_checkpoint: last`` means.

``PreferenceTrainer._save_checkpoint`` builds ``checkpoint-N`` in a hidden staging folder and renames it
into place once everything is written (``logitsam._atomic``); Trainer writes ``trainer_state.json`` last,
so a folder holding it is complete.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

from .._atomic import remove_dir, remove_staged
from .config import ConfigError

logger = logging.getLogger("logitsam.train")

_STEP = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
LAST = "last"  # resume_from_checkpoint: last (or true): the newest complete checkpoint in output_dir


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / TRAINER_STATE_NAME).is_file()


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` folders in ``output_dir``, complete or not, by step N (oldest first)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(value: str | bool | None, output_dir: str | Path) -> str | None:
    """``resume_from_checkpoint`` as ``Trainer.train`` takes it: a complete checkpoint folder, or None.

    ``last`` (or ``true``) is the complete ``checkpoint-N`` with the largest N in ``output_dir``; a path
    must be a complete checkpoint folder.

    Raises:
        ConfigError: naming the value and the folder, when there is no such checkpoint.
    """
    if value is None or value is False:
        return None
    if value is True or value == LAST:
        folders = checkpoint_folders(output_dir)
        complete = [p for p in folders if is_complete(p)]
        if not complete:
            skipped = f"; incomplete (no {TRAINER_STATE_NAME}), skipped: {[p.name for p in folders]}" if folders else ""
            raise ConfigError(f"config key 'resume_from_checkpoint' = {LAST!r}: no complete checkpoint (a "
                              f"{PREFIX_CHECKPOINT_DIR}-N folder with {TRAINER_STATE_NAME}) in {output_dir}{skipped}; "
                              "train without resume_from_checkpoint to start from step 0")
        newer = folders[folders.index(complete[-1]) + 1:]
        if newer:
            logger.warning("skipping incomplete checkpoints (no %s): %s", TRAINER_STATE_NAME, [p.name for p in newer])
        logger.info("resuming from %s (the newest complete checkpoint in %s)", complete[-1], output_dir)
        return str(complete[-1])
    folder = Path(value)
    if not folder.is_dir():
        raise ConfigError(f"config key 'resume_from_checkpoint' = {value!r}: no such folder; give a checkpoint "
                          f"folder or {LAST!r} for the newest complete one in output_dir")
    if not is_complete(folder):
        raise ConfigError(f"config key 'resume_from_checkpoint' = {value!r}: not a complete checkpoint (no "
                          f"{TRAINER_STATE_NAME}); use {LAST!r} for the newest complete one in output_dir")
    return str(folder)


def remove_unfinished_writes(output_dir: str | Path) -> None:
    """Clear what a killed run was writing in ``output_dir``: staged checkpoints (or ones being deleted), the
    staged final model, temporary files (``logitsam._atomic`` names them all ``.NAME.tmp...``)."""
    removed = remove_staged(output_dir)
    if removed:
        logger.info("removed %d unfinished write(s) left by an earlier run in %s: %s", len(removed), output_dir,
                    [p.name for p in removed])


def rotate_checkpoints(run_dir: str | Path, save_total_limit: int | None, best_model_checkpoint: str | None) -> None:
    """``transformers.trainer_utils.rotate_checkpoints`` (the same ones kept: the newest, the best, and the
    newest others up to ``save_total_limit``), but each folder vanishes in one rename instead of file by file."""
    if save_total_limit is None or save_total_limit <= 0:
        return
    folders = sort_checkpoints(str(run_dir), use_mtime=True)
    protected = {folders[-1]} if folders else set()
    if best_model_checkpoint is not None:
        protected.add(str(Path(best_model_checkpoint)))
    excess = len(folders) - max(save_total_limit, len(protected))
    for folder in [f for f in folders if f not in protected][:max(excess, 0)]:
        logger.info("deleting older checkpoint %s (save_total_limit=%d)", folder, save_total_limit)
        remove_dir(folder)

"""The project's own on-policy preference pairs for controlled sentiment (DPO paper, Rafailov et al. 2023, §6.1).

The DPO paper's controlled-sentiment task: the policy writes a continuation, a sentiment classifier
is the ground-truth reward, and pairs are preferences between the policy's own samples. Here the
policy is the embedded SmolLM2-135M-Instruct, the prompts are `logitsam.demo.prompts.PROMPTS`, and
the reward is VADER's compound score (`logitsam.eval.judges.VaderJudge`, in [-1, 1]):

1. a seeded shuffle splits the prompts into train and held-out (held-out prompts never reach a train pair);
2. each prompt gets ``samples_per_prompt`` sampled responses (chat template, ancestral sampling with top-p);
3. each response is scored by VADER;
4. each prompt gives at most one pair: its highest- vs its lowest-scoring non-empty response, kept when
   ``chosen_score - rejected_score >= min_gap``. Prompts without a pair are counted and logged.

Files written to ``output_dir``:

- ``train.jsonl``, ``heldout.jsonl``: one pair per line, TRL's conversational preference format
  ``{"prompt_id": int, "prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
  "rejected": [...], "chosen_score": float, "rejected_score": float}``, read by
  `logitsam.data.build_preference_dataset` (format ``conversational``; the prompt is rendered with the
  chat template, as in sampling).
- ``heldout_prompts.jsonl``: every held-out prompt (also those without a pair), for win-rate evaluation.
- ``metadata.json``: provenance (model, sampling settings, judge, seed, date, versions) and counts.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import logging
import math
import os
import platform
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import transformers

from logitsam._atomic import write_json
from logitsam._atomic import write_text as atomic_write_text
from logitsam.data import load_preference_examples
from logitsam.demo.prompts import PROMPTS
from logitsam.eval.generate import generate_responses
from logitsam.eval.judges import VaderJudge
from logitsam.models import EMBEDDED_MODELS, load_model, load_tokenizer

logger = logging.getLogger(__name__)

SENTIMENT_FILES = {
    "train": "train.jsonl",
    "heldout": "heldout.jsonl",
    "heldout_prompts": "heldout_prompts.jsonl",
    "metadata": "metadata.json",
}


def split_prompt_ids(
    num_total: int, num_prompts: int | None, heldout_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Seeded (train, held-out) split of prompt ids ``0..num_total-1``, each part sorted.

    The ids are shuffled with ``random.Random(seed)``; the first ``num_prompts`` (all when None) are used,
    and the first ``ceil(heldout_fraction * num_prompts)`` of those are held out.
    """
    n = num_total if num_prompts is None else num_prompts
    if not 2 <= n <= num_total:
        raise ValueError(f"num_prompts={num_prompts}; allowed: None or 2..{num_total}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction}; allowed: [0, 1)")
    ids = list(range(num_total))
    random.Random(seed).shuffle(ids)
    ids = ids[:n]
    n_heldout = min(math.ceil(heldout_fraction * n), n - 1)  # keep at least one train prompt
    return sorted(ids[n_heldout:]), sorted(ids[:n_heldout])


def pick_pair(responses: list[str], scores: list[float], min_gap: float) -> tuple[int, int] | None:
    """Indices ``(chosen, rejected)`` of the best- and worst-scoring non-empty responses, or None.

    None when fewer than two responses are non-empty or ``max - min < min_gap``. Ties go to the
    earliest response.
    """
    candidates = [i for i, text in enumerate(responses) if text.strip()]
    if len(candidates) < 2:
        return None
    chosen = max(candidates, key=lambda i: scores[i])
    rejected = min(candidates, key=lambda i: scores[i])
    if scores[chosen] - scores[rejected] < min_gap:
        return None
    return chosen, rejected


def _messages(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content}]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def build_sentiment_dataset(
    output_dir: str | os.PathLike,
    *,
    model_name_or_path: str = "smollm2-135m-instruct",
    num_prompts: int | None = None,
    samples_per_prompt: int = 4,
    temperature: float = 1.0,
    top_p: float = 0.95,
    max_new_tokens: int = 48,
    min_gap: float = 0.3,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """Sample, score and pair responses into ``train.jsonl``/``heldout.jsonl`` (see the module docstring).

    Deterministic for a fixed seed, batch size and machine: the split uses ``random.Random(seed)`` and
    sampling batch ``k`` uses ``torch.manual_seed(seed + k)`` (`logitsam.eval.generate_responses`). The
    ``samples_per_prompt`` copies of a prompt sit next to each other in one batched call.

    Args:
        output_dir: created if missing; the four files in it are replaced.
        model_name_or_path: embedded name, local directory or hub id of the policy that samples.
        num_prompts: use this many prompts of `PROMPTS` (a seeded random subset); None uses all.
        samples_per_prompt: responses per prompt (>= 2).
        temperature, top_p, max_new_tokens, batch_size: sampling settings.
        min_gap: smallest VADER compound gap ``chosen_score - rejected_score`` (> 0) for a pair.
        heldout_fraction: share of the prompts held out, rounded up.
        seed: seeds the split and the sampling.
        progress: show the sampling progress bar.
        device: where to run the model (None: CPU).

    Returns:
        The metadata written to ``metadata.json``.
    """
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt={samples_per_prompt}; a pair needs at least 2")
    if not min_gap > 0:
        raise ValueError(f"min_gap={min_gap}; it must be > 0 so that chosen scores above rejected")
    start = time.perf_counter()
    train_ids, heldout_ids = split_prompt_ids(len(PROMPTS), num_prompts, heldout_fraction, seed)
    ids = sorted(train_ids + heldout_ids)

    model = load_model(model_name_or_path, device=device)
    tokenizer = load_tokenizer(model_name_or_path)
    texts = [PROMPTS[i] for i in ids for _ in range(samples_per_prompt)]
    responses = generate_responses(
        model, tokenizer, [_messages("user", t) for t in texts], max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=0, batch_size=batch_size, seed=seed,
        apply_chat_template=True, progress=progress,
    )
    responses = [r.strip() for r in responses]
    scores = VaderJudge().score(texts, responses)

    pairs, sample_scores = _pair_responses(ids, responses, scores, samples_per_prompt, min_gap)
    out = Path(output_dir)
    split_pairs = {"train": [pairs[i] for i in train_ids if i in pairs],
                   "heldout": [pairs[i] for i in heldout_ids if i in pairs]}
    _write_splits(out, split_pairs, heldout_ids)
    no_pair = {"train": len(train_ids) - len(split_pairs["train"]),
               "heldout": len(heldout_ids) - len(split_pairs["heldout"])}
    if any(no_pair.values()):
        logger.warning("no pair with a VADER gap >= %s for %d of %d train prompts and %d of %d held-out prompts",
                       min_gap, no_pair["train"], len(train_ids), no_pair["heldout"], len(heldout_ids))
    metadata = _metadata(
        model_name_or_path, str(next(model.parameters()).device), split_pairs, sample_scores, no_pair,
        train_ids=train_ids, heldout_ids=heldout_ids, responses=responses, start=start,
        sampling={"samples_per_prompt": samples_per_prompt, "temperature": temperature, "top_p": top_p,
                  "top_k": 0, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "chat_template": True},
        min_gap=min_gap, heldout_fraction=heldout_fraction, seed=seed)
    write_json(out / SENTIMENT_FILES["metadata"], metadata, indent=2, ensure_ascii=False)
    logger.info("sentiment pairs: %d train, %d held-out (mean gap %s) in %s, %.1f s",
                len(split_pairs["train"]), len(split_pairs["heldout"]), metadata["mean_gap"], out,
                metadata["build_seconds"])
    return metadata


def _pair_responses(ids, responses, scores, samples_per_prompt, min_gap):
    """Each prompt's ``samples_per_prompt`` neighbouring samples -> its pair (``pick_pair``) or none; also every
    sample's score per prompt (the sampling policy's own mean reward)."""
    pairs: dict[int, dict[str, Any]] = {}
    sample_scores: dict[int, list[float]] = {}
    for j, prompt_id in enumerate(ids):
        block = slice(j * samples_per_prompt, (j + 1) * samples_per_prompt)
        sample_scores[prompt_id] = scores[block]
        picked = pick_pair(responses[block], scores[block], min_gap)
        if picked is None:
            continue
        c, r = (j * samples_per_prompt + k for k in picked)
        pairs[prompt_id] = {
            "prompt_id": prompt_id,
            "prompt": _messages("user", PROMPTS[prompt_id]),
            "chosen": _messages("assistant", responses[c]),
            "rejected": _messages("assistant", responses[r]),
            "chosen_score": scores[c],
            "rejected_score": scores[r],
        }
    return pairs, sample_scores


def _write_splits(out: Path, split_pairs, heldout_ids) -> None:
    """The pair files and the held-out prompts; each pair file is read back by the trainer's reader, which
    raises on the first pair it would drop."""
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in split_pairs.items():
        _write_jsonl(out / SENTIMENT_FILES[split], rows)
    _write_jsonl(out / SENTIMENT_FILES["heldout_prompts"],
                 [{"prompt_id": i, "prompt": _messages("user", PROMPTS[i])} for i in heldout_ids])
    for split, rows in split_pairs.items():
        if rows:
            load_preference_examples(out / SENTIMENT_FILES[split], on_invalid="error")


def _metadata(model_name_or_path, device, split_pairs, sample_scores, no_pair, *, train_ids, heldout_ids,
              responses, start, sampling, min_gap, heldout_fraction, seed) -> dict[str, Any]:
    """What ``metadata.json`` records: the model, sampling, judge, counts, gaps and versions."""
    gaps = {split: [p["chosen_score"] - p["rejected_score"] for p in rows] for split, rows in split_pairs.items()}
    gguf = EMBEDDED_MODELS.get(model_name_or_path)
    return {
        "description": "on-policy controlled-sentiment preference pairs (DPO paper §6.1) built by logitsam",
        "model": {"name_or_path": model_name_or_path, "gguf_file": gguf.gguf_file if gguf else None,
                  "package": gguf.pip_spec if gguf else None},
        "sampling": {**sampling, "device": device},
        "judge": f"vaderSentiment {importlib.metadata.version('vaderSentiment')} compound",
        "min_gap": min_gap,
        "heldout_fraction": heldout_fraction,
        "seed": seed,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - start, 1),
        "counts": {
            "prompts": len(train_ids) + len(heldout_ids),
            "train_prompts": len(train_ids),
            "heldout_prompts": len(heldout_ids),
            "train_pairs": len(split_pairs["train"]),
            "heldout_pairs": len(split_pairs["heldout"]),
            "train_prompts_without_pair": no_pair["train"],
            "heldout_prompts_without_pair": no_pair["heldout"],
            "responses": len(responses),
            "empty_responses": sum(not r for r in responses),
        },
        "mean_gap": _mean(gaps["train"] + gaps["heldout"]),
        "mean_gap_by_split": {split: _mean(g) for split, g in gaps.items()},
        # The sampling policy's own mean reward: the baseline a trained policy's samples are compared with.
        "mean_response_score": {
            "train": _mean([s for i in train_ids for s in sample_scores[i]]),
            "heldout": _mean([s for i in heldout_ids for s in sample_scores[i]]),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "vaderSentiment": importlib.metadata.version("vaderSentiment"),
            "logitsam": importlib.metadata.version("logitsam"),
        },
        "files": SENTIMENT_FILES,
    }


def load_sentiment_paths() -> dict[str, Path]:
    """Paths of the packaged dataset's files, keyed like `SENTIMENT_FILES` (plus ``"readme"``).

    Raises:
        FileNotFoundError: a file is missing from the installed package.
    """
    root = importlib.resources.files("logitsam") / "resources" / "sentiment"
    if not isinstance(root, Path):
        raise FileNotFoundError(f"the packaged sentiment data is not on the file system ({root}); "
                                "install logitsam from a directory or wheel, not a zip")
    paths = {key: root / name for key, name in {**SENTIMENT_FILES, "readme": "README.md"}.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"packaged sentiment data is incomplete; missing: {', '.join(missing)}")
    return paths

"""Pluggable judges: score (prompt, response) pairs, higher is better.

``make_judge("vader")`` scores the sentiment of the response (the IMDb-style "positive continuation"
task; no network, no model). ``make_judge("reward:PATH_OR_ID")`` scores with any Hugging Face
sequence-classification reward model.

A prompt is what the policy saw: a string, or the whole conversation as a message list (every turn, not
only the last user message), so a judge can rate the response in its context.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from logitsam.data import render_hh_transcript
from logitsam.models import DTYPES, resolve_model_path

from .generate import Prompt  # a string, or the conversation so far as chat messages

logger = logging.getLogger(__name__)

JUDGE_SPECS = ("vader", "reward:PATH_OR_ID")


@runtime_checkable
class Judge(Protocol):
    """Anything with a ``name`` and ``score(prompts, responses) -> one float per pair``.

    Each prompt is a string or the whole conversation before the response (a message list).
    """

    name: str

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]: ...


def _check_pairs(prompts: list[Prompt], responses: list[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; they must be paired")


class VaderJudge:
    """VADER's compound sentiment of the response, in [-1, 1] (Hutto & Gilbert, ICWSM 2014).

    The prompt is ignored: the judge rates the continuation alone.
    """

    name = "vader"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        _check_pairs(prompts, responses)
        return [float(self._analyzer.polarity_scores(r)["compound"]) for r in responses]


class RewardModelJudge:
    """A Hugging Face ``AutoModelForSequenceClassification`` reward model.

    Score = the logit of a single-label head (``num_labels == 1``), otherwise the last label's logit.

    Each pair is rendered with the tokenizer's chat template as the conversation plus
    ``[assistant: response]`` (a string prompt is one user turn) when it has one
    (``apply_chat_template=None`` or True), else as the text pair ``(prompt, response)`` with the
    tokenizer's special tokens (the OpenAssistant DeBERTa convention), where a conversation is written
    as an HH transcript (``render_hh_transcript``). Inputs longer than
    ``max_length`` lose tokens from the left, so the response end the score depends on is kept; how
    many were cut is logged.

    Args:
        model_name_or_path: hub id, local directory or embedded name.
        batch_size: pairs per forward pass.
        device: default ``"cuda"`` when available, else ``"cpu"``.
        max_length: token limit per pair.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"``.
        apply_chat_template: None (when available), True (required) or False (text pair).
        progress: show a progress bar over batches.
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        *,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        max_length: int = 1024,
        dtype: str = "float32",
        apply_chat_template: bool | None = None,
        progress: bool = True,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size={batch_size} and max_length={max_length} must both be >= 1")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
        path = resolve_model_path(model_name_or_path)
        self.name = f"reward:{model_name_or_path}"
        self.batch_size, self.max_length, self.progress = batch_size, max_length, progress
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"reward model tokenizer {path!r} has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if apply_chat_template and not has_template:
            raise ValueError(f"apply_chat_template=True but the tokenizer of {path!r} has no chat_template")
        self.use_chat_template = has_template if apply_chat_template is None else apply_chat_template
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
        if model.config.pad_token_id is None:  # batched scoring finds each row's last token by the pad id
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(self.device).eval()
        logger.info("reward judge %s: %d labels, chat template %s", path, model.config.num_labels,
                    "on" if self.use_chat_template else "off")

    def _encode(self, prompts: list[Prompt], responses: list[str], truncation: bool):
        kwargs = {"truncation": truncation, "max_length": self.max_length if truncation else None}
        if self.use_chat_template:
            texts = [
                self.tokenizer.apply_chat_template(
                    _messages(p) + [{"role": "assistant", "content": r}], tokenize=False
                )
                for p, r in zip(prompts, responses, strict=True)
            ]
            return self.tokenizer(texts, add_special_tokens=False, **kwargs)
        texts = [p if isinstance(p, str) else render_hh_transcript(p) for p in prompts]
        return self.tokenizer(texts, responses, **kwargs)

    @torch.no_grad()
    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        _check_pairs(prompts, responses)
        lengths = [len(ids) for ids in self._encode(prompts, responses, truncation=False)["input_ids"]]
        cut = sum(n > self.max_length for n in lengths)
        if cut:
            logger.warning("%s: %d of %d pairs exceed max_length=%d and lose tokens from the left",
                           self.name, cut, len(lengths), self.max_length)
        scores: list[float] = []
        starts = range(0, len(prompts), self.batch_size)
        for start in tqdm(starts, desc=f"judge {self.name}", disable=not self.progress):
            stop = start + self.batch_size
            enc = self._encode(prompts[start:stop], responses[start:stop], truncation=True)
            enc = self.tokenizer.pad(enc, return_tensors="pt").to(self.device)
            logits = self.model(**enc).logits.float()  # (b, num_labels)
            scores.extend(logits[:, -1].tolist())  # the only label, or the last one
        return scores


def _messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def make_judge(spec: str, **kwargs) -> Judge:
    """Build a judge from ``"vader"`` or ``"reward:PATH_OR_ID"``; kwargs go to ``RewardModelJudge``."""
    if spec == "vader":
        if kwargs:
            raise TypeError(f"the vader judge takes no options, got {sorted(kwargs)}")
        return VaderJudge()
    if spec.startswith("reward:") and len(spec) > len("reward:"):
        return RewardModelJudge(spec[len("reward:"):], **kwargs)
    raise ValueError(f"unknown judge {spec!r}; allowed: {', '.join(JUDGE_SPECS)}")

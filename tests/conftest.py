"""Shared fixtures: tiny random models and a tokenizer built in code (no network, seconds)."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

HH_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def needs(available: bool, what: str):
    """Skip a multi-process test whose launcher (torchrun, accelerate, DeepSpeed) is missing, except in CI: CI
    (``CI`` set, as ``.ci/run`` does) installs every launcher, so there the test runs and fails instead."""
    return pytest.mark.skipif(not available and not os.environ.get("CI"), reason=f"{what} not available")


def cli_error_line(argv, capsys) -> str:
    """Run ``logitsam ARGV``, expect a user error (exit 2, no traceback) and return its one last stderr line."""
    from logitsam.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def make_tiny_tokenizer():
    """A character-level fast tokenizer with special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = list(string.printable)
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<unk>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(vocab_size: int = 128, tie: bool = False, seed: int = 0, hidden_size: int = 16):
    """A 2-layer random Llama (fp32) small enough for exact gradient checks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    model = LlamaForCausalLM(cfg).float()
    model.config.use_cache = False
    return model


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny random Llama + tokenizer directory, loadable by from_pretrained."""
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok), tie=True)
    out = tmp_path / "tiny-llama"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def hh_path():
    if not HH_PATH.exists():
        pytest.skip("real HH-RLHF pairs not found next to the checkout (../shared/data/hh-rlhf)")
    return HH_PATH


# ---- the trainer tests: a small preference file and an isolated cache directory ----
WORDS = ["good", "bad", "fine", "great", "awful", "nice", "poor", "kind", "rude", "calm"]


@pytest.fixture
def pairs_file(tmp_path):
    rows = []
    for i in range(24):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 3 + 1) % len(WORDS)]
        rows.append({"prompt": f"Say something {i}:", "chosen": f" {a} {a} day", "rejected": f" {b} night {i}"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITSAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"

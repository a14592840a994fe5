"""Fixtures shared by the trainer tests: a small preference file and an isolated cache directory."""

import json

import pytest

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

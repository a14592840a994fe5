"""benchmarks/bench_trl.py's harness logic: round order, statistics, argv, batch digests (no model, no training)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_trl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rounds_alternate(bench):
    v = ["trl", "ours", "ours-sam", "pt", "pt-sam"]
    assert bench.round_order(v, 0) == v
    assert bench.round_order(v, 1) == v[::-1]
    assert bench.round_order(v, 2) == v


def test_variants_and_old_flags(bench):
    assert bench.selected_variants(bench.parse_args([])) == ["trl", "ours", "ours-sam"]
    opts = bench.parse_args(["--precompute", "--preference-trainer"])
    assert opts.precompute and bench.selected_variants(opts) == ["trl", "ours", "ours-sam", "pt", "pt-sam"]
    assert bench.selected_variants(bench.parse_args(["--variants", "pt-sam,trl"])) == ["trl", "pt-sam"]
    with pytest.raises(SystemExit):
        bench.selected_variants(bench.parse_args(["--variants", "nope"]))
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "2", "--warmup", "2"])  # nothing left to time


def test_workers_never_get_output(bench):
    argv = ["--tiny", "--output", "x.json", "--repeats", "2", "--output=y.json"]
    assert bench.driver_argv(argv) == ["--tiny", "--repeats", "2"]


def test_summary_medians_and_ratios(bench):
    def run(v, rnd, s, mem):
        return {"variant": v, "round": rnd, "seconds_per_step": s, "peak_memory_bytes": mem, "steps_timed": 3,
                "first_loss": 0.69}

    runs = [run("trl", 0, 2.0, 100), run("trl", 1, 4.0, 100), run("trl", 2, 3.0, 100),
            run("ours", 0, 1.0, 50), run("ours", 1, 2.0, 60), run("ours", 2, 6.0, 70)]
    rows = {r["variant"]: r for r in bench.summarize(["trl", "ours"], runs)}
    assert rows["trl"]["seconds_per_step"] == {"min": 2.0, "median": 3.0, "max": 4.0}
    assert rows["trl"]["time_ratio"] == 1.0
    assert rows["ours"]["time_ratio"] == pytest.approx(2.0 / 3.0)
    # same-round ratios: 0.5, 0.5, 2.0
    assert rows["ours"]["time_ratio_paired"] == {"min": 0.5, "median": 0.5, "max": 2.0}
    assert rows["ours"]["memory_ratio"] == pytest.approx(0.6)
    assert rows["ours"]["steps_timed"] == 9
    assert "ours" in bench.format_table(list(rows.values()))


def test_digest_same_for_trl_and_logitsam_batches(bench):
    # TRL's collator: completion_mask; logitsam's: labels with -100 outside the completion; padding differs
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 8, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    completion = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 1, 1, 0]])
    trl_batch = {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}
    labels = torch.where(completion.bool(), ids, torch.full_like(ids, -100))
    ours = {"input_ids": ids[:, :4], "attention_mask": mask[:, :4], "labels": labels[:, :4]}
    assert bench.batch_digest(trl_batch) == bench.batch_digest(ours)
    other = dict(ours, labels=torch.where(mask[:, :4].bool(), ids[:, :4], -100))  # the prompt trained on too
    assert bench.batch_digest(other) != bench.batch_digest(ours)

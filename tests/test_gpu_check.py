"""benchmarks/gpu_check.py's checks of the precision and sharding fixes, on a CPU: parts registered and run by default,
float32 matmul flags restored, tf32_ratio at toy sizes, the GPU-only parts skipped with a reason (no training run).
The whole dry run: ``python benchmarks/gpu_check.py --tiny --out DIR --parts tf32_ratio,bf16_step0_margins,...``."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
FIXES = ("tf32_ratio", "bf16_step0_margins", "zero3_skip", "fsdp2_efficient_loading")


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flags():
    return torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32


def test_fix_parts_are_registered_in_the_default_run(gc):
    names = list(gc.PARTS)
    assert all(n in names for n in FIXES)
    assert names.index("fsdp2_efficient_loading") < names.index("train")  # before the long trainings
    assert all(cap > 0 for _, cap in gc.PARTS.values())


def test_fp32_matmul_flags_are_restored_after_an_error(gc):
    before = _flags()
    with pytest.raises(RuntimeError), gc.fp32_matmul(allow_tf32=True, precision="high"):
        assert torch.get_float32_matmul_precision() == "high"
        raise RuntimeError("inside")
    assert _flags() == before


def test_tf32_ratio_tiny_on_cpu(gc):
    before = _flags()
    out = gc.tf32_ratio("cpu", tiny=True)
    assert _flags() == before
    assert list(out["reduced_fp32_matmul"]) == ["matmul_precision high"]  # no allow_tf32 case on a CPU
    assert out["reduced_fp32_matmul"]["matmul_precision high"] is True
    assert len(out["cases"]) == 4 and len(out["controls"]) == 8
    assert out["pass"], out
    json.dumps(out)


def test_gpu_only_parts_skip_on_cpu(gc, tmp_path):
    assert gc.fsdp2_efficient_loading("cpu", True, tmp_path) == {"skipped": "needs 2 GPUs, found 0"}
    assert "skipped" in gc.zero3_skip("cpu", True, tmp_path)


def test_first_record_is_the_first_with_margins(gc, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"step": 1, "train_runtime": 1.0}, {"step": 1, "loss": math.log(2), "rewards/margins": 0.0},
        {"step": 2, "loss": 0.6, "rewards/margins": 0.1})) + "\n")
    assert gc._first_record(tmp_path) == {"step": 1, "loss": math.log(2), "rewards/margins": 0.0}
    assert gc._first_record(tmp_path / "missing") is None

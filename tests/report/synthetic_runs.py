"""Synthetic finished run directories: the files the trainer, `logitsam compare` and `logitsam eval` write.

A helper module, not a conftest.py: tests elsewhere import the root conftest by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

STEPS = 10
EVAL_STEPS = (5, 10)


def final_accuracy(sam: str, rho: float, seed: int) -> float:
    """The eval_rewards/accuracies of the last eval record of a synthetic run."""
    return 0.6 + (0.05 if sam != "none" else 0.0) + 10.0 * rho + 0.013 * seed


def train_value(key: str, step: int, sam: str, rho: float, seed: int) -> float:
    shift = 0.01 * seed + (0.1 if sam != "none" else 0.0) + 100.0 * rho
    return {
        "loss": 0.69 * math.exp(-0.1 * step) + 0.03 * seed * math.sin(step),
        "rewards/accuracies": min(1.0, 0.5 + 0.03 * step + shift / 4),
        "rewards/margins": 0.05 * step + shift,
        "logps/chosen": -120.0 - 0.5 * step + shift,
        "logps/rejected": -125.0 - 1.5 * step,
        "squeeze/chosen_delta_ref": -0.4 * step * (1.0 - shift) + 0.2 * seed * math.cos(step),
        "squeeze/rejected_delta_ref": -1.2 * step,
        "squeeze/argmax_prob_chosen": min(1.0, 0.3 + 0.02 * step - shift / 10),
        "squeeze/displacement_rate": max(0.0, min(1.0, 0.2 + 0.04 * step - shift / 2)),
    }[key]


TRAIN_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
              "squeeze/chosen_delta_ref", "squeeze/rejected_delta_ref", "squeeze/argmax_prob_chosen",
              "squeeze/displacement_rate")


def write_run(root: Path, name: str, *, sam: str = "none", rho: float = 1e-4, seed: int = 0, loss_type="sigmoid",
              variant: str | None = None, seconds_per_step: float | None = 1.0, peak_memory: int | None = 2**30,
              eval_results: bool = True, files=("metrics", "config", "info", "results"),
              extra_results: dict | None = None) -> Path:
    """One run directory; ``files`` picks which of the four files exist; ``extra_results`` adds eval_results keys."""
    run = root / name
    run.mkdir(parents=True)
    config = {"model_name_or_path": "tiny-llama", "dataset_name": "hh", "loss_type": loss_type, "beta": 0.1,
              "sam": sam, "sam_rho": rho, "seed": seed, "max_steps": STEPS, "output_dir": str(run)}
    if "config" in files:
        (run / "logitsam_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if "metrics" in files:
        lines = []
        for step in range(1, STEPS + 1):
            lines.append({"step": step, "epoch": step / STEPS, "learning_rate": 1e-6,
                          **{k: train_value(k, step, sam, rho, seed) for k in TRAIN_KEYS}})
            if step in EVAL_STEPS:
                record = {"step": step, "epoch": step / STEPS, "eval_runtime": 3.0, "eval_samples_per_second": 9.0}
                record.update({f"eval_{k}": train_value(k, step, sam, rho, seed) for k in TRAIN_KEYS})
                record["eval_rewards/accuracies"] = final_accuracy(sam, rho, seed) - (0.1 if step < STEPS else 0)
                lines.append(record)
        lines.append({"step": STEPS, "train_runtime": 12.0, "train_loss": 0.5})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if "info" in files:
        info = {"seed": seed, "device": "cpu"}
        if variant is not None:
            info["variant"] = variant
        if seconds_per_step is not None:
            info["seconds_per_step"] = seconds_per_step
        if peak_memory is not None:
            info["peak_memory_bytes"] = peak_memory
        (run / "run_info.json").write_text(json.dumps(info))
    if "results" in files and eval_results:
        results = {"eval/preference_accuracy": final_accuracy(sam, rho, seed), "eval/margin": 0.3 + seed,
                   "winrate/vader/win_rate": 0.55 + 0.02 * seed, "winrate/vader/ci_low": 0.5,
                   "winrate/vader/ci_high": 0.6, "flatness/hessian_trace": 12.0 - seed, **(extra_results or {})}
        (run / "eval_results.json").write_text(json.dumps(results))
    return run


# seconds per step and peak memory of the two variants of `two_by_two`: (dpo, dpo+logits-sam) by seed
COST = {"dpo": ((1.0, 2.0 * 2**30), (1.2, 2.2 * 2**30)), "dpo+logits-sam": ((1.5, 2.5 * 2**30), (1.9, 2.4 * 2**30))}


def make_two_by_two(root: Path) -> list[Path]:
    """dpo and dpo+logits-sam (rho 1e-4), seeds 0 and 1, every file present; variants named in run_info."""
    dirs = []
    for variant, sam in (("dpo", "none"), ("dpo+logits-sam", "logits")):
        for seed in (0, 1):
            sps, mem = COST[variant][seed]
            dirs.append(write_run(root / "runs", f"{variant}-s{seed}", sam=sam, seed=seed, variant=variant,
                                  seconds_per_step=sps, peak_memory=int(mem)))
    return dirs


def make_rho_sweep(root: Path) -> list[Path]:
    """ipo (sam none) plus ipo+logits-sam at rho 1e-5, 1e-4, 1e-3, one seed each; variants from the config."""
    dirs = [write_run(root / "sweep", "ipo", loss_type="ipo", files=("metrics", "config", "results"))]
    for rho in (1e-5, 1e-4, 1e-3):
        dirs.append(write_run(root / "sweep", f"sam-{rho:g}", sam="logits", rho=rho, loss_type="ipo",
                              files=("metrics", "config", "results")))
    return dirs

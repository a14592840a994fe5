"""A study recipe for the tests and a fake subprocess runner that writes what `logitsam train/eval/ches` would.

A helper module, not a conftest.py. The fake values are chosen so the tests can work the statistics out by
hand: per seed s, ``CONTROL[s]`` at rho 0, and ``CONTROL[s] + 0.1 s`` at every rho > 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

CONTROL = {1: -1.0, 2: -2.0, 3: -4.0}  # shift/chosen_delta_ref of the rho = 0 runs, by seed
STEPS, EVAL_STEPS = 4, 2


def recipe(data_path: Path, **extra) -> dict:
    raw = {"task": "hh", "data": {"path": str(data_path), "heldout_pairs": 4, "train_pairs": 12},
           "train": {"model_name_or_path": "tiny", "max_steps": STEPS, "eval_steps": EVAL_STEPS, "max_length": 32,
                     "max_prompt_length": 16, "learning_rate": 0.01},
           "grid": {"sam_rho": [0, 1.0e-2], "seeds": [1, 2, 3]},
           "budget": {"dpo_seconds_per_step": 1.0, "sam_seconds_per_step": 2.0}}
    raw.update(extra)
    return raw


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def chosen_delta(rho: float, seed: int) -> float:
    return CONTROL[seed] + (0.1 * seed if rho > 0 else 0.0)


def ystar(step: int, rho: float, seed: int) -> float:
    """Per-token log p(y*) on the held-out set: the same at step 0 for every run (the initial model)."""
    return -1.0 + step * (0.05 - (0.02 if rho > 0 else 0.0)) + 0.001 * seed


class FakeRunner:
    """Stands in for `compare.run_logged`: records each command and writes the files the real one would."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []  # (subcommand, output dir)

    def __call__(self, cmd, log_path, *, what):
        args = dict(zip(cmd[4::2], cmd[5::2], strict=False))
        sub, out = cmd[3], Path(args.get("--output_dir", ""))
        self.calls.append((sub, out.name))
        if sub == "train":
            self._train(yaml.safe_load(Path(args["--config"]).read_text()), out)
        elif sub == "eval":
            config = yaml.safe_load((Path(args["--model"]) / "logitsam_config.yaml").read_text())
            rho, seed = float(config["sam_rho"]), int(config["seed"])
            results = {"eval/preference_accuracy": 0.5 + 0.1 * seed, "shift/chosen_delta_ref": chosen_delta(rho, seed),
                       "shift/displacement_rate": 0.5, "model": str(out)}
            (out / "eval_results.json").write_text(json.dumps(results))
        elif sub == "ches":
            out.mkdir(parents=True, exist_ok=True)
            (out / "filtered.jsonl").write_text("{}\n")

    @staticmethod
    def _train(config: dict, out: Path) -> None:
        rho, seed = float(config["sam_rho"]), int(config["seed"])
        (out / "logitsam_config.yaml").write_text(yaml.safe_dump(config))
        records = []
        for step in range(0, STEPS + 1):
            if step:
                records.append({"step": step, "loss": 0.69})
            if step % EVAL_STEPS == 0:
                records.append({"step": step, "eval_loss": 0.69,
                                "eval_squeeze/argmax_logp_chosen": ystar(step, rho, seed),
                                "eval_squeeze/chosen_logps_per_token": -2.0 - 0.1 * step,
                                "eval_squeeze/rejected_logps_per_token": -2.5 - 0.2 * step})
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / "run_info.json").write_text(json.dumps({"seed": seed, "seconds_per_step": 1.0 + rho * 100}))
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "checkpoint-4").mkdir()
        (out / "checkpoint-4" / "optimizer.pt").write_bytes(b"state")

"""Helpers for the reference-precompute and head-choice tests: a pairs file and a tiny CPU run config."""

import json

from logitsam.train import build_config

TINY_RUN = {
    "max_steps": 3, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "learning_rate": 1e-2,
    "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "logging_steps": 1, "save_steps": 1000, "eval_size": 4,
    "max_length": 48, "max_prompt_length": 24, "seed": 0, "sam_rho": 0.05, "report_to": "none", "use_cpu": True,
    "dataloader_num_workers": 0, "disable_tqdm": True,
}


def write_pairs(path, n: int):
    rows = [{"prompt": f"Tell me {i}:", "chosen": f" yes {i % 7}", "rejected": f" no no {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_config(model_dir, data, out, **overrides):
    """A TrainConfig through the same parser as the command line."""
    values = {"model_name_or_path": str(model_dir), "dataset_name": str(data), "output_dir": str(out),
              **TINY_RUN, **overrides}
    return build_config(None, {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()})

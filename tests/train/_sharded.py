"""Shared by the sharded-training tests: tiny models and data on disk, and one 2-process ``logitsam train`` launch."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import make_tiny_llama, make_tiny_tokenizer

HERE = Path(__file__).resolve().parent
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
COMMON = ["--max_steps", "1", "--learning_rate", "0.05", "--optim", "sgd", "--eval_size", "0", "--logging_steps", "1",
          "--use_cpu", "true", "--max_length", "32", "--max_prompt_length", "16", "--seed", "0", "--save_steps", "100",
          "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "2", "--sam_rho", "0.05",
          "--sam_norm", "local"]


def make_workdir(root):
    """Tied and untied tiny models, 16 pairs and an FSDP2 config under ``root``."""
    rows = [{"prompt": f"Q{i}:", "chosen": f" yes {i}", "rejected": f" no no {i}"} for i in range(16)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "fsdp.json").write_text(json.dumps({"fsdp_version": 2, "reshard_after_forward": True}))
    # as recipes/accelerate/fsdp2.yaml: rank 0 loads, FSDP2 broadcasts its weights at preparation
    (root / "fsdp-efficient.json").write_text(json.dumps({"fsdp_version": 2, "reshard_after_forward": True,
                                                          "cpu_ram_efficient_loading": True}))
    for tied in (True, False):
        tok, model = make_tiny_tokenizer(), make_tiny_llama(vocab_size=105, tie=tied)
        model.save_pretrained(root / f"model-{tied}")
        tok.save_pretrained(root / f"model-{tied}")
    return root


def launch(workdir, out, tied, chunk, *, fsdp, env_extra=None, sam="logits", extra=(), launcher=None,
           fsdp_config="fsdp.json"):
    """One training step on 2 processes; returns the completed process (no assertion on its return code).

    ``launcher`` (default: ``fsdp``) runs ``_sharded_launch.py`` instead of ``-m logitsam.cli``."""
    env = {**os.environ, "LOGITSAM_CACHE": str(workdir / "cache"), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    entry = [str(HERE / "_sharded_launch.py")] if (fsdp if launcher is None else launcher) else ["-m", "logitsam.cli"]
    keys = dict(zip(COMMON[::2], COMMON[1::2], strict=True)) | dict(zip(extra[::2], extra[1::2], strict=True))
    keys |= {"--model_name_or_path": str(workdir / f"model-{tied}"), "--dataset_name": str(workdir / "pairs.jsonl"),
             "--sam": sam, "--output_dir": str(out)}
    if chunk is not None:
        keys["--sam_chunk_size"] = str(chunk)
    args = ["train", *(x for kv in keys.items() for x in kv)]
    if fsdp:
        args += ["--fsdp", "full_shard auto_wrap", "--fsdp_config", str(workdir / fsdp_config)]
    port = 29500 + (os.getpid() + hash(str(out))) % 2000
    return subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port), *entry, *args],
                          env=env, capture_output=True, text=True, timeout=300)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

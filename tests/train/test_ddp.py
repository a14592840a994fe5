"""Two CPU processes (torchrun, gloo) against one process at the same global batch."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import needs
from transformers import AutoModelForCausalLM

COMMON = ["--max_steps", "2", "--learning_rate", "0.05", "--optim", "sgd", "--eval_size", "0", "--logging_steps", "1",
          "--use_cpu", "true", "--max_length", "32", "--max_prompt_length", "16", "--seed", "0", "--save_steps", "100",
          "--lr_scheduler_type", "constant"]


def _data(tmp_path):
    rows = [{"prompt": f"Q{i}:", "chosen": f" yes {i}", "rejected": f" no no {i}"} for i in range(16)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(cmd, env):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@needs(shutil.which("torchrun") is not None or os.path.exists(os.path.join(os.path.dirname(sys.executable),
                                                                         "torchrun")), "torchrun")
@pytest.mark.parametrize("sam", ["none", "logits", "full"])
def test_two_processes_equal_one(tiny_model_dir, tmp_path, sam):
    env = {**os.environ, "LOGITSAM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    data = _data(tmp_path)
    base = ["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--sam", sam,
            "--sam_rho", "0.05", *COMMON]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    one, two = tmp_path / "one", tmp_path / "two"
    # plain DPO: one process at the same global batch. logits-SAM and full SAM with the per-device norm: one
    # process with the same per-device batch and 2 accumulation steps (each micro-batch its own eps, as each rank
    # has its own; full SAM's ascent pass must therefore not all-reduce gradients)
    single = ["--per_device_train_batch_size", "4"] if sam == "none" else \
        ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--sam_norm", "local"]
    _run([sys.executable, "-m", "logitsam.cli", *base, *single, "--output_dir", str(one)], env)
    _run([torchrun, "--nproc_per_node", "2", "--master_port", str(29500 + (os.getpid() % 1000)), "-m", "logitsam.cli",
          *base, "--per_device_train_batch_size", "2", "--sam_norm", "local", "--output_dir", str(two)], env)
    info = json.loads((two / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["ranks_in_sync"] is True
    a = AutoModelForCausalLM.from_pretrained(one).state_dict()
    b = AutoModelForCausalLM.from_pretrained(two).state_dict()
    init = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)
    records = {run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (one, two)}
    logs = records[two]
    # num_tokens: summed over both ranks, inside the metrics' one collective: the same running total as one process
    tokens = {run: [r["num_tokens"] for r in rows if "loss" in r] for run, rows in records.items()}
    assert tokens[two] == tokens[one] and tokens[one][0] > 0 and len(tokens[one]) == 2
    if sam != "none":  # SAM really ran: its perturbation moved the loss by about <g, eps>
        if sam == "logits":
            ratios = [r["sam/first_order_ratio"] for r in logs if "sam/first_order_ratio" in r]
            assert ratios and all(0.5 < r < 2 for r in ratios), ratios
        else:
            assert all(r["sam/loss_post"] > r["sam/loss_pre"] for r in logs if "sam/loss_pre" in r)
        # SAM's metrics are means over the ranks, as one process's mean over the same micro-batches (full SAM's
        # used to be rank 0's own)
        for key in ("sam/loss_pre", "sam/loss_post", "sam/grad_norm"):
            got = {run: [r[key] for r in rows if key in r] for run, rows in records.items()}
            assert got[two] and got[two] == pytest.approx(got[one], rel=1e-5), (key, got)


ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


@needs(os.path.exists(ACCELERATE), "the accelerate launcher")
def test_accelerate_launch_runs_two_processes(tiny_model_dir, tmp_path):
    """``accelerate launch -m logitsam.cli train``: two ranks that end in sync.

    On CPUs accelerate 1.15 starts several processes only through its torchrun path (``--multi_gpu``, here with
    gloo through ``--use_cpu true``); ``--cpu --num_processes 2`` without ``--mpirun_hostfile`` starts one process.
    """
    env = {**os.environ, "LOGITSAM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    launch = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(29500 + (os.getpid() + 7) % 1000), "-m", "logitsam.cli"]
    _run([*launch, "train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(_data(tmp_path)),
          "--sam", "logits", "--sam_rho", "0.05", *COMMON, "--per_device_train_batch_size", "2",
          "--output_dir", str(out)], env)
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["ranks_in_sync"] is True and info["global_step"] == 2

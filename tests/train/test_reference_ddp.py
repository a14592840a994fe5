"""Two CPU processes (torchrun, gloo): each computes its share of the reference pass, the cache is written once."""

import os
import subprocess
import sys

import torch
from _run_config import write_pairs
from conftest import needs
from transformers import AutoModelForCausalLM

from logitsam.models import load_tokenizer
from logitsam.train import build_config
from logitsam.train.reference import compute_reference_logps
from logitsam.train.run import build_datasets

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
ARGS = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--eval_size", "0", "--use_cpu", "true",
        "--max_length", "32", "--max_prompt_length", "16", "--seed", "0", "--save_steps", "100", "--optim", "sgd"]


@needs(os.path.exists(TORCHRUN), "torchrun")
def test_two_processes_share_the_reference_pass(tiny_model_dir, tmp_path):
    """16 pairs, 2 steps x batch 2 per rank: each rank reads 3 batches (one is accelerate's look-ahead).

    The union is 12 distinct rows (the ranks take alternate batches of one shared permutation); their
    values must equal a single process's, and exactly one rank writes the file.
    """
    cache = tmp_path / "cache"
    env = {**os.environ, "LOGITSAM_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(30500 + (os.getpid() % 1000)), "-m",
           "logitsam.cli", "train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data),
           *ARGS, "--output_dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("this process reads 6 of 16 rows; 0 in the cache, computing 6 on cpu") == 2
    assert log.count("reference log-probs cached at") == 1
    files = list((cache / "ref_logps").iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt", files
    saved = torch.load(files[0], weights_only=True)
    rows = (~saved["chosen"].isnan()).nonzero().flatten().tolist()
    assert len(rows) == 12

    # the same rows in this single process
    cfg = build_config(None, {"model_name_or_path": str(tiny_model_dir), "dataset_name": str(data),
                              "eval_size": "0", "max_length": "32", "max_prompt_length": "16"})
    tokenizer = load_tokenizer(tiny_model_dir)
    train, _, _ = build_datasets(cfg, tokenizer, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    chosen, rejected = compute_reference_logps(model, train, rows, pad_token_id=tokenizer.pad_token_id)
    torch.testing.assert_close(saved["chosen"][rows], chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(saved["rejected"][rows], rejected, atol=1e-5, rtol=1e-5)

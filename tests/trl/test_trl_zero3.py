"""LogitsSAMDPOTrainer under DeepSpeed ZeRO-3 (2 CPU processes, gloo, ``DS_ACCELERATOR=cpu``): it constructs, checks
the LM head at train begin on the engine, and one logits-SAM step with SGD lands on the weights of the same step in
one process (the same 4 pairs as 2 accumulated micro-batches) to 1e-6.

ZeRO-3 with ``stage3_param_persistence_threshold: 0`` partitions every parameter from load time on (``zero.Init``):
outside a module's forward its weight is an empty tensor. The head check used to run a forward on that model in
``__init__`` and failed there ("'weight' must be 2-D"). See ``_trl_zero3_launch.py`` for the CPU workarounds.

Needs DeepSpeed (``pip install deepspeed --no-build-isolation``, after torch); skipped without it outside CI.
"""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from _trl_zero3_launch import run as run_step  # noqa: E402
from conftest import make_tiny_llama, make_tiny_tokenizer, needs  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

pytestmark = needs(importlib.util.find_spec("deepspeed") is not None, "DeepSpeed")

HERE = Path(__file__).resolve().parent
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
WORDS = ["good", "bad", "fine", "great", "awful", "nice", "poor", "kind", "rude", "calm"]
ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                               "stage3_gather_16bit_weights_on_model_save": True}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workdir(root: Path) -> Path:
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok), tie=False)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = [{"prompt": f"Say something {i}:", "chosen": f" {WORDS[i]} {WORDS[i]} day",
             "rejected": f" {WORDS[(3 * i + 1) % 10]} night {i}"} for i in range(4)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "zero3.json").write_text(json.dumps(ZERO3))
    return root


def test_zero3_trains_and_equals_one_process(tmp_path):
    workdir = _workdir(tmp_path / "work")
    zero3, single = tmp_path / "zero3", tmp_path / "single"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port()),
                           str(HERE / "_trl_zero3_launch.py"), str(workdir), str(zero3), "zero3"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads((zero3 / "result.json").read_text())
    assert got["world_size"] == 2 and got["deepspeed"] is True, got
    assert got["zero3_partitioned"] == got["params"] > 0, got  # every parameter really was an empty partition
    assert got["ref_model"] == "DeepSpeedEngine" and got["head_checked"] is True, got
    vocab = len(make_tiny_tokenizer())
    assert any(f"V={vocab}," in m for m in got["messages"]), got["messages"]  # not the partition's empty shape

    run_step(workdir, single, "single")
    want = json.loads((single / "result.json").read_text())
    assert want["world_size"] == 1 and want["zero3_partitioned"] == 0
    loss = got["log"]["loss"]
    assert math.isfinite(loss) and loss > math.log(2) + 1e-3  # step 1: ln 2 before the perturbation, more after
    assert loss == pytest.approx(want["log"]["loss"], rel=1e-6)
    assert got["log"]["sam/grad_norm"] == pytest.approx(want["log"]["sam/grad_norm"], rel=1e-5)

    a, b, init = (load_file(d / "model.safetensors") for d in (single, zero3, workdir / "model"))
    assert a.keys() == b.keys() == init.keys()
    assert all(not torch.equal(a[k], init[k]) for k in a), "the step left some weight unchanged"
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)

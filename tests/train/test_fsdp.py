"""FSDP2 through the Trainer (2 CPU processes, gloo) against DDP: one logits-SAM step with SGD lands on the same
weights (w - lr * grad) to 1e-6, so every parameter's gradient, the head's included, matches DDP's.

``_sharded_launch.py`` runs ``logitsam train`` with accelerate's FSDP2 preparation switched on for CPU processes
(accelerate 1.15 runs ``--fsdp`` on CPU as DDP otherwise). Two layouts:

- accelerate 1.15's own (``--fsdp "full_shard auto_wrap"``, ``reshard_after_forward: true``): decoder layers in
  their own groups; final norm + head (+ the tied embedding) in one group that keeps its weights gathered after
  forward; the root likewise. Here the head weight happens to stay unsharded after the wrapper's forward, so the
  old flow (head applied after ``model(...)`` returned) also matched DDP when run before this change (checked by
  hand: max difference 4e-9 untied dense and tied chunked); only ``ranks_in_sync`` crashed on the DTensors.
- ``root_reshard``: the layout accelerate built before that group (every block and the root reshard after
  forward), where the head sits in the root's group: after the forward the head weight is a sharded DTensor. The
  in-wrapper flow still matches DDP; the old flow fails (``test_head_after_forward_fails_when_the_root_reshards``).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from _sharded import COMMON, TORCHRUN, launch, make_workdir, ok
from conftest import needs
from safetensors.torch import load_file

pytestmark = needs(os.path.exists(TORCHRUN), "torchrun")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def ddp_run(workdir):
    """The DDP run of a case, launched once per module."""
    done = {}

    def run(tied, chunk):
        if (tied, chunk) not in done:
            out = workdir / f"ddp-{tied}-{chunk}"
            ok(launch(workdir, out, tied, chunk, fsdp=False))
            done[tied, chunk] = out
        return done[tied, chunk]

    return run


def _assert_same_step(fsdp_dir, ddp_dir, init_dir, tied):
    sharding = json.loads((fsdp_dir / "sharding.json").read_text())
    assert sharding["fsdp"] and sharding["head_is_dtensor"], sharding
    assert sharding["dtensor_params"] == sharding["params"], sharding  # every parameter really was sharded
    assert json.loads((fsdp_dir / "run_info.json").read_text())["ranks_in_sync"] is None  # nothing replicated
    a, b, init = (load_file(d / "model.safetensors") for d in (ddp_dir, fsdp_dir, init_dir))
    if tied:  # the FSDP2 full state dict keeps the tied head as its own (equal) tensor
        torch.testing.assert_close(b.pop("lm_head.weight"), b["model.embed_tokens.weight"], atol=0, rtol=0)
    assert a.keys() == b.keys()
    assert all(not torch.equal(a[k], init[k]) for k in a), "the step left some weight unchanged"
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("chunk", [None, 8], ids=["dense", "chunked"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fsdp2_step_equals_ddp(workdir, ddp_run, tmp_path, tied, chunk):
    proc = launch(workdir, tmp_path / "fsdp", tied, chunk, fsdp=True)
    ok(proc)
    _assert_same_step(tmp_path / "fsdp", ddp_run(tied, chunk), workdir / f"model-{tied}", tied)


def test_head_after_forward_fails_when_the_root_reshards(workdir, ddp_run, tmp_path):
    """Same case (tied, dense) in the layout whose root reshards after forward: the in-wrapper flow equals DDP.
    The old flow reads the head after the wrapper returned and meets a sharded DTensor (``aten.mm.default got
    mixed torch.Tensor and DTensor``). Gathering it there with ``full_tensor()`` instead crashed the backward
    (SIGSEGV, torch 2.13 CPU) when tried by hand."""
    layout = {"LOGITSAM_TEST_LAYOUT": "root_reshard"}
    ok(launch(workdir, tmp_path / "inside", True, None, fsdp=True, env_extra=layout))
    _assert_same_step(tmp_path / "inside", ddp_run(True, None), workdir / "model-True", True)

    old = launch(workdir, tmp_path / "after", True, None, fsdp=True,
                 env_extra={**layout, "LOGITSAM_TEST_HEAD_AFTER_FORWARD": "1"})
    assert old.returncode != 0
    assert "mixed torch.Tensor and DTensor" in old.stderr, old.stderr[-3000:]


def test_fsdp2_peft_reference_and_eval_equal_ddp(workdir, tmp_path):
    """LoRA, reference computed at every step with the adapters off (inside the FSDP2 root's forward, like the
    policy pass), and an evaluation pass: adapters after one step, train and eval losses equal DDP's."""
    extra = ["--use_peft", "true", "--lora_r", "4", "--precompute_ref_log_probs", "false", "--eval_size", "4",
             "--per_device_eval_batch_size", "2"]
    runs = {}
    for fsdp in (False, True):
        runs[fsdp] = tmp_path / f"fsdp-{fsdp}"
        ok(launch(workdir, runs[fsdp], False, None, fsdp=fsdp, extra=extra))
    assert json.loads((runs[True] / "sharding.json").read_text())["head_is_dtensor"]
    a, b = (load_file(runs[f] / "adapter_model.safetensors") for f in (False, True))
    assert a.keys() == b.keys() and any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    logs = {f: [json.loads(line) for line in (runs[f] / "metrics.jsonl").read_text().splitlines()] for f in runs}
    for key in ("loss", "eval_loss", "sam/loss_post"):
        got = {f: [r[key] for r in logs[f] if key in r] for f in logs}
        assert got[True] and got[True] == pytest.approx(got[False], abs=1e-6), (key, got)


def test_full_sam_is_refused_under_fsdp(workdir, tmp_path):
    proc = launch(workdir, tmp_path / "full", False, None, fsdp=True, sam="full")
    assert proc.returncode != 0
    assert "config key 'sam' = 'full' cannot run with 'fsdp'" in proc.stderr, proc.stderr[-3000:]


def test_fsdp2_separate_reference_is_sharded_and_equals_ddp(workdir, tmp_path):
    """``precompute_ref_log_probs: false`` with a separate reference (a copy of the policy's directory): two
    logits-SAM steps under FSDP2 land on DDP's weights to 1e-6, and the reference is sharded as the policy is
    (every parameter a DTensor; its head pass runs inside its own FSDP2 root's forward). Step 1 moves the policy
    off the reference, so step 2's loss and rewards depend on the reference's log-probs."""
    ref_dir = workdir / "ref-copy"
    if not ref_dir.exists():
        shutil.copytree(workdir / "model-True", ref_dir)
    extra = ["--precompute_ref_log_probs", "false", "--ref_model_name_or_path", str(ref_dir), "--max_steps", "2"]
    runs = {fsdp: tmp_path / f"fsdp-{fsdp}" for fsdp in (False, True)}
    for fsdp, out in runs.items():
        ok(launch(workdir, out, True, None, fsdp=fsdp, extra=extra))
    ref = json.loads((runs[True] / "sharding.json").read_text())["ref"]
    assert ref["params"] > 0 and ref["dtensor_params"] == ref["params"], ref
    _assert_same_step(runs[True], runs[False], workdir / "model-True", True)
    logs = {f: [json.loads(line) for line in (runs[f] / "metrics.jsonl").read_text().splitlines()] for f in runs}
    margins = {f: [r["rewards/margins"] for r in logs[f] if "rewards/margins" in r] for f in logs}
    assert len(margins[True]) == 2 and margins[True][1] != 0, margins
    assert margins[True] == pytest.approx(margins[False], abs=1e-6), margins


def test_fsdp2_cpu_ram_efficient_loading_precompute_equals_one_process(workdir, ddp_run, tmp_path):
    """``fsdp_cpu_ram_efficient_loading: true`` (recipes/accelerate/fsdp2.yaml): only rank 0 is sure to hold real
    weights until FSDP2 broadcasts them at preparation; here rank 1 overwrites its loaded weights with noise to stand
    for that. The head check and the reference precompute run at train begin on the prepared models, so every cached
    reference log-prob (DPO, the default precompute) equals the 1-process value, and the step equals DDP's. (Before,
    the precompute ran on each rank's unprepared copy: rank 1's share came from the noise.)"""
    from logitsam.data import build_preference_dataset
    from logitsam.models import load_model, load_tokenizer
    from logitsam.train.reference import compute_reference_logps

    cache = tmp_path / "cache"
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "LOGITSAM_CACHE": str(cache),
           "LOGITSAM_TEST_NOISE_OTHER_RANKS": "1"}
    out = tmp_path / "efficient"
    ok(launch(workdir, out, False, None, fsdp=True, env_extra=env, fsdp_config="fsdp-efficient.json"))
    _assert_same_step(out, ddp_run(False, None), workdir / "model-False", False)

    files = list((cache / "ref_logps").glob("*.pt"))
    assert len(files) == 1, files
    saved = torch.load(files[0], weights_only=True)
    rows = (~saved["chosen"].isnan()).nonzero().flatten().tolist()
    assert len(rows) >= 4, rows  # both ranks' shares (2 pairs each, + the look-ahead batch)
    model_dir = workdir / "model-False"
    tokenizer = load_tokenizer(model_dir)
    dataset, _ = build_preference_dataset(str(workdir / "pairs.jsonl"), tokenizer, max_length=32, max_prompt_length=16)
    chosen, rejected = compute_reference_logps(load_model(model_dir, dtype="float32"), dataset, rows,
                                               pad_token_id=tokenizer.pad_token_id)
    torch.testing.assert_close(saved["chosen"][rows], chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(saved["rejected"][rows], rejected, atol=1e-5, rtol=0)


def test_fsdp2_global_sam_norm_and_bf16_ratio(workdir, tmp_path):
    """``sam_norm: global`` on 2 ranks: each rank scales its eps by the root of the squared head-gradient norms
    averaged over the ranks. The independent value: one process, learning rate 0, reads the same two batches as two
    steps (rank 0's, then rank 1's) with ``sam_norm: local`` and logs each norm n0, n1: the 2-rank run must log
    sqrt((n0^2 + n1^2) / 2) (``local`` would log (n0 + n1) / 2). Then bf16 autocast under FSDP2 (``--bf16 true``,
    fp32 weights, chunked head): logits-SAM's ``sam/first_order_ratio`` stays ~1."""
    two, one = tmp_path / "two", tmp_path / "one"
    ok(launch(workdir, two, False, None, fsdp=True, extra=["--sam_norm", "global", "--sam_rho", "0.01"]))
    env = {**os.environ, "LOGITSAM_CACHE": str(workdir / "cache"), "OMP_NUM_THREADS": "1"}
    keys = dict(zip(COMMON[::2], COMMON[1::2], strict=True)) | {
        "--model_name_or_path": str(workdir / "model-False"), "--dataset_name": str(workdir / "pairs.jsonl"),
        "--output_dir": str(one), "--sam": "logits", "--sam_rho": "0.01", "--learning_rate": "0", "--max_steps": "2"}
    ok(subprocess.run([sys.executable, "-m", "logitsam.cli", "train", *(x for kv in keys.items() for x in kv)],
                      env=env, capture_output=True, text=True, timeout=300))
    n0, n1 = (json.loads(line)["sam/grad_norm"] for line in (one / "metrics.jsonl").read_text().splitlines()[:2])
    assert abs(n0 - n1) > 1e-3 * n0, (n0, n1)  # the two definitions differ here
    logged = json.loads((two / "metrics.jsonl").read_text().splitlines()[0])["sam/grad_norm"]
    assert logged == pytest.approx(((n0**2 + n1**2) / 2) ** 0.5, rel=1e-5), (logged, n0, n1)

    bf16 = tmp_path / "bf16"
    ok(launch(workdir, bf16, False, 8, fsdp=True, extra=["--sam_rho", "0.01", "--bf16", "true"]))
    ratio = json.loads((bf16 / "metrics.jsonl").read_text().splitlines()[0])["sam/first_order_ratio"]
    assert 0.8 < ratio < 1.25, ratio

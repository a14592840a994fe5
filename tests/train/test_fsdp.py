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

import pytest
import torch
from _sharded import TORCHRUN, launch, make_workdir, ok
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not available")


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
    assert json.loads((fsdp_dir / "run_info.json").read_text())["ranks_in_sync"] is True
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

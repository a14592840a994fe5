"""DeepSpeed ZeRO-3 through the Trainer (2 CPU processes, gloo, ``DS_ACCELERATOR=cpu``) against DDP: one logits-SAM
step with SGD lands on the same weights to 1e-6.

ZeRO-3 with ``stage3_param_persistence_threshold: 0`` partitions every parameter, the tiny ones included, from load
time on (``zero.Init``): outside a module's forward its weight is an empty tensor. The in-wrapper flow reads the
head inside its own forward, where DeepSpeed has gathered it, and its gradient is partitioned and reduced like any
other; the old flow (head read after the forward returned) meets the empty partition and fails on the same case.

Needs DeepSpeed (``pip install deepspeed --no-build-isolation``, after torch); skipped without it outside CI. Most
cases use a reference-free loss (``simpo``); the precomputed reference runs at train begin through the engines
(``test_zero3_precomputed_reference_and_accumulation_equal_ddp``). See ``_sharded_launch.py`` for the CPU
workarounds.
"""

import importlib.util
import json
import shutil

import pytest
import torch
from _sharded import launch, make_workdir, ok
from conftest import needs
from safetensors.torch import load_file

pytestmark = needs(importlib.util.find_spec("deepspeed") is not None, "DeepSpeed")

ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                               "stage3_gather_16bit_weights_on_model_save": True}}
DS_ENV = {"LOGITSAM_TEST_DEEPSPEED": "1", "DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = make_workdir(tmp_path_factory.mktemp("zero3"))
    (root / "zero3.json").write_text(json.dumps(ZERO3))
    return root


@pytest.fixture
def ds_config(workdir):
    return workdir / "zero3.json"


def _zero3(workdir, ds_config, out, tied, chunk, **env):
    # --deepspeed instead of --use_cpu: accelerate enables DeepSpeed only when use_cpu is off
    return launch(workdir, out, tied, chunk, fsdp=False, launcher=True, env_extra={**DS_ENV, **env},
                  extra=["--loss_type", "simpo", "--use_cpu", "false", "--deepspeed", str(ds_config)])


@pytest.mark.parametrize(("tied", "chunk"), [(True, None), (False, 8)], ids=["tied-dense", "untied-chunked"])
def test_zero3_step_equals_ddp(workdir, ds_config, tmp_path, tied, chunk):
    ddp, ds = tmp_path / "ddp", tmp_path / "zero3"
    ok(launch(workdir, ddp, tied, chunk, fsdp=False, extra=["--loss_type", "simpo"]))
    ok(_zero3(workdir, ds_config, ds, tied, chunk))
    sharding = json.loads((ds / "sharding.json").read_text())
    assert sharding["zero3_partitioned"] == sharding["params"], sharding  # every parameter really was partitioned
    assert json.loads((ds / "run_info.json").read_text())["ranks_in_sync"] is None  # nothing replicated
    a, b, init = (load_file(d / "model.safetensors") for d in (ddp, ds, workdir / f"model-{tied}"))
    if tied:
        b.pop("lm_head.weight", None)
    assert a.keys() == b.keys()
    assert all(not torch.equal(a[k], init[k]) for k in a), "the step left some weight unchanged"
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)

    if tied and chunk is None:  # the same case through the old flow: the head is an empty partition there
        old = _zero3(workdir, ds_config, tmp_path / "after", tied, chunk, LOGITSAM_TEST_HEAD_AFTER_FORWARD="1")
        assert old.returncode != 0
        assert "outside the vocabulary [0, 0)" in old.stderr, old.stderr[-3000:]


def test_full_sam_is_refused_under_deepspeed(workdir, ds_config, tmp_path):
    proc = launch(workdir, tmp_path / "full", False, None, fsdp=False, launcher=True, env_extra=DS_ENV, sam="full",
                  extra=["--loss_type", "simpo", "--use_cpu", "false", "--deepspeed", str(ds_config)])
    assert proc.returncode != 0
    assert "config key 'sam' = 'full' cannot run with 'deepspeed'" in proc.stderr, proc.stderr[-3000:]



def test_zero3_separate_reference_is_partitioned_and_equals_ddp(workdir, ds_config, tmp_path):
    """DPO with ``precompute_ref_log_probs: false`` and a separate reference (a copy of the policy's directory):
    the reference runs in a DeepSpeed inference engine, every parameter an empty ZeRO-3 partition outside its
    forward, and two logits-SAM steps land on DDP's weights to 1e-6 (step 2's rewards depend on the reference)."""
    ref_dir = workdir / "ref-copy"
    if not ref_dir.exists():
        shutil.copytree(workdir / "model-False", ref_dir)
    extra = ["--precompute_ref_log_probs", "false", "--ref_model_name_or_path", str(ref_dir), "--max_steps", "2"]
    ddp, ds = tmp_path / "ddp", tmp_path / "zero3"
    ok(launch(workdir, ddp, False, None, fsdp=False, extra=extra))
    ok(launch(workdir, ds, False, None, fsdp=False, launcher=True, env_extra=DS_ENV,
              extra=[*extra, "--use_cpu", "false", "--deepspeed", str(ds_config)]))
    ref = json.loads((ds / "sharding.json").read_text())["ref"]
    assert ref["type"] == "DeepSpeedEngine" and ref["zero3_partitioned"] == ref["params"] > 0, ref
    assert json.loads((ds / "run_info.json").read_text())["ranks_in_sync"] is None  # nothing replicated
    a, b = (load_file(d / "model.safetensors") for d in (ddp, ds))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    logs = {d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (ddp, ds)}
    margins = {d: [r["rewards/margins"] for r in logs[d] if "rewards/margins" in r] for d in logs}
    assert len(margins[ds]) == 2 and margins[ds][1] != 0, margins
    assert margins[ds] == pytest.approx(margins[ddp], abs=1e-6), margins


def test_zero3_refuses_on_nonfinite_skip(workdir, ds_config, tmp_path):
    """accelerate runs the engine's optimizer step inside backward at each accumulation boundary, before the
    once-per-step skip decision, so ``skip`` would log ``nonfinite_skipped`` and apply the poisoned update: refused
    in one message, before any step (on the previous main the run started and the NaN step was applied)."""
    proc = launch(workdir, tmp_path / "refused", False, None, fsdp=False, launcher=True, env_extra=DS_ENV,
                  extra=["--loss_type", "simpo", "--use_cpu", "false", "--deepspeed", str(ds_config),
                         "--on_nonfinite", "skip"])
    assert proc.returncode != 0
    assert "config key 'on_nonfinite' = 'skip' cannot run with DeepSpeed" in proc.stderr, proc.stderr[-3000:]


def test_zero3_precomputed_reference_and_accumulation_equal_ddp(workdir, ds_config, tmp_path):
    """DPO with the default precomputed reference under ZeRO-3 (the head check and the precompute run at train begin
    through the engines, on gathered partitions), with 2 accumulated micro-batches per step and ``sam_norm: global``:
    the step and the logged reference-dependent metrics equal DDP's."""
    extra = ["--gradient_accumulation_steps", "2", "--sam_norm", "global", "--per_device_train_batch_size", "1"]
    ddp, ds = tmp_path / "ddp", tmp_path / "zero3"
    ok(launch(workdir, ddp, True, 8, fsdp=False, extra=extra))
    ok(launch(workdir, ds, True, 8, fsdp=False, launcher=True, env_extra=DS_ENV,
              extra=[*extra, "--use_cpu", "false", "--deepspeed", str(ds_config)]))
    a, b = (load_file(d / "model.safetensors") for d in (ddp, ds))
    b.pop("lm_head.weight", None)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    logs = {d: json.loads((d / "metrics.jsonl").read_text().splitlines()[0]) for d in (ddp, ds)}
    for key in ("loss", "rewards/chosen", "sam/loss_post"):
        assert logs[ds][key] == pytest.approx(logs[ddp][key], abs=1e-6), (key, logs)


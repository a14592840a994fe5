"""``on_nonfinite: skip`` drops the whole optimizer step, agreed by all ranks: under accumulation and DDP."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import needs
from test_trainer import config, final_weights, records

from logitsam.train.run import run_training
from logitsam.train.trainer import PreferenceTrainer


def poison(monkeypatch, step, micro, rank=None):
    """Make the loss NaN in micro-batch ``micro`` (0-based) of optimizer step ``step`` (0-based) of training."""
    orig = PreferenceTrainer._loss_fn
    calls = {}

    def poisoned(self, *args):
        fn = orig(self, *args)
        if not self.model.training:
            return fn
        key = self.state.global_step
        calls[key] = calls.get(key, -1) + 1
        hit = key == step and calls[key] == micro and (rank is None or self.args.process_index == rank)
        return (lambda out: fn(out) * float("nan")) if hit else fn

    monkeypatch.setattr(PreferenceTrainer, "_loss_fn", poisoned)


@pytest.mark.parametrize("micro", [0, 1])
@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_skip_drops_the_whole_accumulated_step(tiny_model_dir, pairs_file, tmp_path, cache, monkeypatch, micro,
                                               optim):
    """Accumulation 2, NaN in one micro-batch of step 2: the weights after step 2 equal those after step 1.

    Before, a NaN in the first micro-batch cleared the gradients and the step went ahead on the second."""
    common = dict(eval_size=0, optim=optim, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  on_nonfinite="skip", sam="logits", sam_rho=1e-2)
    one = tmp_path / "one"
    run_training(config(tiny_model_dir, pairs_file, one, cache, max_steps=1, **common))
    poison(monkeypatch, step=1, micro=micro)
    two = tmp_path / "two"
    run_training(config(tiny_model_dir, pairs_file, two, cache, max_steps=2, **common))
    a, b = final_weights(one), final_weights(two)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logs = [r for r in records(two) if "loss" in r]
    assert [r.get("nonfinite_skipped") for r in logs] == [None, 1.0]


def _torchrun():
    path = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return path if os.path.exists(path) else None


DRIVER = textwrap.dedent("""
    import sys
    from logitsam.train.trainer import PreferenceTrainer
    from logitsam import cli

    orig = PreferenceTrainer._loss_fn

    def poisoned(self, *args):
        fn = orig(self, *args)
        hit = self.model.training and self.state.global_step == 1 and self.args.process_index == 1
        return (lambda out: fn(out) * float("nan")) if hit else fn

    if "--poison" in sys.argv:
        sys.argv.remove("--poison")
        PreferenceTrainer._loss_fn = poisoned
    cli.main(sys.argv[1:])
""")


@needs(_torchrun() is not None, "torchrun")
def test_nan_on_one_rank_skips_on_all_ranks(tiny_model_dir, tmp_path):
    """Two gloo processes, NaN on rank 1 only at step 2: no hang, both ranks skip, weights = after step 1."""
    rows = [{"prompt": f"Q{i}:", "chosen": f" yes {i}", "rejected": f" no no {i}"} for i in range(16)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "LOGITSAM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    base = ["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--sam", "logits",
            "--sam_rho", "0.05", "--learning_rate", "0.05", "--eval_size", "0", "--logging_steps", "1",
            "--use_cpu", "true", "--max_length", "32", "--max_prompt_length", "16", "--seed", "0",
            "--save_steps", "100", "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "2",
            "--on_nonfinite", "skip"]
    port = 29600 + (os.getpid() % 900)
    outs = {}
    for name, steps, extra in (("one", "1", []), ("two", "2", ["--poison"])):
        outs[name] = tmp_path / name
        cmd = [_torchrun(), "--nproc_per_node", "2", "--master_port", str(port + len(outs)), str(driver), *base,
               "--max_steps", steps, "--output_dir", str(outs[name]), *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # a hang fails here
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((outs["two"] / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["ranks_in_sync"] is True
    a, b = final_weights(outs["one"]), final_weights(outs["two"])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logs = [r for r in records(outs["two"]) if "loss" in r]
    assert [r.get("nonfinite_skipped") for r in logs] == [None, 1.0]
    assert "rewards/margins" not in logs[1]  # the poisoned micro-batch's metrics are left out on every rank


class _Shard(torch.nn.Parameter):
    """A parameter whose *local* values differ from what it reports globally (as a DTensor shard does)."""

    def to_local(self):
        return self._local


def test_checkpoint_nonfinite_check_reads_local_shards_and_partitions():
    """The checkpoint check looks at each rank's own values: an FSDP2 shard (``to_local``) or a ZeRO-3
    partition (``ds_tensor``), not the placeholder the parameter shows."""
    from logitsam.train.trainer import nonfinite_parameters

    model = torch.nn.Module()
    model.a = _Shard(torch.zeros(2))
    model.a._local = torch.tensor([float("nan")])
    model.b = torch.nn.Parameter(torch.empty(0))
    model.b.ds_tensor = torch.tensor([1.0, float("inf")])
    model.c = torch.nn.Parameter(torch.ones(3))
    accelerator = type("Acc", (), {"device": torch.device("cpu"), "num_processes": 1})()
    assert nonfinite_parameters(model, accelerator) == ["a", "b"]


def test_checkpoint_nonfinite_check_reads_the_device_once(monkeypatch):
    """One host read for the whole model (a stacked flag vector), not one sync per parameter: on a GPU each read
    waits for the device, and a 7B model has ~300 tensors."""
    from logitsam.train.trainer import nonfinite_parameters

    model = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(4)])
    with torch.no_grad():
        model[2].bias[1] = float("nan")
    accelerator = type("Acc", (), {"device": torch.device("cpu"), "num_processes": 1})()
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k:
                            reads.append(_name) or _real(self, *a, **k))
    assert nonfinite_parameters(model, accelerator) == ["2.bias"]
    assert reads == ["tolist"], reads

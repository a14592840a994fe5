"""The reference precompute: only the pairs the run reads, on the training device, cheap cache key."""

import copy
import time

import pytest
import torch
from _run_config import run_config, write_pairs
from transformers import AutoModelForCausalLM, TrainingArguments

import logitsam.train.reference as reference
import logitsam.train.run as run
from logitsam.data import build_preference_dataset
from logitsam.models import load_tokenizer
from logitsam.train.reference import ReferenceLookup, cached_reference_logps, model_identity
from logitsam.train.run import run_training


@pytest.fixture
def pairs40(tmp_path):
    return write_pairs(tmp_path / "pairs40.jsonl", 40)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITSAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def spy(monkeypatch):
    """Records (desc, rows computed, device of the model) for every reference pass."""
    calls = []
    real = reference.compute_reference_logps

    def wrapped(model, dataset, indices=None, **kw):
        n = len(dataset) if indices is None else len(indices)
        calls.append((kw.get("desc"), n, next(model.parameters()).device))
        return real(model, dataset, indices, **kw)

    monkeypatch.setattr(reference, "compute_reference_logps", wrapped)
    return calls


def test_max_steps_run_precomputes_only_the_pairs_it_reads(tiny_model_dir, pairs40, tmp_path, cache, spy, caplog):
    """36 train pairs, 3 steps x batch 2 x accumulation 2 = 12 read, + the 2 of accelerate's look-ahead batch.

    The run finishing proves the plan matched the Trainer's order: ``ReferenceLookup`` raises on any
    batch holding a row that was not computed.
    """
    with caplog.at_level("INFO", logger="logitsam.train"):
        result = run_training(run_config(tiny_model_dir, pairs40, tmp_path / "run", max_steps=3,
                                     per_device_train_batch_size=2, gradient_accumulation_steps=2))
    assert result["global_step"] == 3
    computed = {desc: n for desc, n, _ in spy}
    assert computed == {"reference log-probs": 3 * 2 * 2 + 2, "reference log-probs (eval)": 4}
    assert "this process reads 14 of 36 rows" in caplog.text


def test_epoch_run_precomputes_every_pair(tiny_model_dir, pairs40, tmp_path, cache, spy):
    run_training(run_config(tiny_model_dir, pairs40, tmp_path / "run", max_steps=-1, num_train_epochs=1,
                        per_device_train_batch_size=8))
    assert {desc: n for desc, n, _ in spy} == {"reference log-probs": 36, "reference log-probs (eval)": 4}


def test_a_row_outside_the_plan_is_an_error(tiny_model_dir, pairs40, tmp_path, cache, monkeypatch):
    """A wrong plan must stop the run, never train against a NaN (or zero) reference."""
    monkeypatch.setattr(reference, "consumed_indices", lambda *a, **k: [0, 1])
    with pytest.raises(RuntimeError, match="without a precomputed ref_chosen_logps"):
        run_training(run_config(tiny_model_dir, pairs40, tmp_path / "run", max_steps=2))


def test_reference_lookup_adds_the_values_of_complete_batches():
    collate = ReferenceLookup(lambda rows: {"n": len(rows)})
    with pytest.raises(RuntimeError, match="before the reference log-probs were precomputed"):
        collate([{"ref_row": 0}])
    collate.set(torch.tensor([-1.0, -2.0, float("nan")]), torch.tensor([-3.0, -4.0, -5.0]))
    batch = collate([{"ref_row": 1}, {"ref_row": 0}])
    assert batch["ref_chosen_logps"].tolist() == [-2.0, -1.0] and batch["ref_rejected_logps"].tolist() == [-4.0, -3.0]
    with pytest.raises(RuntimeError, match=r"index' \[7\]"):
        collate([{"ref_row": 0, "index": 3}, {"ref_row": 2, "index": 7}])


def _expected_device(tmp_path, use_cpu):
    return TrainingArguments(output_dir=str(tmp_path / "args"), use_cpu=use_cpu, report_to="none").device


DEVICES = [pytest.param(True, id="cpu"),
           pytest.param(False, id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("use_cpu", DEVICES)
def test_precompute_runs_on_the_trainer_device(tiny_model_dir, pairs40, tmp_path, cache, spy, use_cpu):
    run_training(run_config(tiny_model_dir, pairs40, tmp_path / "run", max_steps=1, use_cpu=use_cpu))
    expected = _expected_device(tmp_path, use_cpu)
    assert spy and all(device == expected for _, _, device in spy), (spy, expected)


@pytest.mark.parametrize("use_cpu", DEVICES)
def test_reference_model_moves_to_the_trainer_device(tiny_model_dir, pairs40, tmp_path, cache, monkeypatch, use_cpu):
    """``precompute_ref_log_probs: false``: the separate reference runs every step, so it sits on that device."""
    loaded = []
    real = run.load_reference
    monkeypatch.setattr(run, "load_reference", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    run_training(run_config(tiny_model_dir, pairs40, tmp_path / "run", max_steps=1, use_cpu=use_cpu,
                        precompute_ref_log_probs=False))
    expected = _expected_device(tmp_path, use_cpu)
    assert len(loaded) == 1 and {p.device for p in loaded[0].parameters()} == {expected}


# ---- the cache ---------------------------------------------------------------------------------
def test_cache_grows_with_the_rows_a_later_run_reads(tiny_model_dir, pairs40, tmp_path, spy):
    tokenizer = load_tokenizer(tiny_model_dir)
    dataset, _ = build_preference_dataset(pairs40, tokenizer, max_length=32, max_prompt_length=16)
    pad = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    kw = dict(pad_token_id=pad, batch_size=4, cache_dir=tmp_path)
    c1, _ = cached_reference_logps(model, dataset, [0, 1, 2], **kw)
    c2, r2 = cached_reference_logps(model, dataset, range(6), **kw)
    assert [n for _, n, _ in spy] == [3, 3]  # the second call computes only rows 3..5
    assert torch.equal(c2[:3], c1[:3]) and not c2[:6].isnan().any() and c2[6:].isnan().all()
    full_c, full_r = reference.compute_reference_logps(model, dataset, range(6), pad_token_id=pad, batch_size=4)
    torch.testing.assert_close(c2[:6], full_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r2[:6], full_r, atol=1e-5, rtol=1e-5)
    assert len(list((tmp_path / "ref_logps").glob("*.pt"))) == 1
    assert not list((tmp_path / "ref_logps").glob("*.tmp"))


def test_model_identity_tracks_weights_and_dtype(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    key = model_identity(model)
    assert model_identity(copy.deepcopy(model)) == key
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.lm_head.weight[0, 0] += 1e-3  # every tensor is sampled, its first element always
    assert model_identity(changed) != key
    finetuned = copy.deepcopy(model)
    with torch.no_grad():
        finetuned.model.layers[1].mlp.down_proj.weight.mul_(1.001)  # a whole tensor moves, as in training
    assert model_identity(finetuned) != key
    assert model_identity(copy.deepcopy(model).to(torch.bfloat16)) != key


def test_model_identity_does_not_read_every_weight(tiny_model_dir):
    """A 2**28-element parameter (1 GiB in fp32, held as an expanded view): sampled in milliseconds."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    big = torch.nn.Parameter(torch.ones(()).expand(2**16, 2**12), requires_grad=False)
    model.model.register_parameter("big", big)
    start = time.perf_counter()
    model_identity(model)
    assert time.perf_counter() - start < 1.0  # hashing every byte: about 7 s here


@pytest.mark.parametrize("use_cpu", DEVICES)
def test_trainer_prepares_a_separate_reference_on_its_device(tmp_path, use_cpu):
    """A separate reference handed to the trainer on the CPU goes through accelerate's model preparation in
    evaluation mode: on the trainer's device, frozen, in eval mode, and not wrapped (no DDP for a frozen model)."""
    from conftest import make_tiny_llama

    from logitsam.train.trainer import PreferenceTrainer

    policy, ref = make_tiny_llama(vocab_size=105), make_tiny_llama(vocab_size=105, seed=1)
    ref.train()  # as a model comes from from_pretrained: the trainer must not rely on the caller's eval()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=use_cpu, report_to="none")
    trainer = PreferenceTrainer(model=policy, args=args, ref_model=ref)
    assert trainer.ref_model is ref and ref in trainer.accelerator._models
    assert {p.device for p in ref.parameters()} == {trainer.accelerator.device} == {_expected_device(tmp_path, use_cpu)}
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())


def _first_log(out):
    import json

    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def test_bf16_autocast_reference_equals_the_policy_at_step_0(tiny_model_dir, pairs40, tmp_path, cache):
    """``dtype: float32`` + ``bf16: true`` (every GPU recipe): the policy runs under bf16 autocast, and so must its
    reference. The first logged step is before any update, so policy = reference: margins exactly 0 and the DPO loss
    ln 2, with the precomputed reference and with the live one. (A reference pass outside the autocast, in fp32,
    gave margins of -0.02 and a loss of 0.704 on SmolLM2.) fp32 and bf16 precomputes are different cache entries."""
    import math

    common = dict(max_steps=1, sam="none", dtype="float32", eval_size=0, per_device_train_batch_size=4)
    for precompute in (True, False):
        out = tmp_path / f"bf16-{precompute}"
        run_training(run_config(tiny_model_dir, pairs40, out, bf16=True, precompute_ref_log_probs=precompute,
                                **common))
        first = _first_log(out)
        assert first["rewards/margins"] == 0.0, (precompute, first)
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6), (precompute, first)
    assert len(list((cache / "ref_logps").glob("*.pt"))) == 1
    run_training(run_config(tiny_model_dir, pairs40, tmp_path / "fp32", **common))
    assert _first_log(tmp_path / "fp32")["rewards/margins"] == 0.0
    assert len(list((cache / "ref_logps").glob("*.pt"))) == 2  # not the bf16 values reused


_MERGE_SCRIPT = """
import sys, time, torch
from transformers import AutoModelForCausalLM
import logitsam.train.reference as reference
from logitsam.data import build_preference_dataset
from logitsam.models import load_tokenizer

model_dir, pairs, cache, first, last = sys.argv[1:6]
tokenizer = load_tokenizer(model_dir)
dataset, _ = build_preference_dataset(pairs, tokenizer, max_length=32, max_prompt_length=16)
real = reference.compute_reference_logps

def slow(*args, **kwargs):  # both processes have read the (empty) cache before either writes
    out = real(*args, **kwargs)
    time.sleep(2.0)
    return out

reference.compute_reference_logps = slow
model = AutoModelForCausalLM.from_pretrained(model_dir)
reference.cached_reference_logps(model, dataset, range(int(first), int(last)), pad_token_id=tokenizer.pad_token_id,
                                 batch_size=4, cache_dir=cache)
"""


def test_two_runs_sharing_the_cache_lose_no_rows(tiny_model_dir, pairs40, tmp_path):
    """Two processes fill disjoint rows of one cache file at the same time. Each merges its rows into the file as it
    is at write time, under a file lock; a plain read-modify-write lets the later writer drop the earlier one's."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "shared-cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _MERGE_SCRIPT, str(tiny_model_dir), str(pairs40), str(cache),
                               str(first), str(last)], env=env, stderr=subprocess.PIPE, text=True)
             for first, last in ((0, 6), (6, 12))]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    files = list((cache / "ref_logps").glob("*.pt"))
    assert len(files) == 1, files
    saved = torch.load(files[0], weights_only=True)
    assert (~saved["chosen"].isnan()).nonzero().flatten().tolist() == list(range(12))

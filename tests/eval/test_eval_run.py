"""`evaluate` and `run_ches` end to end on a tiny random model, checked against direct computations."""

import json
import shutil

import pytest
import torch
import yaml
from conftest import make_tiny_llama, make_tiny_tokenizer

from logitsam.eval.ches import rows_to_drop, run_ches
from logitsam.eval.run import evaluate
from logitsam.models import load_model

WORDS = ["good", "bad", "fine", "great", "awful", "nice", "poor", "kind"]


@pytest.fixture
def pairs_file(tmp_path):
    rows = [{"prompt": f"Tell me {i}:", "chosen": f" {WORDS[i % 8]} day", "rejected": f" {WORDS[(i + 3) % 8]} x{i}"}
            for i in range(10)]
    rows.insert(4, {"prompt": "Broken", "chosen": "same", "rejected": "same"})  # invalid: identical
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def two_models(tmp_path):
    tok = make_tiny_tokenizer()
    dirs = []
    for seed in (0, 1):
        out = tmp_path / f"model{seed}"
        make_tiny_llama(vocab_size=len(tok), tie=True, seed=seed).save_pretrained(out)
        tok.save_pretrained(out)
        dirs.append(out)
    return dirs


def direct_logps(model_dir, text_prompt, completion, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    p = tok(text_prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.log_softmax(-1)[0]
    return sum(float(logp[len(p) + i - 1, t]) for i, t in enumerate(c))


def test_evaluate_matches_direct_computation(pairs_file, two_models, tmp_path):
    policy, reference = two_models
    res = evaluate(str(policy), ref_model_name_or_path=str(reference), dataset_name=str(pairs_file), split="train",
                   max_length=64, max_prompt_length=32, judges=("vader",), num_prompts=4, max_new_tokens=6,
                   hessian_probes=3, hessian_batches=1, batch_size=4, output_dir=tmp_path / "eval")
    assert res["eval/num_pairs"] == 10 and res["dropped_rows"] == 1
    # recompute pair 0's implicit reward margin directly from full-model log-probs
    tok = make_tiny_tokenizer()
    beta = 0.1
    margins = []
    for i in range(10):
        prompt = f"Tell me {i}:"
        ch, rj = f" {WORDS[i % 8]} day", f" {WORDS[(i + 3) % 8]} x{i}"
        r_c = beta * (direct_logps(policy, prompt, ch, tok) - direct_logps(reference, prompt, ch, tok))
        r_r = beta * (direct_logps(policy, prompt, rj, tok) - direct_logps(reference, prompt, rj, tok))
        margins.append(r_c - r_r)
    assert res["eval/margin"] == pytest.approx(sum(margins) / 10, abs=1e-4)
    assert res["eval/preference_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 10)
    assert 0.0 <= res["winrate/vader/ci_low"] <= res["winrate/vader/win_rate"] <= res["winrate/vader/ci_high"] <= 1
    assert res["winrate/vader/n"] == 4
    assert res["flatness/hessian_trace"] == res["flatness/hessian_trace"]  # finite number, not NaN
    saved = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert saved["eval/margin"] == res["eval/margin"]
    assert len((tmp_path / "eval" / "eval_samples.jsonl").read_text().splitlines()) == 4


def test_evaluate_initial_model_against_itself(pairs_file, two_models):
    policy, _ = two_models
    res = evaluate(str(policy), ref_model_name_or_path=str(policy), dataset_name=str(pairs_file), split="train",
                   max_length=64, max_prompt_length=32, judges=())
    assert res["eval/margin"] == 0.0 and res["shift/chosen_delta_ref"] == 0.0
    assert res["shift/displacement_rate"] == 0.0


def test_ches_scores_and_filter(pairs_file, two_models, tmp_path):
    policy, _ = two_models
    out = tmp_path / "ches"
    summary = run_ches(str(policy), str(pairs_file), out, split="train", max_length=64, max_prompt_length=32,
                       batch_size=3, filter_top_percent=30)
    records = [json.loads(line) for line in (out / "ches_scores.jsonl").read_text().splitlines()]
    assert len(records) == 10 and summary["removed_top"] == 3
    top = sorted(records, key=lambda r: r["ches"], reverse=True)[:3]
    kept = [json.loads(line) for line in (out / "filtered.jsonl").read_text().splitlines()]
    assert len(kept) == 10 - 3  # top 30 % and the invalid row are gone
    source = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert kept == [r for i, r in enumerate(source) if i not in {t["row"] for t in top} and i != 4]
    assert all(0.0 <= r["edit_distance"] <= 1.0 for r in records)
    assert rows_to_drop(records, 0) == set()


# ---------------------------------------------------------------------------------------------------
# The reference, the judges' view of the prompt, and the device

EVAL_KW = dict(split="train", max_length=64, max_prompt_length=32, judges=())


def _run_dir(tmp_path, weights, config):
    run = tmp_path / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(weights, run)
    (run / "logitsam_config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_evaluate_uses_the_runs_ref_model_name_or_path(pairs_file, two_models, tmp_path):
    """The policy is a copy of model0: against model0 its margin is exactly 0, against model1 it is not."""
    m0, m1 = (str(m) for m in two_models)
    run = _run_dir(tmp_path, m0, {"model_name_or_path": m0, "ref_model_name_or_path": m1})
    res = evaluate(str(run), dataset_name=str(pairs_file), **EVAL_KW)
    assert res["reference"] == m1 and res["reference_from"] == f"{run / 'logitsam_config.yaml'}: ref_model_name_or_path"
    explicit = evaluate(str(run), ref_model_name_or_path=m1, dataset_name=str(pairs_file), **EVAL_KW)
    assert explicit["reference_from"] == "ref_model_name_or_path"
    assert res["eval/margin"] == explicit["eval/margin"] != 0.0
    # a checkpoint-N/ directory reads its run's config
    checkpoint = shutil.copytree(m0, run / "checkpoint-2")
    assert evaluate(str(checkpoint), dataset_name=str(pairs_file), **EVAL_KW)["reference"] == m1
    # a run without its own reference trained against the initial policy
    run = _run_dir(tmp_path, m0, {"model_name_or_path": m0, "ref_model_name_or_path": None})
    res = evaluate(str(run), dataset_name=str(pairs_file), **EVAL_KW)
    assert res["reference"] == m0 and res["reference_from"].endswith(": model_name_or_path")
    assert res["eval/margin"] == 0.0


class RecordingJudge:
    name = "recording"

    def __init__(self):
        self.prompts = []

    def score(self, prompts, responses):
        self.prompts.append(prompts)
        return [float(len(r)) for r in responses]


def test_judges_see_the_whole_conversation(monkeypatch):
    from logitsam.eval import run as eval_run

    tok = make_tiny_tokenizer()
    policy, reference = (make_tiny_llama(vocab_size=len(tok), seed=s) for s in (0, 1))
    judge = RecordingJudge()
    monkeypatch.setattr(eval_run, "make_judge", lambda spec, **kw: judge)
    conversations = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "And then?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
        "a plain string prompt",
    ]
    results, samples = eval_run.judged_win_rates(policy, reference, tok, conversations, ["recording"],
                                                 max_new_tokens=3, temperature=0.0, top_p=1.0, batch_size=2, seed=0)
    assert judge.prompts == [conversations, conversations]  # policy's responses, then the reference's
    assert [s["prompt"] for s in samples] == conversations
    assert results["winrate/recording/n"] == 3


def test_default_device_is_cuda_when_available(monkeypatch):
    from logitsam.eval.run import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"


def test_eval_device_reaches_both_models(pairs_file, two_models, tmp_path, monkeypatch):
    from logitsam.cli import main
    from logitsam.eval import run as eval_run

    placed = []

    def load(name, **kwargs):
        placed.append((name, kwargs.get("device")))
        return load_model(name, **kwargs)

    monkeypatch.setattr(eval_run, "load_model", load)
    policy, reference = (str(m) for m in two_models)
    main(["eval", "--model", policy, "--ref_model_name_or_path", reference, "--dataset_name", str(pairs_file),
          "--split", "train", "--max_length", "64", "--max_prompt_length", "32", "--num_prompts", "0",
          "--device", "cpu", "--output_dir", str(tmp_path / "eval")])
    assert placed == [(policy, "cpu"), (reference, "cpu")]
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text())["device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluate_on_cuda_matches_cpu(pairs_file, two_models, monkeypatch):
    from logitsam.eval import run as eval_run

    placed = []

    def load(name, **kwargs):
        model = load_model(name, **kwargs)
        placed.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(eval_run, "load_model", load)
    policy, reference = (str(m) for m in two_models)
    kw = dict(ref_model_name_or_path=reference, dataset_name=str(pairs_file), split="train", max_length=64,
              max_prompt_length=32, judges=("vader",), num_prompts=3, max_new_tokens=4, temperature=0.0)
    gpu = evaluate(policy, **kw)  # the default device
    assert gpu["device"] == "cuda" and placed == ["cuda", "cuda"]
    cpu = evaluate(policy, device="cpu", **kw)
    assert placed[2:] == ["cpu", "cpu"]
    for key in ("eval/margin", "eval/loss", "shift/chosen_delta_ref"):
        assert gpu[key] == pytest.approx(cpu[key], abs=1e-4), key
    assert gpu["winrate/vader/n"] == 3


# ---------------------------------------------------------------------------------------------------
# Device, dtype and the LM-head path: the flags `logitsam train` has

EVAL_ARGV = ["--split", "train", "--max_length", "64", "--max_prompt_length", "32", "--num_prompts", "0",
             "--use_cpu", "--batch_size", "4"]


def _eval_cli(tmp_path, name, policy, reference, pairs_file, *flags):
    from logitsam.cli import main

    out = tmp_path / name
    main(["eval", "--model", str(policy), "--ref_model", str(reference), "--dataset_name", str(pairs_file),
          *EVAL_ARGV, "--output_dir", str(out), *flags])
    return json.loads((out / "eval_results.json").read_text())


def test_chunked_head_gives_the_dense_numbers(pairs_file, two_models, tmp_path):
    """--sam_chunk_size 8 (several token chunks per batch, and vocabulary slices of 16 of the ~105 entries)
    against the dense (n, V) head: every number of eval_results.json to 1e-5."""
    policy, reference = two_models
    dense = _eval_cli(tmp_path, "dense", policy, reference, pairs_file, "--sam_chunk_size", "null")
    chunked = _eval_cli(tmp_path, "chunked", policy, reference, pairs_file, "--sam_chunk_size", "8",
                        "--sam_vocab_chunk_size", "16")
    assert dense["lm_head"] == "dense"
    assert chunked["lm_head"] == "chunked: sam_chunk_size=8, sam_vocab_chunk_size=16"
    assert dense["device"] == chunked["device"] == "cpu" and dense["dtype"] == "float32"
    numbers = {k for k, v in dense.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    assert {"eval/margin", "eval/loss", "shift/chosen_delta_ref", "shift/entropy_chosen",
            "flatness/logit_hessian_trace"} <= numbers
    assert numbers == {k for k, v in chunked.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    for key in sorted(numbers):
        assert chunked[key] == pytest.approx(dense[key], abs=1e-5, rel=1e-5), key
    # a tiny model's logits are far below the 1 GiB budget: auto is the dense head
    assert _eval_cli(tmp_path, "auto", policy, reference, pairs_file)["lm_head"] == "dense"


def test_auto_chunking_follows_the_training_rule():
    """eval may not import train (layering); its copy of the rule and budget must stay train's."""
    from logitsam.eval import run as eval_run
    from logitsam.train import run as train_run

    assert eval_run.LOGITS_BUDGET_BYTES == train_run.LOGITS_BUDGET_BYTES
    for tokens in (1, 2 * 8 * 1024, 2 * 8 * 4096):
        for vocab in (128, 32_000, 128_256, 151_936, 256_000):
            for chunk in ("auto", None, 64):
                got = eval_run.resolve_chunk_size(chunk, tokens=tokens, vocab_size=vocab)
                assert got == train_run.resolve_chunk_size(chunk, tokens=tokens, vocab_size=vocab)
    # 7B-size vocabularies at eval's default batch (8 pairs x 1024 tokens): chunked
    assert eval_run.resolve_chunk_size("auto", tokens=2 * 8 * 1024, vocab_size=128_256) == 512


def _recording_loader():
    """(calls, load_model stand-in): each call records (dtype asked, device asked, dtype loaded)."""
    loaded = []

    def load(name, **kwargs):
        model = load_model(name, **kwargs)
        loaded.append((kwargs.get("dtype"), kwargs.get("device"), next(model.parameters()).dtype))
        return model

    return loaded, load


def test_eval_dtype_reaches_both_models_and_is_recorded(pairs_file, two_models, tmp_path, monkeypatch):
    from logitsam.eval import run as eval_run

    loaded, load = _recording_loader()
    monkeypatch.setattr(eval_run, "load_model", load)
    policy, reference = two_models
    res = _eval_cli(tmp_path, "bf16", policy, reference, pairs_file, "--dtype", "bfloat16", "--sam_chunk_size", "8")
    assert loaded == [("bfloat16", "cpu", torch.bfloat16)] * 2
    assert res["dtype"] == "bfloat16" and res["device"] == "cpu"
    assert res["eval/num_pairs"] == 10 and res["eval/margin"] == res["eval/margin"]  # finite


def test_ches_device_and_dtype(pairs_file, two_models, tmp_path, monkeypatch, capsys):
    """`logitsam ches --dtype bfloat16` loads bf16 weights on the device asked for, and says so."""
    from logitsam.cli import main
    from logitsam.eval import ches as ches_module

    loaded, load = _recording_loader()
    monkeypatch.setattr(ches_module, "load_model", load)
    policy, _ = two_models
    base = ["ches", "--model", str(policy), "--dataset_name", str(pairs_file), "--max_length", "64",
            "--max_prompt_length", "32", "--use_cpu", "true"]
    main([*base, "--dtype", "bfloat16", "--output_dir", str(tmp_path / "bf16")])
    summary = json.loads(capsys.readouterr().out)
    assert loaded == [("bfloat16", "cpu", torch.bfloat16)]
    assert summary["dtype"] == "bfloat16" and summary["device"] == "cpu" and summary["pairs"] == 10
    main([*base, "--output_dir", str(tmp_path / "fp32")])  # the default, float32, as in train
    assert json.loads(capsys.readouterr().out)["dtype"] == "float32" and loaded[1][2] == torch.float32
    # the scores agree to bf16 precision
    bf16, fp32 = ([json.loads(line)["ches_norm"] for line in (tmp_path / d / "ches_scores.jsonl").open()]
                  for d in ("bf16", "fp32"))
    assert bf16 == pytest.approx(fp32, rel=0.05, abs=0.05)


def test_ches_default_device_is_evals(pairs_file, two_models, tmp_path, monkeypatch):
    from logitsam.eval import ches as ches_module

    placed = []
    monkeypatch.setattr(ches_module, "default_device", lambda: "cpu")
    monkeypatch.setattr(ches_module, "load_model", lambda name, **kw: placed.append(kw) or load_model(name, **kw))
    summary = run_ches(str(two_models[0]), str(pairs_file), tmp_path / "ches", split="train", max_length=64,
                       max_prompt_length=32)
    assert placed == [{"dtype": "float32", "device": "cpu"}] and summary["device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ches_runs_on_the_gpu_by_default(pairs_file, two_models, tmp_path):
    kw = dict(split="train", max_length=64, max_prompt_length=32)
    gpu = run_ches(str(two_models[0]), str(pairs_file), tmp_path / "gpu", **kw)
    cpu = run_ches(str(two_models[0]), str(pairs_file), tmp_path / "cpu", device="cpu", **kw)
    assert (gpu["device"], cpu["device"]) == ("cuda", "cpu")
    scores = [[json.loads(line)["ches_norm"] for line in (tmp_path / d / "ches_scores.jsonl").open()]
              for d in ("gpu", "cpu")]
    assert scores[0] == pytest.approx(scores[1], rel=1e-3, abs=1e-4)

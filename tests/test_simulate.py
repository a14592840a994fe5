"""`logitsam simulate`: the simulated step's bytes against independent values.

- parameters, gradients and AdamW state: exactly the analytic N x bytes (``report.budget``);
- the whole step's growth over its resting state: the CPU allocator's own count on real tensors
  (``torch.profiler`` memory events, which also see what a kernel allocates for itself);
- FSDP2 on a fake process group: each rank holds 1 / world of the parameters and optimizer state;
- logits-SAM against DPO: the chunked head's extra over DPO is its bf16 eps direction (V x d x 2 bytes).
- the TRL trainers: their live reference model's parameters are counted, and TRL's fused head step grows as the
  allocator counts.

Every step here is a 2-layer Llama (V=4096, d=128, 4 pairs of 64 tokens): about a second each.
"""

import json

import pytest
import torch

from logitsam.simulate import DEFAULT_MODELS, MODELS
from logitsam.simulate.report import budget
from logitsam.simulate.shapes import SHAPES, model_config
from logitsam.simulate.step import Batch, simulate_step

BATCH = Batch(pairs=4, seq_len=64)
TINY = model_config("tiny-llama")


def _step(**kwargs):
    kwargs = {"rho": 0.0, "chunk_size": None, "batch": BATCH, **kwargs}
    return simulate_step(TINY, **kwargs)


@pytest.mark.parametrize("precision,bytes_per_param", [("bf16-autocast", 4), ("bf16", 2)])
def test_parameters_gradients_and_adamw_are_the_analytic_bytes(precision, bytes_per_param):
    r = _step(precision=precision, rho=1e-3, chunk_size=32)
    N, k = r["num_params"], r["num_param_tensors"]
    layer = 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256 + 2 * 128  # q, o; k, v (2 of 4 heads); MLP; 2 norms
    assert N == 2 * 4096 * 128 + 2 * layer + 128  # embedding, head, layers, final norm
    after = r["after_backward"]
    assert after["params"] == N * bytes_per_param
    assert after["grads"] == N * bytes_per_param
    assert after["optimizer"] == 2 * N * bytes_per_param + 4 * k  # exp_avg, exp_avg_sq + float32 step counts
    b = budget(TINY, num_params=N, num_param_tensors=k, precision=precision, batch=BATCH, world_size=0,
               chunk_size=32)
    assert (b["params"], b["grads"], b["optimizer"]) == (after["params"], after["grads"], after["optimizer"])


def _allocator_growth(prof) -> int:
    """Peak of the CPU allocator's live bytes over the profiled region, from its first allocation on."""
    live = peak = 0
    for event in prof.profiler.kineto_results.events():  # in the order the allocator reported them
        if event.name() == "[memory]":
            live += event.nbytes()
            peak = max(peak, live)
    return peak


@pytest.mark.parametrize("rho,chunk_size", [(0.0, None), (1e-3, None), (0.0, 32), (1e-3, 32)])
def test_simulated_step_grows_as_much_as_a_real_one(rho, chunk_size):
    """The fake step's growth over its resting state is what the CPU allocator counts for the same step on real
    tensors, to 1 % (0.1-0.2 % measured). Without ``step.KernelScratch`` the dense head's would be 17 % short
    (logsumexp's scratch buffer)."""
    fake = _step(rho=rho, chunk_size=chunk_size)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    real = _step(rho=rho, chunk_size=chunk_size, fake=False, around_step=prof)
    grows = fake["peak"]["peak"] - fake["rest"]["peak"]
    assert grows == pytest.approx(_allocator_growth(prof), rel=0.01)
    assert fake["peak_phase"] == real["peak_phase"]


def test_chunked_logits_sam_adds_its_bf16_eps_over_dpo():
    """At this shape both steps peak inside the head's backward, where the perturbed pass needs eps: logits-SAM's
    chunked head adds just its eps direction, V x d in bf16 (and a few float32 scales), over DPO."""
    dpo, sam = _step(chunk_size=32), _step(rho=1e-3, chunk_size=32)
    assert sam["peak_phase"] == dpo["peak_phase"] == "backward"
    V, d = TINY.vocab_size, TINY.hidden_size
    assert sam["peak"]["peak"] - dpo["peak"]["peak"] == pytest.approx(V * d * 2, rel=0.01)


def test_fsdp2_ranks_hold_a_world_share_of_parameters_and_adamw():
    single, sharded = _step(), _step(world_size=2)
    N = single["num_params"]
    rest = sharded["rest"]["raw"]
    assert rest["Sharded Param"] == pytest.approx(N * 4 / 2, rel=0.01)  # dim-0 shards, padded to a multiple of 2
    assert sharded["rest"]["optimizer"] == pytest.approx(2 * N * 4 / 2, rel=0.01)
    assert sharded["after_backward"]["grads"] == pytest.approx(N * 4 / 2, rel=0.01)
    assert single["rest"]["params"] == N * 4


def test_shapes_have_the_published_parameter_counts():
    """Each config, built on the meta device, has its model card's parameter count (tied weights counted once)."""
    from transformers import AutoModelForCausalLM

    published = {"qwen2.5-7b": 7_615_616_512, "llama-3-8b": 8_030_261_248, "mistral-7b": 7_241_732_096,
                 "gemma-2-2b": 2_614_341_888, "pythia-2.8b": 2_775_208_960}
    assert set(MODELS) == set(SHAPES) and set(DEFAULT_MODELS) == set(published)
    for name, count in published.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config(name))
        assert sum(p.numel() for p in model.parameters()) == count, name


def test_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    from logitsam.cli import main

    out = tmp_path / "sim.json"
    main(["simulate", "--models", "tiny-llama", "--pairs", "2", "--seq_len", "32", "--head", "dense", "chunked",
          "--output", str(out)])
    printed = capsys.readouterr().out
    assert "### tiny-llama" in printed and "| bf16-autocast | chunked | logits-sam |" in printed
    result = json.loads(out.read_text())
    assert [(r["head"], r["loss"]) for r in result["rows"]] == [
        ("dense", "dpo"), ("dense", "logits-sam"), ("chunked", "dpo"), ("chunked", "logits-sam")]
    assert all(r["peak"]["peak"] > 0 for r in result["rows"])


# ---- the TRL trainers: LogitsSAMDPOTrainer and TRL's DPOTrainer, each with TRL's live reference model ----------


def test_trl_trainers_count_the_live_reference_model():
    """``ours`` reads precomputed reference log-probs: N parameters. Both TRL trainers keep TRL's default live
    reference model: 2 N parameters at rest, the same AdamW state and gradients (the reference has neither)."""
    steps = {t: _step(trainer=t, rho=1e-4, chunk_size=32) for t in ("ours", "trl-subclass", "trl")}
    N, k = steps["ours"]["num_params"], steps["ours"]["num_param_tensors"]
    for trainer, r in steps.items():
        live = trainer != "ours"
        assert r["ref_params"] == (N if live else 0)
        assert r["rest"]["params"] == (2 if live else 1) * N * 4, trainer
        assert r["rest"]["optimizer"] == 2 * N * 4 + 4 * k, trainer
        assert r["after_backward"]["grads"] == N * 4, trainer
        assert r["peak"]["peak"] > r["rest"]["peak"]
        b = budget(TINY, num_params=N, num_param_tensors=k, precision="bf16-autocast", batch=BATCH, world_size=0,
                   chunk_size=32, trainer=trainer)
        assert b["reference"] == (N * 4 if live else 0) and r["rest"]["params"] == b["params"] + b["reference"]
    for trainer in ("trl-subclass", "trl"):  # the reference's forward is a phase of its own, before the backward
        assert set(steps[trainer]["phases"]) == {"reference", "forward", "head", "backward", "optimizer"}


def test_trl_fused_head_step_grows_as_much_as_a_real_one():
    """TRL's fused head (its torch path on the CPU: tile buffer, fold temporaries, float32 gradient accumulators)
    and the live reference, whose bf16 weight copies autocast caches: the fake step grows as the allocator counts."""
    batch = Batch(pairs=2, seq_len=32)
    fake = _step(trainer="trl", batch=batch)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    _step(trainer="trl", batch=batch, fake=False, around_step=prof)
    assert fake["peak"]["peak"] - fake["rest"]["peak"] == pytest.approx(_allocator_growth(prof), rel=0.01)


def test_the_simulated_defaults_are_the_trainers_defaults():
    """step.SUBCLASS_DEFAULTS / TRL_LOSS copy LogitsSAMConfig's and DPOConfig's defaults (the simulate layer does
    not import logitsam.trl); report.subclass_chunk_size resolves "auto" as LogitsSAMDPOTrainer.step does."""
    import dataclasses

    from logitsam.simulate.report import subclass_chunk_size
    from logitsam.simulate.step import SUBCLASS_DEFAULTS, TRL_LOSS
    from logitsam.trl import LogitsSAMConfig

    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(LogitsSAMConfig)}
    assert {k: defaults[k] for k in SUBCLASS_DEFAULTS} == SUBCLASS_DEFAULTS
    assert defaults["loss_type"] == TRL_LOSS["loss_type"] and defaults["beta"] == TRL_LOSS["beta"]
    assert defaults["loss_weights"] is None and TRL_LOSS["loss_weights"] == [1.0]  # preference_loss_kwargs' default
    assert defaults["precompute_ref_log_probs"] is False  # TRL's default: a live reference model
    assert (defaults["per_device_train_batch_size"], defaults["max_length"]) == (Batch().pairs, Batch().seq_len)
    qwen = model_config("qwen2.5-7b")  # 2 x 8 x 1024 tokens x 152k vocabulary: 4.6 GiB of fp32 logits, chunked
    assert subclass_chunk_size("auto", qwen, Batch()) == 512
    assert subclass_chunk_size("auto", TINY, Batch(pairs=1, seq_len=64)) is None  # eval batch 8: 1024 x 4096 x 4


def test_cli_compares_the_trainers(tmp_path, capsys):
    from logitsam.cli import main

    out = tmp_path / "trl.json"
    main(["simulate", "--models", "tiny-llama", "--pairs", "2", "--seq_len", "32", "--head", "chunked",
          "--trainer", "all", "--output", str(out)])
    printed = capsys.readouterr().out
    assert "| trainer | precision | head | loss | reference |" in printed and "| trl | bf16-autocast |" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [(r["trainer"], r["loss"]) for r in rows] == [
        ("ours", "dpo"), ("ours", "logits-sam"), ("trl-subclass", "logits-sam"), ("trl", "dpo")]
    assert rows[-1]["extra_over_trl"] == 0 and all(r["extra_over_trl"] is not None for r in rows)
    assert [r["reference"] for r in rows] == ["precomputed", "precomputed", "live model", "live model"]
    with pytest.raises(SystemExit):
        main(["simulate", "--models", "tiny-llama", "--trainer", "trl", "--fsdp", "2"])

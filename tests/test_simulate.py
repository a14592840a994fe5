"""`logitsam simulate`: the simulated step's bytes against independent values.

- parameters, gradients and AdamW state: exactly the analytic N x bytes (``report.budget``);
- the whole step's growth over its resting state: the CPU allocator's own count on real tensors
  (``torch.profiler`` memory events, which also see what a kernel allocates for itself);
- FSDP2 on a fake process group: each rank holds 1 / world of the parameters and optimizer state;
- logits-SAM against DPO: the chunked head's extra over DPO is its bf16 eps direction (V x d x 2 bytes).

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

"""Squeezing and TRL-named metrics from HeadOutput, each against a dense softmax over full model logits."""

import math

import pytest
import torch
from conftest import make_tiny_llama

from logitsam.core import sequence_logps
from logitsam.diagnostics import dpo_metrics, logit_hessian_trace, squeeze_metrics
from logitsam.models import forward_hidden, lm_head_of

B, T, V = 3, 14, 97


def make_batch(seed=0):
    """2B rows, chosen first; a 4-token prompt, right padding, and one chosen row with no completion."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, V, (2 * B, T), generator=g)
    attention_mask = torch.ones(2 * B, T, dtype=torch.long)
    attention_mask[2, -5:] = 0
    attention_mask[4, -3:] = 0
    labels = torch.full((2 * B, T), -100)
    labels[:, 3:-1] = input_ids[:, 4:]  # shifted: position t predicts token t + 1, prompt = 4 tokens
    labels[attention_mask.roll(-1, 1) == 0] = -100
    labels[1] = -100  # empty chosen completion
    return input_ids, attention_mask, labels


def head_and_direct(model, input_ids, attention_mask, labels):
    """The HeadOutput under test, and per-token quantities from the model's own full logits (float64)."""
    with torch.no_grad():
        hidden = forward_hidden(model, input_ids, attention_mask)
        policy = sequence_logps(hidden, lm_head_of(model), labels)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()  # (2B, T, V)
    logp = logits.log_softmax(-1)
    p = logp.exp()
    mask = labels != -100
    direct = {
        "mask": mask,
        "logits": logits,
        "token_logp": logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1) * mask,
        "argmax_prob": p.max(-1).values,
        "argmax_logp": logp.max(-1).values,
        "entropy": -(p * logp).sum(-1),
        "top1": (logits.argmax(-1) == labels).double(),
        "hess": torch.stack([torch.diag(pv) - torch.outer(pv, pv) for pv in p.reshape(-1, V)])
        .diagonal(dim1=-2, dim2=-1).sum(-1).reshape(2 * B, T),  # tr(diag(p) - p p^T), densely
    }
    direct["logps"] = direct["token_logp"].sum(-1)
    return policy, direct


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_llama(vocab_size=V, seed=0)
    ref = make_tiny_llama(vocab_size=V, seed=1)
    batch = make_batch()
    policy, direct = head_and_direct(model, *batch)
    _, ref_direct = head_and_direct(ref, *batch)
    return policy, direct, ref_direct


def token_mean(values, mask, rows):
    return (values[rows] * mask[rows]).sum() / mask[rows].sum()


def test_squeeze_metrics_match_dense_softmax(setup):
    policy, d, ref_d = setup
    init = torch.randn(2 * B, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 5 - 40
    got = squeeze_metrics(policy, ref_d["logps"][:B], ref_d["logps"][B:], init[:B], init[B:])
    mask, lengths = d["mask"], d["mask"].sum(-1)
    for side, rows in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
        lp, n = d["logps"][rows], lengths[rows]
        has = n > 0
        assert got[f"squeeze/{side}_logps"] == pytest.approx(lp.mean().item(), rel=1e-5)
        assert got[f"squeeze/{side}_logps_per_token"] == pytest.approx((lp[has] / n[has]).mean().item(), rel=1e-5)
        assert got[f"squeeze/{side}_delta_ref"] == pytest.approx((lp - ref_d["logps"][rows]).mean().item(), rel=1e-5)
        assert got[f"squeeze/{side}_delta_init"] == pytest.approx((lp - init[rows]).mean().item(), rel=1e-5)
        for stat in ("argmax_prob", "argmax_logp", "entropy", "top1"):
            assert got[f"squeeze/{stat}_{side}"] == pytest.approx(token_mean(d[stat], mask, rows).item(), rel=1e-5)
    down = d["logps"] < ref_d["logps"]
    assert got["squeeze/displacement_rate"] == pytest.approx(down[:B].double().mean().item())
    assert got["squeeze/both_down_rate"] == pytest.approx((down[:B] & down[B:]).double().mean().item())
    assert got["squeeze/logit_hessian_trace"] == pytest.approx((d["hess"] * mask).sum(-1).mean().item(), rel=1e-5)
    # the empty chosen row is excluded from the per-token mean, not averaged in as 0
    assert got["squeeze/chosen_logps_per_token"] != pytest.approx((d["logps"][:B] / lengths[:B].clamp_min(1)).mean())


def test_rates_on_a_hand_made_pattern(setup):
    """Chosen logps vs ref: below, above, below; rejected: below, below, above.

    displacement_rate = 2/3 (pairs 0 and 2); both_down_rate = 1/3 (pair 0 only).
    """
    policy = setup[0]
    shift = torch.tensor([1.0, -1.0, 1.0])
    got = squeeze_metrics(policy, policy.logps[:B] + shift, policy.logps[B:] + torch.tensor([1.0, 1.0, -1.0]))
    assert got["squeeze/displacement_rate"] == pytest.approx(2 / 3)
    assert got["squeeze/both_down_rate"] == pytest.approx(1 / 3)
    assert got["squeeze/chosen_delta_ref"] == pytest.approx(-1 / 3)


def test_optional_keys_and_shapes(setup):
    policy = setup[0]
    got = squeeze_metrics(policy)
    assert not any("ref" in k or "init" in k or "rate" in k for k in got)
    no_stats = squeeze_metrics(sequence_logps_without_stats(policy))
    assert "squeeze/entropy_chosen" not in no_stats and "squeeze/chosen_logps" in no_stats
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        squeeze_metrics(policy, ref_chosen_logps=torch.zeros(B + 1))


def sequence_logps_without_stats(policy):
    out = policy.detach()
    for name in ("entropy", "argmax_prob", "top1", "sum_p2", "logits_sum", "argmax_logp"):
        setattr(out, name, None)
    return out


def test_logit_hessian_trace_per_row(setup):
    policy, d, _ = setup
    expected = (d["hess"] * d["mask"]).sum(-1)
    torch.testing.assert_close(logit_hessian_trace(policy).double(), expected, rtol=1e-5, atol=1e-5)
    assert logit_hessian_trace(policy)[1] == 0  # empty row


def test_dpo_metrics_match_trl_definitions(setup):
    """TRL: logits/chosen = logits[:B][loss_mask[:B]].mean(); entropy over all completion tokens;
    mean_token_accuracy over chosen tokens; rewards = beta * (policy - ref)."""
    policy, d, ref_d = setup
    beta = 0.1
    chosen_rewards = beta * (d["logps"][:B] - ref_d["logps"][:B])
    rejected_rewards = beta * (d["logps"][B:] - ref_d["logps"][B:])
    got = dpo_metrics(chosen_rewards.float(), rejected_rewards.float(), policy)
    mask, logits = d["mask"], d["logits"]
    expected = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": d["logps"][:B].mean(),
        "logps/rejected": d["logps"][B:].mean(),
        "logits/chosen": logits[:B][mask[:B]].mean(),
        "logits/rejected": logits[B:][mask[B:]].mean(),
        "entropy": d["entropy"][mask].mean(),
        "mean_token_accuracy": d["top1"][:B][mask[:B]].mean(),
    }
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key


def test_reward_accuracy_counts_ties_as_wrong(setup):
    policy = setup[0]
    got = dpo_metrics(torch.tensor([1.0, 0.5, -2.0]), torch.tensor([0.0, 0.5, -1.0]), policy)
    assert got["rewards/accuracies"] == pytest.approx(1 / 3)
    assert got["rewards/margins"] == pytest.approx((1.0 + 0.0 - 1.0) / 3)
    assert math.isfinite(got["logits/chosen"])

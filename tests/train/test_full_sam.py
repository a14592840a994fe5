"""Full SAM through the trainer against the in-place definition, under gradient accumulation."""

import pytest
import torch
from test_trainer import config, final_weights

from logitsam.train.run import run_training
from logitsam.train.trainer import PreferenceTrainer


@pytest.mark.parametrize("variant", ["plain", "asam"])
def test_full_sam_under_accumulation_matches_in_place_definition(tiny_model_dir, pairs_file, tmp_path, cache,
                                                                 monkeypatch, variant):
    """One SGD step of batch 2 x accumulation 2: w - lr * mean_i grad L_i(w + eps_i), each eps_i from micro-batch i.

    The definition perturbs the model's weights in place, recomputes, and restores (davda54/sam's shape)."""
    captured = []
    orig = PreferenceTrainer.training_step

    def capture(self, model, inputs, num_items_in_batch=None):
        captured.append((self, {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}))
        return orig(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(PreferenceTrainer, "training_step", capture)
    lr, rho = 0.5, 0.05
    out = tmp_path / "run"
    run_training(config(tiny_model_dir, pairs_file, out, cache, sam="full", sam_rho=rho, sam_variant=variant,
                        max_steps=1, optim="sgd", learning_rate=lr, max_grad_norm=0, eval_size=0,
                        per_device_train_batch_size=2, gradient_accumulation_steps=2))
    assert len(captured) == 2
    trainer = captured[0][0]
    model = trainer.model
    initial = {k: v.clone() for k, v in final_weights(tiny_model_dir).items()}
    model.load_state_dict(initial, strict=False)
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    trainer._record = False
    for _, inputs in captured:
        model.zero_grad()
        trainer.compute_loss(model, inputs).backward()
        grads = [p.grad.clone() for p in params]
        scaled = grads if variant == "plain" else [p.detach().abs() * g for p, g in zip(params, grads, strict=True)]
        norm = torch.sqrt(sum(s.square().sum() for s in scaled))
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, scaled, strict=True):
                p.add_(rho * (s if variant == "plain" else s * p.abs()) / norm)
        model.zero_grad()
        trainer.compute_loss(model, inputs).backward()
        for t, p in zip(total, params, strict=True):
            t += p.grad / 2  # the trainer divides each micro-batch's loss by the accumulation steps
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    expected = {n: (p.detach() - lr * t) for (n, p), t in zip(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad], total, strict=True)}
    trained = final_weights(out)
    moved = 0
    for n, value in expected.items():
        torch.testing.assert_close(trained[n], value, atol=1e-6, rtol=1e-5, msg=n)
        moved += int(not torch.equal(trained[n], initial[n]))
    assert moved > 0

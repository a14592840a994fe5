"""Softmax regression with fixed features: the model behind the paper's §3 (Luo et al., ICLR 2026).

Logits z = W phi, p = softmax(z), residual g = p - e_y, logit Hessian H_z = diag(p) - p p^T.
Everything here is float64 and one example at a time: ``weight (V, d)``, ``phi (d,)``, ``p (V,)``.

The *actual* steps (``sam_step``) differentiate the losses with autograd; the *predicted* quantities
(``predicted_residual``, ``modal_factors``, ``param_hessian_kron``) are the paper's closed forms.
The checks in ``theory/checks.py`` compare the two, so neither is derived from the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPE = torch.float64

LossFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Problem:
    """One softmax-regression example with a peaked, "pretrained" weight.

    weight (V, d), phi (d,); ``dominant`` is y* (the argmax, a wrong class), ``chosen`` y+ and
    ``rejected`` y-; the three labels are distinct.
    """

    weight: torch.Tensor
    phi: torch.Tensor
    dominant: int
    chosen: int
    rejected: int

    @property
    def mu(self) -> float:
        """mu = ||phi||^2."""
        return float(self.phi @ self.phi)


def make_problem(
    seed: int,
    *,
    num_classes: int = 10,
    dim: int = 8,
    weight_scale: float = 0.5,
    feature_norm: float = 1.5,
    warmup_steps: int = 5,
    warmup_lr: float = 1.0,
) -> Problem:
    """A random example made peaked the way pretraining does it: a few GD steps on CE(y*).

    W0 ~ weight_scale * N(0, 1), phi uniform on the sphere of radius ``feature_norm`` (so mu != 1 and a
    misplaced mu shows up), then ``warmup_steps`` GD steps of rate ``warmup_lr`` towards a random y*.
    With ``warmup_steps=0`` the peak comes from the scale of W0 alone and y* is its argmax.
    """
    gen = torch.Generator().manual_seed(seed)
    weight = weight_scale * torch.randn(num_classes, dim, generator=gen, dtype=DTYPE)
    phi = torch.randn(dim, generator=gen, dtype=DTYPE)
    phi = feature_norm * phi / phi.norm()
    order = torch.randperm(num_classes, generator=gen).tolist()
    if warmup_steps == 0:
        argmax = int(probs(weight, phi).argmax())
        order = [argmax] + [c for c in order if c != argmax]
    dominant, chosen, rejected = order[:3]
    for _ in range(warmup_steps):
        weight = sam_step(lambda w: ce_loss(w, phi, dominant), weight, lr=warmup_lr, rho=0.0)
    assert int(probs(weight, phi).argmax()) == dominant, "warm-up did not make y* the argmax"
    return Problem(weight, phi, dominant, chosen, rejected)


def probs(weight: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """p = softmax(W phi), (V,)."""
    return torch.softmax(weight @ phi, dim=-1)


def residual(weight: torch.Tensor, phi: torch.Tensor, label: int) -> torch.Tensor:
    """g = p - e_y, (V,): the gradient of CE(y) with respect to the logits."""
    p = probs(weight, phi)
    return p - F.one_hot(torch.tensor(label), p.numel()).to(p.dtype)


def logit_hessian(p: torch.Tensor) -> torch.Tensor:
    """H_z = diag(p) - p p^T, (V, V): the Hessian of CE with respect to the logits (any label)."""
    return torch.diag(p) - torch.outer(p, p)


def vec(weight: torch.Tensor) -> torch.Tensor:
    """Column-stacking vec (the convention of Prop 3.1): vec(W)[j V + i] = W[i, j], (V d,)."""
    return weight.T.reshape(-1)


def unvec(flat: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse of ``vec``: (V d,) -> (V, d)."""
    return flat.reshape(-1, num_classes).T


def param_hessian_kron(phi: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Prop 3.1: d^2 CE / d vec(W)^2 = (phi phi^T) (x) H_z, (V d, V d), for column-stacking vec."""
    return torch.kron(torch.outer(phi, phi), logit_hessian(p))


def ce_loss(weight: torch.Tensor, phi: torch.Tensor, label: int) -> torch.Tensor:
    """CE(y) = -log softmax(W phi)[y], a scalar."""
    return -torch.log_softmax(weight @ phi, dim=-1)[label]


def dpo_loss(
    weight: torch.Tensor,
    ref_weight: torch.Tensor,
    phi: torch.Tensor,
    chosen: int,
    rejected: int,
    beta: float,
) -> torch.Tensor:
    """DPO on one pair that shares its features phi (the DPO-coupled variant), a scalar.

    L = -log sigmoid(beta * ((log p(y+) - log p_ref(y+)) - (log p(y-) - log p_ref(y-)))),
    with p = softmax(W phi) and p_ref = softmax(W_ref phi); W_ref gets no gradient.
    """
    logps = torch.log_softmax(weight @ phi, dim=-1)
    ref_logps = torch.log_softmax(ref_weight.detach() @ phi, dim=-1)
    margin = (logps[chosen] - ref_logps[chosen]) - (logps[rejected] - ref_logps[rejected])
    return -F.logsigmoid(beta * margin)


def loss_grad(loss_fn: LossFn, weight: torch.Tensor) -> torch.Tensor:
    """d loss_fn / d weight by autograd, same shape as weight."""
    weight = weight.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(weight), weight)
    return grad


def sam_step(loss_fn: LossFn, weight: torch.Tensor, lr: float, rho: float) -> torch.Tensor:
    """One SAM step: W' = W - lr * grad L(W + rho * grad L(W) / ||grad L(W)||_F).

    lr and rho may take either sign; rho = 0 is exactly plain gradient descent.
    """
    grad = loss_grad(loss_fn, weight)
    if rho != 0.0:
        grad = loss_grad(loss_fn, weight + rho * grad / grad.norm())
    return weight - lr * grad


def rho_tilde(rho: float, mu: float, g: torch.Tensor) -> float:
    """The logit-space radius of Thm 3.2: rho~ = rho sqrt(mu) / ||g||."""
    return rho * math.sqrt(mu) / float(g.norm())


def predicted_residual(g: torch.Tensor, p: torch.Tensor, mu: float, lr: float, rho: float) -> torch.Tensor:
    """Thm 3.2: g' = (I - lr mu H_z - lr mu rho~ H_z^2) g, dropping the O(lr^2 + |lr| rho^2) terms, (V,)."""
    hessian = logit_hessian(p)
    hg = hessian @ g
    return g - lr * mu * hg - lr * mu * rho_tilde(rho, mu, g) * (hessian @ hg)


def modal_factors(lambdas: torch.Tensor, mu: float, lr: float, rho_t: float) -> torch.Tensor:
    """Cor 3.4: e_k' / e_k = 1 - lr mu (lambda_k + rho~ lambda_k^2), same shape as lambdas."""
    return 1.0 - lr * mu * (lambdas + rho_t * lambdas**2)


def modes(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of H_z: lambdas (V,) ascending and eigenvectors v_k as columns (V, V)."""
    return torch.linalg.eigh(logit_hessian(p))

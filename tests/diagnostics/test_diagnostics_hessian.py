"""Hutchinson's trace estimator on functions with known Hessians; the closed-form logit-Hessian trace."""

import math

import pytest
import torch

from logitsam.core import dense_head_logps
from logitsam.diagnostics import hutchinson_trace, logit_hessian_trace


def spd_matrix(d, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g, dtype=torch.float64)
    return M @ M.T / d + torch.diag(torch.rand(d, generator=g, dtype=torch.float64) * 3)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_quadratic_trace_within_stderr(distribution):
    """0.5 x^T A x has Hessian A everywhere, so the estimate is unbiased for tr(A)."""
    A = spd_matrix(12, seed=0)
    x = torch.randn(12, dtype=torch.float64, requires_grad=True)
    mean, stderr = hutchinson_trace(lambda: 0.5 * x @ A @ x, [x], num_probes=2000, seed=1,
                                    distribution=distribution)
    assert 0 < stderr < 0.05 * A.trace().item()
    assert abs(mean - A.trace().item()) < 4 * stderr
    # the sample variance matches theory: 2 sum_{i != j} A_ij^2 (+ 2 sum_i A_ii^2 for Gaussian probes)
    off = 2 * (A.square().sum() - A.diagonal().square().sum()).item()
    var = off + (2 * A.diagonal().square().sum().item() if distribution == "gaussian" else 0)
    assert stderr == pytest.approx(math.sqrt(var / 2000), rel=0.15)


def test_joint_trace_over_several_params():
    """z = [x; y], loss 0.5 z^T A z: the trace covers both blocks once, cross terms contribute nothing."""
    A = spd_matrix(7, seed=2)
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)

    def loss():
        z = torch.cat([x, y.reshape(-1)])
        return 0.5 * z @ A @ z

    mean, stderr = hutchinson_trace(loss, [x, y], num_probes=3000, seed=0)
    assert abs(mean - A.trace().item()) < 4 * stderr


def test_rademacher_is_exact_for_a_diagonal_hessian():
    """sum_i sin(x_i) has H = diag(-sin x): v^T H v = sum_i v_i^2 H_ii = tr(H) for every +-1 probe."""
    x = torch.linspace(-2, 3, 9, dtype=torch.float64, requires_grad=True)
    mean, stderr = hutchinson_trace(lambda: x.sin().sum(), [x], num_probes=5, seed=0)
    assert mean == pytest.approx(-x.detach().sin().sum().item(), abs=1e-12)
    assert stderr == pytest.approx(0.0, abs=1e-12)


def test_seeded_and_validated():
    A = spd_matrix(5, seed=3)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    first = hutchinson_trace(lambda: 0.5 * x @ A @ x, [x], num_probes=10, seed=7)
    assert first == hutchinson_trace(lambda: 0.5 * x @ A @ x, [x], num_probes=10, seed=7)
    assert first != hutchinson_trace(lambda: 0.5 * x @ A @ x, [x], num_probes=10, seed=8)
    with pytest.raises(ValueError, match="distribution"):
        hutchinson_trace(lambda: x.sum(), [x], distribution="uniform")
    with pytest.raises(ValueError, match="scalar"):
        hutchinson_trace(lambda: x * 2, [x])


def test_logit_hessian_trace_is_trace_of_cross_entropy_hessian():
    """For each completion token, autograd's Hessian of -log softmax(z)[y] w.r.t. z is diag(p) - p p^T;
    its trace summed over the row equals lengths - sum_p2."""
    g = torch.Generator().manual_seed(0)
    R, T, d, V = 3, 5, 4, 11
    hidden = torch.randn(R, T, d, generator=g, dtype=torch.float64)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (R, T), generator=g)
    labels[:, :2] = -100
    labels[2] = -100
    out = dense_head_logps(hidden, weight, None, labels)
    expected = torch.zeros(R, dtype=torch.float64)
    for r in range(R):
        for t in range(T):
            if labels[r, t] == -100:
                continue
            z = hidden[r, t] @ weight.T
            H = torch.autograd.functional.hessian(lambda z, y=labels[r, t]: -z.log_softmax(-1)[y], z)
            p = z.softmax(-1)
            torch.testing.assert_close(H, torch.diag(p) - torch.outer(p, p))
            expected[r] += H.trace()
    torch.testing.assert_close(logit_hessian_trace(out), expected)
    assert expected[0] > 0 and expected[2] == 0

"""Exact mode: matrix-free CG against a dense solve built from the same curvature vectors."""

import numpy as np
import pytest
import torch

from chips_core.scoring.curvature import curvature_vectors, sample_negatives
from chips_core.scoring.endpoint import EndpointParams, batch_grad_sum, batch_state, grads_from_state
from chips_core.scoring.exact import ExactSystem, exact_scores
from chips_core.scoring.sketch import FullSpace

pytestmark = pytest.mark.unit


def _setup(D=4, d_v=5, d_t=3, N=12, seed=0, theta=2.0):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    params = EndpointParams(
        torch.randn(D, d_v + 1, generator=g, dtype=f64),
        torch.randn(D, d_t, generator=g, dtype=f64),
        torch.tensor(theta, dtype=f64),
        True,
    )
    h = torch.randn(N, d_v, generator=g, dtype=f64)
    t = torch.randn(N, d_t, generator=g, dtype=f64)
    return params, h, t


@pytest.mark.parametrize("alpha", [0.0, 0.7, 1.0])
def test_cg_matches_dense_solve(alpha):
    params, h, t = _setup()
    states = [(0, batch_state(h[:6], t[:6], params)), (1, batch_state(h[6:], t[6:], params))]
    K, seed, lam = 3, 11, 0.05
    full = FullSpace.for_params(params, 0)
    pos = np.zeros((params.p, params.p))
    neg = np.zeros_like(pos)
    for b, st in states:
        Zp, wp, Zn, wn = curvature_vectors(full, st, sample_negatives(st, K, seed, b))
        pos += ((Zp * wp[:, None]).T @ Zp).numpy()
        neg += ((Zn * wn[:, None]).T @ Zn).numpy()
    M = ((1 - alpha) * pos + alpha * neg) / 12 + lam * np.eye(params.p)
    gh, gt_ = _setup(N=8, seed=5)[1:]
    u = batch_grad_sum(gh, gt_, params).flat()[0] / 8
    system = ExactSystem(params, states, alpha, lam, K=K, seed=seed)
    v = torch.randn(params.p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert np.allclose(system.matvec(v).numpy(), M @ v.numpy(), rtol=1e-10, atol=1e-12)
    x, info = system.solve(u)
    ref = np.linalg.solve(M, u.numpy())
    assert np.linalg.norm(x.numpy() - ref) / np.linalg.norm(ref) < 1e-8
    assert info.rel_residual < 1e-10 and info.iterations <= params.p + 5


@pytest.mark.parametrize("negatives", ["all", "self"])
def test_exact_scores_are_gradient_dot_x(negatives):
    params, h, t = _setup(N=7)
    st = batch_state(h, t, params)
    x = torch.randn(params.p, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = grads_from_state(st, negatives).flat() @ x
    torch.testing.assert_close(exact_scores(st, x, params, negatives), ref, rtol=1e-10, atol=1e-12)


def test_bad_arguments():
    params, h, t = _setup()
    with pytest.raises(ValueError, match="lambda"):
        ExactSystem(params, [(0, batch_state(h, t, params))], 0.5, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        ExactSystem(params, [], 0.5, 1.0)

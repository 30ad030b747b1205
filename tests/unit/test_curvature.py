"""Curvature: Φ_pos + Φ_neg is InfoNCE's Gauss–Newton matrix; sampled Φ_neg is unbiased; λ* and the solve."""

import numpy as np
import pytest
import torch

from chips_core.scoring.curvature import (
    CurvatureAccumulator,
    combine,
    curvature_vectors,
    effective_dimension,
    eigenvalues,
    lambda_star,
    negative_vectors_all,
    newton_solve,
    sample_negatives,
)
from chips_core.scoring.endpoint import EndpointParams, batch_state
from chips_core.scoring.sketch import FullSpace, KroneckerSketch

pytestmark = pytest.mark.unit


def _setup(D=4, d_v=5, d_t=3, B=6, theta=2.0, seed=0, v_bias=True):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    params = EndpointParams(
        torch.randn(D, d_v + v_bias, generator=g, dtype=f64),
        torch.randn(D, d_t, generator=g, dtype=f64),
        torch.tensor(theta, dtype=f64),
        v_bias,
    )
    h = torch.randn(B, d_v, generator=g, dtype=f64)
    t = torch.randn(B, d_t, generator=g, dtype=f64)
    return params, h, t


def _gram(Z, w):
    return ((Z * w[:, None]).T @ Z).numpy()


def test_pos_plus_neg_is_gauss_newton():
    params, h, t = _setup()
    st = batch_state(h, t, params)
    full = FullSpace.for_params(params, 0)
    Z_pos, w_pos, _, _ = curvature_vectors(full, st, sample_negatives(st, 2, 0, 0))
    Z_neg, w_neg = negative_vectors_all(full, st)
    ours = _gram(Z_pos, w_pos) + _gram(Z_neg, w_neg)

    def logits(W_v, W_t, th):
        return batch_state(h, t, EndpointParams(W_v, W_t, th, True)).S.reshape(-1)

    Js = torch.func.jacrev(logits, argnums=(0, 1, 2))(params.W_v, params.W_t, params.logit_scale)
    J = torch.cat([Js[0].reshape(36, -1), Js[1].reshape(36, -1), Js[2].reshape(36, 1)], dim=1)

    def loss_of_logits(S):
        S = S.reshape(6, 6)
        d = S.diagonal()
        return (0.5 * (torch.logsumexp(S, 1) - d) + 0.5 * (torch.logsumexp(S, 0) - d)).sum()

    Hs = torch.func.hessian(loss_of_logits)(batch_state(h, t, params).S.reshape(-1))
    gn = (J.T @ Hs @ J).numpy()
    assert np.linalg.norm(ours - gn) / np.linalg.norm(gn) < 1e-10
    # the positive part alone is not the whole matrix
    assert np.linalg.norm(_gram(Z_pos, w_pos) - gn) / np.linalg.norm(gn) > 1e-2


def test_sampled_negative_curvature_is_unbiased():
    params, h, t = _setup(B=5, theta=1.5)
    st = batch_state(h, t, params)
    sk = KroneckerSketch.for_params(params, 6, seed=3)
    exact = _gram(*negative_vectors_all(sk, st))
    est = []
    for rep in range(400):
        _, _, Z_neg, w_neg = curvature_vectors(sk, st, sample_negatives(st, 4, seed=rep, batch_no=0))
        est.append(_gram(Z_neg, w_neg))
    est = np.stack(est)
    se = est.std(0, ddof=1) / np.sqrt(len(est))
    z = np.abs(est.mean(0) - exact) / se
    assert z.max() < 5.0
    assert z.mean() < 1.5
    # sampling is deterministic in (seed, batch_no) and differs across batches
    a = sample_negatives(st, 4, 7, 1)
    assert torch.equal(a.row_j, sample_negatives(st, 4, 7, 1).row_j)
    assert not torch.equal(a.row_j, sample_negatives(st, 4, 7, 2).row_j)
    assert bool((a.row_j != torch.arange(5)[:, None]).all()) and bool(
        (a.col_a != torch.arange(5)[:, None]).all()
    )


def test_accumulator_averages_and_merges():
    params, h, t = _setup(B=8)
    sk = KroneckerSketch.for_params(params, 10, seed=1)
    acc = CurvatureAccumulator(10, K=3, seed=4)
    acc.add(sk, batch_state(h[:4], t[:4], params), 0)
    acc.add(sk, batch_state(h[4:], t[4:], params), 1)
    pos, neg = acc.result()
    assert acc.n == 8 and np.allclose(pos, pos.T) and np.allclose(neg, neg.T)
    assert eigenvalues(pos).min() >= 0 and eigenvalues(neg).min() >= 0
    other = CurvatureAccumulator(10, K=3, seed=4)
    other.merge(acc.pos, acc.neg, acc.n)
    assert np.allclose(other.result()[0], pos)
    assert np.allclose(combine(pos, neg, 0.0), pos) and np.allclose(combine(pos, neg, 1.0), neg)
    with pytest.raises(ValueError, match="alpha"):
        combine(pos, neg, 1.5)


def test_lambda_star_and_solve():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((40, 40))
    C = A @ A.T / 40
    eigs = eigenvalues(C)
    lam = lambda_star(eigs, 10.0)
    assert abs(effective_dimension(eigs, lam) - 10.0) < 1e-6
    assert effective_dimension(eigs, lam * 10) < 10 < effective_dimension(eigs, lam / 10)
    u = rng.standard_normal(40)
    x = newton_solve(C, u, lam)
    assert np.allclose((C + lam * np.eye(40)) @ x, u)
    # rank-deficient curvature that cannot reach the target gives the smallest bracket end
    low = eigenvalues(np.diag([1.0, 2.0] + [0.0] * 38))
    assert lambda_star(low, 10.0) == pytest.approx(2e-12)
    with pytest.raises(ValueError, match="positive"):
        newton_solve(C, u, 0.0)

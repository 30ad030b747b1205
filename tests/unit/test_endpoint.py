"""Closed-form endpoint gradients against autograd (float64, METHOD.md §2–3)."""

import pytest
import torch

from chips_core.scoring.endpoint import (
    EndpointParams,
    augment,
    batch_grad_sum,
    per_sample_grads,
    per_sample_losses,
    zeroshot_grad_sum,
    zeroshot_losses,
)

pytestmark = pytest.mark.unit


def _params(D=5, d_v=7, d_t=6, theta=2.0, v_bias=False, t_bias=False, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return EndpointParams(
        torch.randn(D, d_v + v_bias, generator=g, dtype=dtype),
        torch.randn(D, d_t + t_bias, generator=g, dtype=dtype),
        torch.tensor(theta, dtype=dtype),
        v_bias,
        t_bias,
    )


def _feats(B=9, d_v=7, d_t=6, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d_v, generator=g, dtype=dtype), torch.randn(B, d_t, generator=g, dtype=dtype)


def _jac(fn, params):
    """Jacobian (rows, p) of fn(W_v, W_t, theta) by torch.func.jacrev, flattened like EndpointGrads.flat."""
    J = torch.func.jacrev(fn, argnums=(0, 1, 2))(params.W_v, params.W_t, params.logit_scale)
    n = J[2].shape[0]
    return torch.cat([J[0].reshape(n, -1), J[1].reshape(n, -1), J[2].reshape(n, 1)], dim=1)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _jac_losses(h, t, params):
    def fn(W_v, W_t, th):
        return per_sample_losses(h, t, EndpointParams(W_v, W_t, th, params.v_bias, params.t_bias))

    return _jac(fn, params)


@pytest.mark.parametrize("v_bias,t_bias", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("theta", [2.0, 4.6])
def test_all_negatives_matches_jacrev(v_bias, t_bias, theta):
    params = _params(theta=theta, v_bias=v_bias, t_bias=t_bias)
    h, t = _feats()
    ref = _jac_losses(h, t, params)
    got = per_sample_grads(h, t, params).flat()
    assert got.shape == (9, params.p)
    assert _rel(got, ref) < 1e-8


def test_confident_batch_keeps_small_gradients():
    # large logit scale and well-aligned pairs: P_ii ≈ 1 - 1e-30, where 1 - P_ii would round to 0
    D = 6
    g = torch.Generator().manual_seed(3)
    W = torch.eye(D, dtype=torch.float64)
    h = torch.randn(8, D, generator=g, dtype=torch.float64)
    t = h + 0.01 * torch.randn(8, D, generator=g, dtype=torch.float64)
    params = EndpointParams(W, W.clone(), torch.tensor(5.5, dtype=torch.float64))
    ref = _jac_losses(h, t, params)
    got = per_sample_grads(h, t, params).flat()
    assert float(ref.norm()) > 0
    assert _rel(got, ref) < 1e-8

    # the textbook form LSE_j S_ij − S_ii loses these gradients entirely: this batch is where rounding bites
    def naive(W_v, W_t, th):
        S = th.exp() * torch.nn.functional.normalize(h @ W_v.T) @ torch.nn.functional.normalize(t @ W_t.T).T
        d = S.diagonal()
        return 0.5 * (torch.logsumexp(S, 1) - d) + 0.5 * (torch.logsumexp(S, 0) - d)

    assert _rel(_jac(naive, params), ref) > 1e-3
    # the per-row error is small relative to each row too, not only overall
    row_err = (got - ref).norm(dim=1) / ref.norm(dim=1)
    assert float(row_err.max()) < 1e-6


def test_self_only_keeps_rank_one_terms():
    params = _params(v_bias=True)
    h, t = _feats()
    full = per_sample_grads(h, t, params, "all")
    selfo = per_sample_grads(h, t, params, "self")
    torch.testing.assert_close(selfo.g_theta, full.g_theta)
    # each self-only block is rank one: r_i h_iᵀ
    H = augment(h, True)
    for i in range(3):
        assert torch.linalg.matrix_rank(selfo.G_v[i]) == 1
        u = selfo.G_v[i] @ H[i] / (H[i] @ H[i])
        torch.testing.assert_close(torch.outer(u, H[i]), selfo.G_v[i])
    assert not torch.allclose(selfo.G_v, full.G_v)
    # the self-only part equals the all-negatives gradient with Q's off-diagonal frozen to zero:
    # differentiating only through S_ii and row/col i of the softmaxes is what "negatives frozen" means.


def test_batch_sum_matches_autograd_and_per_sample_sum():
    params = _params(t_bias=True)
    h, t = _feats(B=11)

    def fn(W_v, W_t, th):
        return per_sample_losses(h, t, EndpointParams(W_v, W_t, th, params.v_bias, params.t_bias)).sum()[None]

    ref = _jac(fn, params)
    got = batch_grad_sum(h, t, params).flat()
    assert _rel(got, ref) < 1e-10
    assert _rel(per_sample_grads(h, t, params).flat().sum(0, keepdim=True), ref) < 1e-10


@pytest.mark.parametrize("v_bias", [False, True])
def test_zeroshot_gradient_matches_autograd(v_bias):
    params = _params(v_bias=v_bias, theta=3.0)
    h, _ = _feats(B=10)
    g = torch.Generator().manual_seed(5)
    class_t = torch.randn(4, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (10,), generator=g)

    def fn(W_v, W_t, th):
        return zeroshot_losses(h, labels, class_t, EndpointParams(W_v, W_t, th, v_bias, False)).sum()[None]

    ref = _jac(fn, params)
    got = zeroshot_grad_sum(h, labels, class_t, params).flat()
    assert _rel(got, ref) < 1e-10


def test_bad_inputs_are_named():
    params = _params()
    h, t = _feats()
    with pytest.raises(ValueError, match="do not match the endpoint"):
        per_sample_grads(h[:, :5], t, params)
    with pytest.raises(ValueError, match="at least 2"):
        per_sample_grads(h[:1], t[:1], params)
    with pytest.raises(TypeError, match="float32 or float64"):
        per_sample_grads(h, t, params.to(dtype=torch.float16))
    with pytest.raises(ValueError, match="negatives"):
        per_sample_grads(h, t, params, negatives="some")


def test_p_and_to():
    params = _params(D=4, d_v=3, d_t=2, v_bias=True)
    assert params.p == 4 * 4 + 4 * 2 + 1
    p32 = params.to(dtype=torch.float32)
    assert p32.W_v.dtype == torch.float32 and p32.logit_scale.ndim == 0 and p32.v_bias
    assert p32.d_v == 3 and p32.d_t == 2


def test_logit_grads_and_weighted_sums_match_autograd():
    from chips_core.scoring.endpoint import batch_state, logit_grads, weighted_logit_sum

    params = _params(v_bias=True, theta=2.5)
    h, t = _feats(B=6)

    def logits(W_v, W_t, th):
        pr = EndpointParams(W_v, W_t, th, True, False)
        return batch_state(h, t, pr).S.reshape(-1)

    J = _jac(logits, params)  # (B*B, p), row a*B+b = ∇S_ab
    st = batch_state(h, t, params)
    a = torch.tensor([0, 2, 5, 3])
    b = torch.tensor([0, 4, 1, 3])
    assert _rel(logit_grads(st, a, b).flat(), J[a * 6 + b]) < 1e-12
    W = torch.rand(6, 6, dtype=torch.float64)
    Jr = J.reshape(6, 6, -1)
    assert _rel(weighted_logit_sum(st, W, 1).flat(), torch.einsum("ij,ijp->ip", W, Jr)) < 1e-12
    assert _rel(weighted_logit_sum(st, W, 0).flat(), torch.einsum("ai,aip->ip", W, Jr)) < 1e-12
    # g_i = ½ Σ_b P_ib ∇S_ib + ½ Σ_a Q_ai ∇S_ai − ∇S_ii (METHOD.md §2)
    P = torch.softmax(st.S, 1)
    Q = torch.softmax(st.S, 0)
    g = 0.5 * weighted_logit_sum(st, P, 1).flat() + 0.5 * weighted_logit_sum(st, Q, 0).flat()
    g = g - J.reshape(6, 6, -1)[torch.arange(6), torch.arange(6)]
    assert _rel(per_sample_grads(h, t, params).flat(), g) < 1e-10


def test_directional_and_combination_match_full_space():
    from chips_core.scoring.endpoint import batch_state, logit_combination, logit_directional, logit_grads

    params = _params(v_bias=True, t_bias=True, theta=2.2)
    h, t = _feats(B=7)
    st = batch_state(h, t, params)
    B = 7
    a = torch.arange(B).repeat_interleave(B)
    b = torch.arange(B).repeat(B)
    J = logit_grads(st, a, b).flat()  # (B*B, p)
    g = torch.Generator().manual_seed(9)
    V = per_sample_grads(h, t, params)
    V.G_v, V.G_t, V.g_theta = (
        torch.randn(x[:1].shape, generator=g, dtype=torch.float64) for x in (V.G_v, V.G_t, V.g_theta)
    )
    dv, dt, dth = logit_directional(st, V)
    assert _rel((dv + dt + dth).reshape(-1), J @ V.flat()[0]) < 1e-12
    Gamma = torch.randn(B, B, generator=g, dtype=torch.float64)
    assert _rel(logit_combination(st, Gamma).flat()[0], Gamma.reshape(-1) @ J) < 1e-12

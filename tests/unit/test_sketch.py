"""Sketches: exact agreement with Π·(closed-form gradient), unbiased inner products, k-prefix property."""

import numpy as np
import pytest
import torch

from chips_core.scoring.endpoint import (
    EndpointParams,
    batch_state,
    grads_from_state,
    logit_grads,
    per_sample_losses,
    weighted_logit_sum,
)
from chips_core.scoring.sketch import DenseGaussianSketch, KroneckerSketch, make_sketch

pytestmark = pytest.mark.unit
KINDS = [DenseGaussianSketch, KroneckerSketch]


def _setup(D=5, d_v=7, d_t=6, B=9, v_bias=True, t_bias=False, seed=0, theta=2.0):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    params = EndpointParams(
        torch.randn(D, d_v + v_bias, generator=g, dtype=f64),
        torch.randn(D, d_t + t_bias, generator=g, dtype=f64),
        torch.tensor(theta, dtype=f64),
        v_bias,
        t_bias,
    )
    h = torch.randn(B, d_v, generator=g, dtype=f64)
    t = torch.randn(B, d_t, generator=g, dtype=f64)
    return params, batch_state(h, t, params)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _explicit_matrix(sk):
    """Π (k, p) written out row by row from the sketch's definition."""
    if isinstance(sk, DenseGaussianSketch):
        return sk.matrix(dtype=torch.float64)
    f = sk.factors(dtype=torch.float64)
    rows = [
        torch.cat(
            [
                torch.outer(f["A"][l], f["B"][l]).reshape(-1),
                torch.outer(f["A2"][l], f["C"][l]).reshape(-1),
                f["g"][l : l + 1],
            ]
        )
        for l in range(sk.k_max)
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("cls", KINDS)
@pytest.mark.parametrize("negatives", ["all", "self"])
@pytest.mark.parametrize("v_bias,t_bias", [(False, False), (True, True)])
def test_sketched_batch_grads_equal_projection_of_full(cls, negatives, v_bias, t_bias):
    params, st = _setup(v_bias=v_bias, t_bias=t_bias)
    sk = cls.for_params(params, 300, seed=1)
    Pi = _explicit_matrix(sk)
    assert Pi.shape == (300, params.p)
    full = grads_from_state(st, negatives).flat()
    assert _rel(sk.batch_grads(st, negatives), full @ Pi.T) < 1e-12


@pytest.mark.parametrize("cls", KINDS)
def test_sketched_logit_grads_and_sums(cls):
    params, st = _setup(theta=3.0)
    sk = cls.for_params(params, 100, seed=2)
    Pi = _explicit_matrix(sk)
    a = torch.tensor([0, 3, 2, 8, 4])
    b = torch.tensor([1, 3, 8, 8, 0])
    assert _rel(sk.logit_grads(st, a, b), logit_grads(st, a, b).flat() @ Pi.T) < 1e-12
    W = torch.rand(9, 9, dtype=torch.float64)
    assert _rel(sk.row_sum(st, W), weighted_logit_sum(st, W, 1).flat() @ Pi.T) < 1e-12
    assert _rel(sk.col_sum(st, W), weighted_logit_sum(st, W, 0).flat() @ Pi.T) < 1e-12


@pytest.mark.parametrize("cls", KINDS)
def test_prefix_of_k_max_is_fresh_sketch(cls):
    params, st = _setup()
    big = cls.for_params(params, 600, seed=5)
    small = cls.for_params(params, 300, seed=5)
    odd = cls.for_params(params, 77, seed=5)
    G = big.batch_grads(st)
    # the projections are bit-identical; products may differ in the last bit (BLAS blocking by size)
    assert torch.equal(_explicit_matrix(big)[:77], _explicit_matrix(odd))
    torch.testing.assert_close(G[:, :300], small.batch_grads(st), rtol=1e-13, atol=0)
    torch.testing.assert_close(G[:, :77], odd.batch_grads(st), rtol=1e-13, atol=0)
    other = cls.for_params(params, 300, seed=6).batch_grads(st)
    assert not torch.allclose(other, G[:, :300])


@pytest.mark.parametrize("cls", KINDS)
def test_inner_products_unbiased(cls):
    """E[(Πg)·(Πu)]/k = g·u: the mean over 300 seeds lies within 4 standard errors."""
    params, st = _setup(D=4, d_v=5, d_t=4, B=6)
    full = grads_from_state(st).flat()
    g, u = full[0], full[1:].mean(0)
    k = 32
    est = []
    for seed in range(300):
        sk = cls.for_params(params, k, seed=seed)
        gs = sk.batch_grads(st)
        est.append(float(gs[0] @ gs[1:].mean(0)) / k)
    est = np.array(est)
    se = est.std(ddof=1) / np.sqrt(len(est))
    assert abs(est.mean() - float(g @ u)) < 4 * se
    assert se > 0


def test_make_sketch_names():
    params, _ = _setup()
    assert isinstance(make_sketch("kronecker", params, 8), KroneckerSketch)
    with pytest.raises(ValueError, match="unknown sketch"):
        make_sketch("srht", params, 8)
    with pytest.raises(ValueError, match="k_max"):
        make_sketch("dense", params, 0)


@pytest.mark.parametrize("cls", KINDS)
@pytest.mark.parametrize(
    "blocks", [("visual", "text"), ("visual",), ("text", "temperature"), ("visual", "text", "temperature")]
)
def test_block_restricted_sketch_equals_projection_of_autograd_subspace_gradient(cls, blocks):
    """A sketch restricted to `blocks` gives Π·g_S, g_S the jacrev gradient over the scored blocks only
    (zeros elsewhere), for the sketched gradients, logit gradients and the row/column sums alike."""
    params, st = _setup(v_bias=True, theta=3.0)
    h, t = st.H[:, :-1], st.T  # the raw features (H carries the appended bias column)
    names = ("visual", "text", "temperature")
    tensors = (params.W_v, params.W_t, params.logit_scale)
    argnums = tuple(i for i, n in enumerate(names) if n in blocks)

    def losses(*scored):
        full = list(tensors)
        for i, x in zip(argnums, scored, strict=True):
            full[i] = x
        return per_sample_losses(h, t, EndpointParams(*full, params.v_bias, params.t_bias))

    J = torch.func.jacrev(losses, argnums=tuple(range(len(argnums))))(*(tensors[i] for i in argnums))
    parts = [torch.zeros(9, x.numel(), dtype=torch.float64) for x in tensors]
    for i, j in zip(argnums, J, strict=True):
        parts[i] = j.reshape(9, -1)
    g_S = torch.cat(parts, dim=1)
    Pi = _explicit_matrix(cls.for_params(params, 120, seed=4))  # the unrestricted Π, same seed
    sk = cls.for_params(params, 120, seed=4, blocks=blocks)
    assert sk.blocks == blocks
    assert _rel(sk.batch_grads(st), g_S @ Pi.T) < 1e-8
    a, b = torch.tensor([0, 2, 5]), torch.tensor([1, 2, 7])
    keep = torch.cat([torch.full((x.numel(),), float(n in blocks), dtype=torch.float64)
                      for n, x in zip(names, tensors, strict=True)])  # fmt: skip
    assert _rel(sk.logit_grads(st, a, b), (logit_grads(st, a, b).flat() * keep) @ Pi.T) < 1e-12
    W = torch.rand(9, 9, dtype=torch.float64)
    assert _rel(sk.row_sum(st, W), (weighted_logit_sum(st, W, 1).flat() * keep) @ Pi.T) < 1e-12


def test_blocks_are_named_and_canonical():
    params, _ = _setup()
    assert make_sketch("dense", params, 8, blocks="text,visual").blocks == ("visual", "text")
    with pytest.raises(ValueError, match="blocks must be"):
        make_sketch("kronecker", params, 8, blocks=("visual", "theta"))
    with pytest.raises(ValueError, match="blocks must be"):
        make_sketch("kronecker", params, 8, blocks="")

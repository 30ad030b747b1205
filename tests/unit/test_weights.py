"""Weights of METHOD.md §6 from a real batch state."""

import numpy as np
import pytest
import torch

from chips_core.scoring.endpoint import EndpointParams, batch_state
from chips_core.scoring.weights import eval_means, learnability, pair_stats, relevance

pytestmark = pytest.mark.unit


def _state(theta=2.0, B=6):
    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    params = EndpointParams(
        torch.randn(4, 5, generator=g, dtype=f64),
        torch.randn(4, 3, generator=g, dtype=f64),
        torch.tensor(theta, dtype=f64),
    )
    return batch_state(
        torch.randn(B, 5, generator=g, dtype=f64), torch.randn(B, 3, generator=g, dtype=f64), params
    )


def test_pair_stats_against_direct_formulas():
    st = _state()
    s = pair_stats(st)
    P, Q = torch.softmax(st.S, 1), torch.softmax(st.S, 0)
    torch.testing.assert_close(s["p_corr"], 0.5 * (P.diagonal() + Q.diagonal()))
    torch.testing.assert_close(s["one_minus_p"], 1 - s["p_corr"])
    S = st.S.numpy()
    for i in range(6):
        others = np.concatenate([np.delete(S[i], i), np.delete(S[:, i], i)])
        assert s["margin"][i].item() == pytest.approx(S[i, i] - others.max())
    torch.testing.assert_close(s["clipscore"], torch.nn.functional.cosine_similarity(st.X, st.Y))


def test_learnability_and_relevance_ranges():
    st = _state(theta=6.0)  # confident: 1 - p_corr tiny yet positive where representable
    s = pair_stats(st)
    wl = learnability(s["one_minus_p"].numpy(), s["margin"].numpy())
    assert np.all(wl >= 0) and np.all(wl <= 2)
    assert np.allclose(wl, s["one_minus_p"].numpy() * (1 + 1 / (1 + np.exp(s["margin"].numpy()))))
    assert relevance(np.array([1.0]), np.array([1.0]))[0] == pytest.approx(0.7311, abs=1e-4)
    assert relevance(np.array([-1.0]), np.array([-1.0]))[0] == pytest.approx(0.2689, abs=1e-4)
    assert (
        relevance(np.array([1.0]), np.array([-1.0]), beta=0.0)[0]
        > relevance(np.array([1.0]), np.array([-1.0]), beta=1.0)[0]
    )
    with pytest.raises(ValueError, match="beta"):
        relevance(np.zeros(1), np.zeros(1), beta=2)
    mx, my = eval_means(st.X, st.Y)
    assert mx.norm().item() == pytest.approx(1.0)

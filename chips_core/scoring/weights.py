"""Learnability, relevance, CLIPScore and the agreement percentile (METHOD.md §6, §7, §9).

prepare stores the ingredients per pair (1 − p_corr computed stably, margin, cosines to the eval means,
CLIPScore) so that rank can change β or switch a weight off without touching features.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.special import expit

from chips_core.scoring.params import RankParams

if TYPE_CHECKING:  # torch only where prepare computes the ingredients: rank's weights are numpy
    import torch

    from chips_core.scoring.endpoint import BatchState


def pair_stats(st: BatchState) -> dict[str, torch.Tensor]:
    """Per pair of a batch: p_corr = ½(P_ii + Q_ii), one_minus_p = ½(Σ_{j≠i}P_ij + Σ_{a≠i}Q_ai) (stable),
    margin m = S_ii − max(max_{j≠i} S_ij, max_{j≠i} S_ji) in logit units, clipscore = cos(x_i, y_i)."""
    import torch

    B = st.S.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=st.S.device)
    off = st.S.masked_fill(eye, float("-inf"))
    d = st.S.diagonal()
    margin = d - torch.maximum(off.max(1).values, off.max(0).values)
    return {
        "p_corr": 0.5 * (st.P_diag + st.Q_diag),
        "one_minus_p": 0.5 * (st.p_off + st.q_off),
        "margin": margin,
        "clipscore": (st.X * st.Y).sum(1),
    }


def learnability(one_minus_p: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """w_L = (1 − p_corr)(1 + σ(−m)): pairs the model has not learned yet, more so with a negative margin."""
    return one_minus_p * (1.0 + _sigmoid(-margin))


def relevance(cos_x: np.ndarray, cos_y: np.ndarray, beta: float = RankParams.beta) -> np.ndarray:
    """w_R = σ((1−β)cos(x, μ_x) + β cos(y, μ_y)) ∈ [0.27, 0.73]: a soft weight toward the target domain."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    return _sigmoid((1.0 - beta) * cos_x + beta * cos_y)


def percentile(x: np.ndarray) -> np.ndarray:
    """P(x): the share of the pool at or below each value, in (0, 1] (ties share their highest rank);
    0 for a value that is not finite, so that it ranks last.

    The scale-free form in which the CHIPS score and the agreement are combined (`RankParams.agreement`):
    a pair must rank high on both, whatever the spread of either."""
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    out = np.zeros(len(x))
    out[finite] = np.searchsorted(np.sort(x[finite]), x[finite], side="right") / max(len(x), 1)
    return out


#: residuals this close to 0 (relative to the CLIPScores' size) are ties: a fit that is exact up to rounding
#: (a tiny or degenerate pool) must not turn rounding noise into an order
EXACT_FIT_TOL = 1e-9


def agreement(clipscore: np.ndarray, cos_x: np.ndarray, cos_y: np.ndarray) -> np.ndarray:
    """How well a pair's caption fits its image compared with pairs as close to the target set: the pool
    percentile of CLIPScore minus its least-squares fit on [1, cos_x, cos_y] (the relevance cosines).

    Raw CLIPScore also measures how familiar a kind of image is to the model: off-target pairs the model
    knows well score high, unfamiliar target pairs low. Compared with pairs of the same closeness to the
    target, a low value means a caption that fits its image badly for its kind (docs/SCORING.md). The fit
    uses the pairs whose three values are finite; the others get agreement 0."""
    cs = np.asarray(clipscore, dtype=np.float64)
    design = np.column_stack([np.ones_like(cs), cos_x, cos_y]).astype(np.float64)
    ok = np.isfinite(cs) & np.isfinite(design).all(1)
    residual = np.full(len(cs), np.nan)
    if ok.any():
        fit, *_ = np.linalg.lstsq(design[ok], cs[ok], rcond=None)
        r = cs[ok] - design[ok] @ fit
        r[np.abs(r) <= EXACT_FIT_TOL * max(1.0, float(np.abs(cs[ok]).max()))] = 0.0
        residual[ok] = r
    return percentile(residual)


def blend(score: np.ndarray, other: np.ndarray, weight: float) -> np.ndarray:
    """P(score)^(1−w) · other^w (other in (0, 1]: the agreement, or a percentile such as P(CLIPScore); w:
    `RankParams.agreement` or `RankParams.clipscore_weight`); w = 0 returns `score` itself."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"a blend weight must lie in [0, 1], got {weight}")
    if weight == 0.0:
        return score
    return percentile(score) ** (1.0 - weight) * np.asarray(other, dtype=np.float64) ** weight


def eval_means(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit directions of the mean normalised eval image and text embeddings (μ_x/|μ_x|, μ_y/|μ_y|)."""
    mx, my = X.mean(0), Y.mean(0)
    return mx / mx.norm(), my / my.norm()


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return expit(np.asarray(z, dtype=np.float64))

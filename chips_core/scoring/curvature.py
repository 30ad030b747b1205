"""InfoNCE-aware curvature in sketch space, effective dimension, λ* and the Newton solve (METHOD.md §4–5).

Per pair i of a batch, the Gauss–Newton matrix of ℓ_i splits into a positive part
  ½[P_ii (s̄_i − ∇S_ii)(·)ᵀ + Q_ii (s̄'_i − ∇S_ii)(·)ᵀ]
and a negative part ½[Σ_{j≠i} P_ij (∇S_ij − s̄_i)(·)ᵀ + Σ_{a≠i} Q_ai (∇S_ai − s̄'_i)(·)ᵀ], with
s̄_i = Σ_j P_ij ∇S_ij and s̄'_i = Σ_a Q_ai ∇S_ai. The positive vectors are computed exactly (as
Σ_{j≠i}P_ij(∇S_ij − ∇S_ii), stable on confident pairs); the negative sum is estimated from K negatives
per row drawn from P_i·/(1 − P_ii) with weight (1 − P_ii)/K, which keeps it unbiased.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch

from chips_core.scoring.batches import mix64
from chips_core.scoring.endpoint import BatchState
from chips_core.scoring.sketch import Sketch


@dataclass
class NegativeSample:
    """K sampled negatives per row (image→text: j ≠ i) and per column (text→image: a ≠ i) of one batch."""

    row_j: torch.Tensor  # (B, K) text index j for image i
    col_a: torch.Tensor  # (B, K) image index a for text i


def sample_negatives(st: BatchState, K: int, seed: int, batch_no: int) -> NegativeSample:
    """Draw K negatives per row from P_i·/(1−P_ii) and per column from Q_·i/(1−Q_ii), seeded by (seed, batch).

    Sketched and exact runs call this with the same (seed, batch_no) and so use the same negatives.
    Rows whose off-diagonal mass underflowed to 0 draw uniformly; their weight (1 − P_ii)/K is 0 anyway.
    """
    if K < 1:
        raise ValueError(f"K (negatives per row) must be at least 1, got {K}")
    key = int(mix64(np.array([batch_no], dtype=np.int64), seed ^ 0x5EED)[0]) & 0x7FFFFFFFFFFFFFFF
    gen = torch.Generator().manual_seed(key)
    B = st.S.shape[0]
    off = 1.0 - torch.eye(B, dtype=torch.float64)

    def draw(W: torch.Tensor) -> torch.Tensor:
        W = W.detach().to("cpu", torch.float64)
        empty = W.sum(1) <= 0
        W = torch.where(empty[:, None], off, W)
        return torch.multinomial(W, K, replacement=True, generator=gen).to(st.S.device)

    return NegativeSample(draw(st.P), draw(st.Q.T))


def curvature_vectors(
    sk: Sketch, st: BatchState, neg: NegativeSample
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sketched vectors and weights of one batch: (Z_pos (2B, k), w_pos (2B,), Z_neg (2BK, k), w_neg (2BK,)).

    Φ_pos·N = Σ w_pos z zᵀ and E[Σ w_neg z zᵀ] = Φ_neg·N over the batch's pairs.
    """
    B = st.S.shape[0]
    K = neg.row_j.shape[1]
    i = torch.arange(B, device=st.S.device)
    diag = sk.logit_grads(st, i, i)
    row = sk.row_sum(st, st.P)  # Σ_{j≠i} P_ij ∇S_ij
    col = sk.col_sum(st, st.Q)  # Σ_{a≠i} Q_ai ∇S_ai
    Z_pos = torch.cat([row - st.p_off[:, None] * diag, col - st.q_off[:, None] * diag])
    w_pos = 0.5 * torch.cat([st.P_diag, st.Q_diag])
    sbar_row = row + st.P_diag[:, None] * diag
    sbar_col = col + st.Q_diag[:, None] * diag
    ii = i.repeat_interleave(K)
    z_row = sk.logit_grads(st, ii, neg.row_j.reshape(-1)) - sbar_row[ii]
    z_col = sk.logit_grads(st, neg.col_a.reshape(-1), ii) - sbar_col[ii]
    Z_neg = torch.cat([z_row, z_col])
    w_neg = (0.5 / K) * torch.cat([st.p_off.repeat_interleave(K), st.q_off.repeat_interleave(K)])
    return Z_pos, w_pos, Z_neg, w_neg


def negative_vectors_all(sk: Sketch, st: BatchState) -> tuple[torch.Tensor, torch.Tensor]:
    """Every negative term of one batch unsampled: (Z (2B(B−1), k), w) with weights ½P_ij and ½Q_ai.

    The reference the sampled estimate must match in expectation (B² vectors: small batches only).
    """
    B = st.S.shape[0]
    i = torch.arange(B, device=st.S.device)
    diag = sk.logit_grads(st, i, i)
    sbar_row = sk.row_sum(st, st.P) + st.P_diag[:, None] * diag
    sbar_col = sk.col_sum(st, st.Q) + st.Q_diag[:, None] * diag
    a, b = torch.where(~torch.eye(B, dtype=torch.bool, device=st.S.device))
    z_row = sk.logit_grads(st, a, b) - sbar_row[a]  # image a, text b ≠ a
    z_col = sk.logit_grads(st, a, b) - sbar_col[b]  # text b, image a ≠ b
    return torch.cat([z_row, z_col]), 0.5 * torch.cat([st.P[a, b], st.Q[a, b]])


class CurvatureAccumulator:
    """Running sums of the sketched Φ_pos and Φ_neg (float64) over the batches of a pool subsample."""

    def __init__(self, k: int, K: int = 8, seed: int = 0) -> None:
        self.k, self.K, self.seed = int(k), int(K), int(seed)
        self.pos = np.zeros((k, k))
        self.neg = np.zeros((k, k))
        self.n = 0

    def add(self, sk: Sketch, st: BatchState, batch_no: int) -> None:
        """Add one batch (its negatives are drawn with (seed, batch_no))."""
        neg = sample_negatives(st, self.K, self.seed, batch_no)
        Z_pos, w_pos, Z_neg, w_neg = curvature_vectors(sk, st, neg)
        self.pos += ((Z_pos * w_pos[:, None]).T @ Z_pos).double().cpu().numpy()
        self.neg += ((Z_neg * w_neg[:, None]).T @ Z_neg).double().cpu().numpy()
        self.n += st.S.shape[0]

    def merge(self, pos: np.ndarray, neg: np.ndarray, n: int) -> None:
        """Add sums computed elsewhere (a resumed chunk or another worker): curvature sums reduce."""
        self.pos += pos
        self.neg += neg
        self.n += int(n)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(Φ̃_pos, Φ̃_neg) = sums / N (unscaled sketch rows)."""
        if self.n == 0:
            raise ValueError("no curvature batches were added")
        return self.pos / self.n, self.neg / self.n


def combine(phi_pos: np.ndarray, phi_neg: np.ndarray, alpha: float) -> np.ndarray:
    """C(α) = (1 − α)Φ_pos + αΦ_neg (α = 0: positive-only; α = 0.5 is half the Gauss–Newton matrix)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return (1.0 - alpha) * phi_pos + alpha * phi_neg


#: up to this k a k×k system runs on one BLAS thread (`_one_blas_thread`)
SMALL_SYSTEM = 1024
_BLAS_LOCK = threading.Lock()


@functools.cache
def _blas_controller() -> Any:
    """numpy's and scipy's BLAS libraries (threadpoolctl), found once they are loaded."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def _one_blas_thread(k: int) -> Iterator[None]:
    """numpy/scipy BLAS on one thread for a k×k eigen- or Cholesky decomposition with k ≤ SMALL_SYSTEM.

    Waking OpenBLAS's threads costs more than such a decomposition, and far more when the cores are busy:
    on 2 shared cores (load 4) a k = 128 Cholesky took 240 ms on two threads and 0.2 ms on one, eigvalsh
    at k = 512 2.7 s and 25 ms. The limit is process-wide, so every decomposition (a larger one too) takes
    the lock: concurrent callers (dashboard sessions) neither restore each other's thread counts out of
    order nor run a large decomposition under another's limit. Other BLAS work of the process (torch's
    own, numpy products elsewhere) can run on one thread for those milliseconds.
    """
    with _BLAS_LOCK:
        if k > SMALL_SYSTEM:
            yield
            return
        with _blas_controller().limit(limits=1, user_api="blas"):
            yield


def eigenvalues(C: np.ndarray) -> np.ndarray:
    """Eigenvalues of the symmetric PSD matrix C (tiny negatives from rounding clipped to 0)."""
    with _one_blas_thread(C.shape[0]):
        return np.clip(np.linalg.eigvalsh(0.5 * (C + C.T)), 0.0, None)


def effective_dimension(eigs: np.ndarray, lam: float) -> float:
    """d(λ) = Σ σ_i / (σ_i + λ)."""
    if lam <= 0:
        raise ValueError(f"lambda must be positive, got {lam}")
    return float(np.sum(eigs / (eigs + lam)))


def lambda_star(eigs: np.ndarray, target: float) -> float:
    """λ with d(λ) = target by bisection in log λ; d falls from rank(C) to 0 as λ grows.

    When the curvature has fewer than `target` nonzero directions no λ reaches it; the smallest
    bracket end (1e-12·σ_max) is returned and the caller reports d(λ)/k.
    """
    top = float(eigs.max()) if eigs.size else 0.0
    if top <= 0:
        raise ValueError("the curvature matrix is zero; is the pool subsample empty or degenerate?")
    lo, hi = np.log(top * 1e-12), np.log(top * 1e6)
    if effective_dimension(eigs, float(np.exp(lo))) <= target:
        return float(np.exp(lo))
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if effective_dimension(eigs, float(np.exp(mid))) > target:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def newton_solve(C: np.ndarray, u: np.ndarray, lam: float) -> np.ndarray:
    """x = (C + λI)⁻¹ u by Cholesky (C symmetric PSD, λ > 0)."""
    if lam <= 0:
        raise ValueError(f"lambda must be positive, got {lam}")
    M = 0.5 * (C + C.T) + lam * np.eye(C.shape[0])
    with _one_blas_thread(C.shape[0]):
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(M, lower=True), u)


def rank_bound(n_pairs: int, batch_size: int, curvature_pairs: int, K: int) -> int:
    """An upper bound on the rank of the sketched curvature prepare builds from a pool of `n_pairs`.

    prepare adds the first ceil(min(curvature_pairs, N)/B₀) batches (B₀ the first batch's size); a batch
    of B pairs contributes 2B positive and 2BK sampled negative vectors (`curvature_vectors`), and all of
    them are differences ∇S_ij − ∇S_kk of its B² logit gradients, so its share of the rank is at most
    min(2B(K + 1), B² − 1). With fewer independent directions than k/4 no λ* exists and the Cholesky
    solve fails, so k_max must not exceed this bound (see `pipeline.prepare_workspace`).
    """
    from chips_core.scoring.batches import n_batches

    nb = n_batches(n_pairs, batch_size)
    sizes = [len(b) for b in np.array_split(np.arange(n_pairs), nb)]
    n_curv = min(-(-min(curvature_pairs, n_pairs) // sizes[0]), nb)
    return int(sum(min(2 * B * (K + 1), B * B - 1) for B in sizes[:n_curv]))

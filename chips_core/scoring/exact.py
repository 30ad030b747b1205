"""Exact mode (no sketch): x = M⁻¹u in the full endpoint space by conjugate gradients (METHOD.md §5).

M v = (1 − α)Φ_pos v + αΦ_neg v + λv is computed matrix-free: every curvature vector is a combination
Σ_ab c_ab ∇S_ab of logit gradients, so a product needs only the directional derivatives ∇S_ab·v of a
batch (B×B) and one recombination Σ_ab Γ_ab ∇S_ab (O(B²D + BDd)). The curvature uses the same batches,
seeds and sampled negatives as the sketched run, and the same absolute λ, so the two are comparable.
Scores are g_i·x, again from directional derivatives, without forming any per-sample gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chips_core.scoring.curvature import NegativeSample, sample_negatives
from chips_core.scoring.endpoint import (
    BLOCKS,
    BatchState,
    EndpointGrads,
    EndpointParams,
    logit_combination,
    logit_directional,
    mask_grads,
    parse_blocks,
)


def unflat(vec: torch.Tensor, params: EndpointParams) -> EndpointGrads:
    """A flat p-vector as a one-row EndpointGrads shaped like `params`."""
    nv, nt = params.W_v.numel(), params.W_t.numel()
    return EndpointGrads(
        vec[:nv].reshape(1, *params.W_v.shape), vec[nv : nv + nt].reshape(1, *params.W_t.shape), vec[-1:]
    )


def _gammas(st: BatchState, neg: NegativeSample, dS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Γ_pos, Γ_neg with Σ_m w_m (z_m·v) z_m = Σ_ab Γ_ab ∇S_ab for one batch, given dS_ab = ∇S_ab·v."""
    B, K = neg.row_j.shape
    dg = dS.diagonal()
    i = torch.arange(B, device=dS.device)
    row = (st.P * dS).sum(1)  # Σ_{j≠i} P_ij dS_ij
    col = (st.Q * dS).sum(0)
    # positive vectors: Σ_{j≠i}P_ij(∇S_ij − ∇S_ii) (row) and its column analogue, weights ½P_ii, ½Q_ii
    c_r = 0.5 * st.P_diag * (row - st.p_off * dg)
    c_c = 0.5 * st.Q_diag * (col - st.q_off * dg)
    G_pos = c_r[:, None] * st.P + c_c[None, :] * st.Q
    G_pos = G_pos - torch.diag(c_r * st.p_off + c_c * st.q_off)
    # sampled negatives: ∇S_ij − s̄_i with weight ½(1−P_ii)/K; s̄_i = Σ_j P_ij ∇S_ij (diagonal included)
    P_full = st.P + torch.diag(st.P_diag)
    Q_full = st.Q + torch.diag(st.Q_diag)
    sbar_r = row + st.P_diag * dg
    sbar_c = col + st.Q_diag * dg
    ii = i.repeat_interleave(K)
    jr, ac = neg.row_j.reshape(-1), neg.col_a.reshape(-1)
    c_nr = (0.5 / K) * st.p_off[ii] * (dS[ii, jr] - sbar_r[ii])
    c_nc = (0.5 / K) * st.q_off[ii] * (dS[ac, ii] - sbar_c[ii])
    G_neg = torch.zeros_like(dS)
    G_neg.index_put_((ii, jr), c_nr, accumulate=True)
    G_neg.index_put_((ac, ii), c_nc, accumulate=True)
    tot_r = torch.zeros(B, dtype=dS.dtype, device=dS.device).index_add_(0, ii, c_nr)
    tot_c = torch.zeros(B, dtype=dS.dtype, device=dS.device).index_add_(0, ii, c_nc)
    G_neg = G_neg - tot_r[:, None] * P_full - tot_c[None, :] * Q_full
    return G_pos, G_neg


@dataclass
class CGInfo:
    iterations: int
    rel_residual: float


class ExactSystem:
    """M = (1 − α)Φ_pos + αΦ_neg + λI over the curvature subsample, as a matrix-free operator."""

    def __init__(
        self,
        params: EndpointParams,
        states: list[tuple[int, BatchState]],
        alpha: float,
        lam: float,
        K: int = 8,
        seed: int = 0,
        blocks: tuple[str, ...] = BLOCKS,
    ) -> None:
        if not states:
            raise ValueError("exact mode needs at least one curvature batch")
        if lam <= 0:
            raise ValueError(f"lambda must be positive, got {lam}")
        self.params, self.alpha, self.lam = params, float(alpha), float(lam)
        self.batches = [(st, sample_negatives(st, K, seed, b)) for b, st in states]
        self.n = sum(st.S.shape[0] for st, _ in self.batches)
        ones = EndpointGrads(
            torch.ones_like(params.W_v)[None],
            torch.ones_like(params.W_t)[None],
            torch.ones_like(params.logit_scale).reshape(1),
        )
        self.mask = mask_grads(ones, parse_blocks(blocks)).flat()[0]

    def curvature_matvec(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Φ_pos v, Φ_neg v) as flat p-vectors."""
        V = unflat(v, self.params)
        pos = torch.zeros_like(v)
        negv = torch.zeros_like(v)
        for st, neg in self.batches:
            dS = sum(logit_directional(st, V))
            G_pos, G_neg = _gammas(st, neg, dS)
            pos += logit_combination(st, G_pos).flat()[0]
            negv += logit_combination(st, G_neg).flat()[0]
        return pos / self.n, negv / self.n

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """M v restricted to the scored blocks: mask ⊙ C (mask ⊙ v) + λv."""
        pos, negv = self.curvature_matvec(self.mask * v)
        return self.mask * ((1 - self.alpha) * pos + self.alpha * negv) + self.lam * v

    def solve(self, u: torch.Tensor, tol: float = 1e-10, maxiter: int = 1000) -> tuple[torch.Tensor, CGInfo]:
        """Conjugate gradients for M x = u (u restricted to the scored blocks) from x = 0; stops at
        |r| ≤ tol·|u|."""
        u = self.mask * u
        x = torch.zeros_like(u)
        r = u.clone()
        p = r.clone()
        rr = r @ r
        norm_u = float(u.norm())
        it = 0
        while it < maxiter and float(rr.sqrt()) > tol * norm_u:
            Mp = self.matvec(p)
            step = rr / (p @ Mp)
            x = x + step * p
            r = r - step * Mp
            rr_new = r @ r
            p = r + (rr_new / rr) * p
            rr = rr_new
            it += 1
        return x, CGInfo(it, float(rr.sqrt()) / max(norm_u, 1e-300))


def exact_scores(
    st: BatchState, x: torch.Tensor, params: EndpointParams, negatives: str = "all"
) -> torch.Tensor:
    """(B,) g_i·x for every pair of a batch, from directional derivatives (no per-sample gradient formed)."""
    dv, dt, dth = logit_directional(st, unflat(x, params))
    kappa = 0.5 * (st.p_off + st.q_off)

    def row(d: torch.Tensor) -> torch.Tensor:
        return 0.5 * (st.P * d).sum(1) - kappa * d.diagonal()

    def col(d: torch.Tensor) -> torch.Tensor:
        return 0.5 * (st.Q * d).sum(0) - kappa * d.diagonal()

    theta = 0.5 * (st.P * dth).sum(1) + 0.5 * (st.Q * dth).sum(0) - kappa * dth.diagonal()
    if negatives == "all":
        return (
            0.5 * (st.P * (dv + dt)).sum(1)
            + 0.5 * (st.Q * (dv + dt)).sum(0)
            - kappa * (dv + dt).diagonal()
            + theta
        )
    if negatives == "self":
        return row(dv) + col(dt) + theta
    raise ValueError(f"negatives must be 'all' or 'self', got {negatives!r}")

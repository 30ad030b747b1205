"""Johnson–Lindenstrauss sketches of endpoint gradients (METHOD.md §5).

Every sketch returns UNSCALED projections: rows of Π have independent N(0, 1) entries, generated on the
CPU in seeded blocks of `ROW_BLOCK` rows, so rows [0, k) of a k_max sketch are exactly a fresh k sketch
with the same seed. A caller that uses a prefix of k rows divides vectors by √k (and k×k matrices by k).

`DenseGaussianSketch` is the reference: it forms full-space gradients and multiplies by Π (cost k·p per
vector). `KroneckerSketch` is the fast default: row l is [vec(a_l b_lᵀ), vec(a'_l c_lᵀ), γ_l], so a
rank-one block u hᵀ projects to (a_l·u)(b_l·h); a batch projects X, Y, H, T once and combines them with
(B×B)(B×k) products, never forming a p-dimensional gradient.
"""

from __future__ import annotations

import numpy as np
import torch

from chips_core.scoring.batches import mix64
from chips_core.scoring.endpoint import (
    BLOCKS,
    BatchState,
    EndpointGrads,
    EndpointParams,
    grads_from_state,
    logit_grads,
    mask_grads,
    parse_blocks,
    weighted_logit_sum,
)

ROW_BLOCK = 256


def _block_generator(seed: int, block: int) -> torch.Generator:
    key = int(mix64(np.array([block], dtype=np.int64), seed)[0]) & 0x7FFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(key)


class Sketch:
    """A seeded k_max×p projection of the endpoint space with widths D, d_v' and d_t' (bias included).

    `blocks` restricts it to a subspace: the columns of Π that belong to the other blocks are zero, so
    every sketched gradient, ũ and curvature vector lives in the scored blocks only. The random draws do
    not depend on `blocks`, so the same seed gives the same rows for every choice.
    """

    kind = "base"

    def __init__(
        self, k_max: int, D: int, d_v: int, d_t: int, seed: int = 0, blocks: tuple[str, ...] = BLOCKS
    ) -> None:
        if k_max < 1:
            raise ValueError(f"k_max must be positive, got {k_max}")
        self.k_max, self.D, self.d_v, self.d_t, self.seed = int(k_max), int(D), int(d_v), int(d_t), int(seed)
        self.blocks = parse_blocks(blocks)
        self._cache: dict[tuple, object] = {}
        self._proj: tuple[BatchState, dict] | None = None

    @classmethod
    def for_params(
        cls, params: EndpointParams, k_max: int, seed: int = 0, blocks: tuple[str, ...] = BLOCKS
    ) -> Sketch:
        """A sketch of the endpoint space of `params` (augmented widths), restricted to `blocks`."""
        return cls(k_max, params.D, params.W_v.shape[1], params.W_t.shape[1], seed, blocks)

    @property
    def p(self) -> int:
        return self.D * self.d_v + self.D * self.d_t + 1

    def _blocks(self) -> list[tuple[int, int]]:
        """(start, stop) of each row block; blocks are generated whole and cut, so streams ignore k_max."""
        return [(s, min(s + ROW_BLOCK, self.k_max)) for s in range(0, self.k_max, ROW_BLOCK)]

    def apply(self, g: EndpointGrads) -> torch.Tensor:
        """(n, k_max) unscaled Π·g for full-space vectors."""
        raise NotImplementedError

    def batch_grads(self, st: BatchState, negatives: str = "all") -> torch.Tensor:
        """(B, k_max) unscaled sketched per-sample gradients of one batch."""
        return self.apply(grads_from_state(st, negatives))

    def logit_grads(self, st: BatchState, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(n, k_max) unscaled sketched ∇S_ab for index pairs of one batch."""
        out = [self.apply(logit_grads(st, a[i : i + 1024], b[i : i + 1024])) for i in range(0, len(a), 1024)]
        return torch.cat(out) if out else st.S.new_zeros(0, self.k_max)

    def row_sum(self, st: BatchState, W: torch.Tensor) -> torch.Tensor:
        """(B, k_max) unscaled Σ_j W_ij Π∇S_ij."""
        return self.apply(weighted_logit_sum(st, W, 1))

    def col_sum(self, st: BatchState, W: torch.Tensor) -> torch.Tensor:
        """(B, k_max) unscaled Σ_a W_ai Π∇S_ai."""
        return self.apply(weighted_logit_sum(st, W, 0))


class _PartsSketch(Sketch):
    """A sketch that projects a batch's shared vectors once and assembles every sketched vector from
    the W_v, W_t and θ parts of logit gradients (subclasses give `_row_parts`, `_col_parts`,
    `_logit_parts`)."""

    def row_sum(self, st: BatchState, W: torch.Tensor) -> torch.Tensor:
        return sum(self._row_parts(st, W))

    def col_sum(self, st: BatchState, W: torch.Tensor) -> torch.Tensor:
        return sum(self._col_parts(st, W))

    def logit_grads(self, st: BatchState, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sum(self._logit_parts(st, a, b))

    def batch_grads(self, st: BatchState, negatives: str = "all") -> torch.Tensor:
        """g_i = ½Σ_{b≠i}P_ib∇S_ib + ½Σ_{a≠i}Q_ai∇S_ai − κ_i∇S_ii with κ_i = ½(Σ_{j≠i}P_ij + Σ_{a≠i}Q_ai).

        'self' keeps the rank-one r_i h_iᵀ, q_i t_iᵀ blocks (W_v part of the row terms, W_t part of the
        column terms, both with their share of the diagonal) and the whole θ component.
        """
        if negatives not in ("all", "self"):
            raise ValueError(f"negatives must be 'all' or 'self', got {negatives!r}")
        i = torch.arange(st.S.shape[0], device=st.S.device)
        kappa = (0.5 * (st.p_off + st.q_off))[:, None]
        rv, rt, rth = self._row_parts(st, 0.5 * st.P)
        cv, ct, cth = self._col_parts(st, 0.5 * st.Q)
        dv, dt, dth = self._logit_parts(st, i, i)
        out = rv - kappa * dv + ct - kappa * dt + rth + cth - kappa * dth
        if negatives == "all":
            out = out + rt + cv
        return out


class DenseGaussianSketch(_PartsSketch):
    """Reference sketch: Π (k_max, p) with i.i.d. N(0, 1) entries, held in memory (k_max·p floats)."""

    kind = "dense"

    def matrix(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Π as a (k_max, p) tensor; generated once on the CPU in seeded row blocks."""
        if "cpu" not in self._cache:
            rows = [
                torch.randn(ROW_BLOCK, self.p, generator=_block_generator(self.seed, i))[: e - s]
                for i, (s, e) in enumerate(self._blocks())
            ]
            Pi = torch.cat(rows)
            nv, nt = self.D * self.d_v, self.D * self.d_t
            for name, cols in zip(
                BLOCKS, (slice(0, nv), slice(nv, nv + nt), slice(nv + nt, None)), strict=True
            ):
                if name not in self.blocks:
                    Pi[:, cols] = 0
            self._cache["cpu"] = Pi
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = self._cache["cpu"].to(device=device, dtype=dtype)
        return self._cache[key]

    def apply(self, g: EndpointGrads) -> torch.Tensor:
        flat = g.flat()
        return flat @ self.matrix(flat.device, flat.dtype).T

    def _project(self, st: BatchState) -> dict:
        """Π_v applied to each h_a and Π_t to each t_b: (B, k, D) each, so a rank-one block u hᵀ projects
        as Hv[a] @ u (cost k·D instead of k·D·d per vector)."""
        if self._proj is not None and self._proj[0] is st:
            return self._proj[1]
        Pi = self.matrix(st.X.device, st.X.dtype)
        nv, nt = self.D * self.d_v, self.D * self.d_t
        Hv = torch.einsum("lde,ae->ald", Pi[:, :nv].reshape(-1, self.D, self.d_v), st.H)
        Tt = torch.einsum("lde,be->bld", Pi[:, nv : nv + nt].reshape(-1, self.D, self.d_t), st.T)
        pr = {"Hv": Hv, "Tt": Tt, "HX": torch.einsum("ald,ad->al", Hv, st.X),
              "TY": torch.einsum("bld,bd->bl", Tt, st.Y), "XY": st.X @ st.Y.T, "g": Pi[:, -1]}  # fmt: skip
        self._proj = (st, pr)
        return pr

    def _row_parts(self, st: BatchState, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pr = self._project(st)
        WY = W @ st.Y
        R = (WY - st.X * (st.X * WY).sum(1, keepdim=True)) / st.nv[:, None]
        v = st.s * torch.einsum("ild,id->il", pr["Hv"], R)
        c = W / st.nw[None, :]
        t = st.s * (torch.einsum("ij,jld,id->il", c, pr["Tt"], st.X) - (c * pr["XY"]) @ pr["TY"])
        return v, t, (W * st.S).sum(1)[:, None] * pr["g"][None, :]

    def _col_parts(self, st: BatchState, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pr = self._project(st)
        c = W / st.nv[:, None]
        v = st.s * (torch.einsum("ai,ald,id->il", c, pr["Hv"], st.Y) - (c * pr["XY"]).T @ pr["HX"])
        WX = W.T @ st.X
        Qv = (WX - st.Y * (st.Y * WX).sum(1, keepdim=True)) / st.nw[:, None]
        t = st.s * torch.einsum("ild,id->il", pr["Tt"], Qv)
        return v, t, (W * st.S).sum(0)[:, None] * pr["g"][None, :]

    def _logit_parts(self, st: BatchState, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pr = self._project(st)
        vs, ts = [], []
        for i in range(0, len(a), 256):  # gathers of (n, k, D): keep them small
            aa, bb = a[i : i + 256], b[i : i + 256]
            xy = pr["XY"][aa, bb][:, None]
            u = (st.Y[bb] - st.X[aa] * xy) / st.nv[aa, None]
            w = (st.X[aa] - st.Y[bb] * xy) / st.nw[bb, None]
            vs.append(st.s * torch.einsum("nld,nd->nl", pr["Hv"][aa], u))
            ts.append(st.s * torch.einsum("nld,nd->nl", pr["Tt"][bb], w))
        empty = st.S.new_zeros(0, self.k_max)
        v = torch.cat(vs) if vs else empty
        t = torch.cat(ts) if ts else empty
        return v, t, st.S[a, b][:, None] * pr["g"][None, :]


class KroneckerSketch(_PartsSketch):
    """Fast sketch: row l = [vec(a_l b_lᵀ), vec(a'_l c_lᵀ), γ_l] with all factors i.i.d. N(0, 1)."""

    kind = "kronecker"

    def factors(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> dict:
        """A (k, D), B (k, d_v'), A2 (k, D), C (k, d_t'), g (k,) on a device/dtype (CPU-generated)."""
        if "cpu" not in self._cache:
            parts: dict[str, list] = {n: [] for n in ("A", "B", "A2", "C", "g")}
            for i, (s, e) in enumerate(self._blocks()):
                gen = _block_generator(self.seed, i)
                n = e - s
                for name, width in (("A", self.D), ("B", self.d_v), ("A2", self.D), ("C", self.d_t)):
                    parts[name].append(torch.randn(ROW_BLOCK, width, generator=gen)[:n])
                parts["g"].append(torch.randn(ROW_BLOCK, generator=gen)[:n])
            f = {n: torch.cat(v) for n, v in parts.items()}
            for block, factor in zip(BLOCKS, ("B", "C", "g"), strict=True):
                if (
                    block not in self.blocks
                ):  # row l is [vec(a bᵀ), vec(a′cᵀ), γ]: a zero factor drops a block
                    f[factor] = torch.zeros_like(f[factor])
            self._cache["cpu"] = f
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = {n: v.to(device=device, dtype=dtype) for n, v in self._cache["cpu"].items()}
        return self._cache[key]

    def apply(self, g: EndpointGrads) -> torch.Tensor:
        f = self.factors(g.G_v.device, g.G_v.dtype)
        out = torch.einsum("nde,le,ld->nl", g.G_v, f["B"], f["A"])
        out = out + torch.einsum("nde,le,ld->nl", g.G_t, f["C"], f["A2"])
        return out + g.g_theta[:, None] * f["g"][None, :]

    def _project(self, st: BatchState) -> dict:
        """Projections of one batch's vectors, computed once per batch state (k×B each)."""
        if self._proj is not None and self._proj[0] is st:
            return self._proj[1]
        f = self.factors(st.X.device, st.X.dtype)
        pr = {
            "AX": st.X @ f["A"].T,
            "AY": st.Y @ f["A"].T,
            "HB": st.H @ f["B"].T,
            "A2X": st.X @ f["A2"].T,
            "A2Y": st.Y @ f["A2"].T,
            "TC": st.T @ f["C"].T,
            "XY": st.X @ st.Y.T,
            "g": f["g"],
        }
        self._proj = (st, pr)
        return pr

    def _row_parts(self, st: BatchState, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pr = self._project(st)
        WXY = W * pr["XY"]
        v = st.s * pr["HB"] / st.nv[:, None] * (W @ pr["AY"] - pr["AX"] * WXY.sum(1)[:, None])
        t = st.s * (
            pr["A2X"] * ((W / st.nw[None, :]) @ pr["TC"]) - (WXY / st.nw[None, :]) @ (pr["A2Y"] * pr["TC"])
        )
        th = (W * st.S).sum(1)[:, None] * pr["g"][None, :]
        return v, t, th

    def _col_parts(self, st: BatchState, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pr = self._project(st)
        WXY = W * pr["XY"]
        v = st.s * (
            pr["AY"] * ((W / st.nv[:, None]).T @ pr["HB"]) - (WXY / st.nv[:, None]).T @ (pr["AX"] * pr["HB"])
        )
        t = st.s * pr["TC"] / st.nw[:, None] * (W.T @ pr["A2X"] - pr["A2Y"] * WXY.sum(0)[:, None])
        th = (W * st.S).sum(0)[:, None] * pr["g"][None, :]
        return v, t, th

    def _logit_parts(self, st: BatchState, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pr = self._project(st)
        xy = pr["XY"][a, b][:, None]
        v = st.s * (pr["AY"][b] - pr["AX"][a] * xy) * pr["HB"][a] / st.nv[a, None]
        t = st.s * (pr["A2X"][a] - pr["A2Y"][b] * xy) * pr["TC"][b] / st.nw[b, None]
        return v, t, st.S[a, b][:, None] * pr["g"][None, :]


SKETCHES = {"dense": DenseGaussianSketch, "kronecker": KroneckerSketch}


def make_sketch(
    kind: str, params: EndpointParams, k_max: int, seed: int = 0, blocks: tuple[str, ...] = BLOCKS
) -> Sketch:
    """A sketch by name ('kronecker' default, 'dense' reference) of the endpoint blocks of `params`."""
    if kind not in SKETCHES:
        raise ValueError(f"unknown sketch {kind!r}; choose one of {sorted(SKETCHES)}")
    return SKETCHES[kind].for_params(params, k_max, seed, blocks)


class FullSpace(Sketch):
    """The identity 'sketch' (k = p): full-space vectors through the same interface, for exact checks."""

    kind = "full"

    def __init__(
        self, k_max: int, D: int, d_v: int, d_t: int, seed: int = 0, blocks: tuple[str, ...] = BLOCKS
    ) -> None:
        super().__init__(D * d_v + D * d_t + 1, D, d_v, d_t, seed, blocks)

    def apply(self, g: EndpointGrads) -> torch.Tensor:
        return mask_grads(g, self.blocks).flat()

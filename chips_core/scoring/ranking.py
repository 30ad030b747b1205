"""rank: CHIPS and every baseline/ablation from a prepared ScoringCache (cache.py), no model (METHOD.md §4–7).

rank solves a k×k system (Cholesky), multiplies the memory-mapped fp16 sketch prefix by the solution,
applies the weights and sorts: milliseconds per 10⁵ pairs. Scaling of the stored unscaled sketch at a
prefix of k rows: vectors /√k, matrices /k (METHOD.md §5). With `stored=True` the solve's result is read
from the cache folder when an earlier call stored it (stored.py): then no torch or scipy.linalg is imported
(torch and the k×k solvers are imported where they are used, not with this module).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from chips_core.scoring import stored as stored_alignments
from chips_core.scoring.cache import PrepareError, ScoringCache
from chips_core.scoring.params import DAMPING_SCALE, GUARDS, METHODS, RankParams, default_k
from chips_core.scoring.weights import agreement, blend, learnability, percentile, relevance

if TYPE_CHECKING:
    from chips_core.scoring.prepare import FeatureSource

__all__ = [
    "METHODS",
    "RankParams",
    "RankResult",
    "eval_contributions",
    "project",
    "rank",
    "rank_exact",
    "row_norms",
    "selection_change",
    "sketched_system",
    "store_rankings",
]

STABILITY_ROWS = 100_000


def project(cache: ScoringCache, x: np.ndarray, start: int = 0, max_rows: int | None = None) -> np.ndarray:
    """G[:, start:start+len(x)] @ x over the cache's unscaled stored sketch (float64), first max_rows rows."""
    import torch

    k = len(x)
    cb = cache.meta["col_block"]
    out = []
    rows_left = cache.n if max_rows is None else max_rows
    for G, sc in zip(cache.G, cache.scales, strict=True):
        if rows_left <= 0:
            break
        n_c = min(G.shape[1], rows_left)
        acc = np.zeros(n_c, np.float64)
        for j in range(start // cb, -(-(start + k) // cb)):
            lo, hi = max(start, j * cb), min(start + k, (j + 1) * cb)
            xj = x[lo - start : hi - start]
            m = float(np.abs(xj).max())
            if m == 0:
                continue
            xt = torch.from_numpy((xj / m).astype(np.float16))
            blk = torch.from_numpy(G[j, :n_c, lo - j * cb : hi - j * cb])
            acc += (blk @ xt).numpy().astype(np.float64) * (sc[j, :n_c] * m)
        out.append(acc)
        rows_left -= n_c
    return np.concatenate(out)


def row_norms(cache: ScoringCache, k: int, start: int = 0) -> np.ndarray:
    """‖g̃‖ of every pair over sketch rows [start, start+k), scaled by 1/√k (kept in cache.memo)."""
    key = ("norms", k, start)
    if key not in cache.memo:
        import torch

        cb = cache.meta["col_block"]
        out = []
        for G, sc in zip(cache.G, cache.scales, strict=True):
            acc = np.zeros(G.shape[1], np.float64)
            for j in range(start // cb, -(-(start + k) // cb)):
                lo, hi = max(start, j * cb), min(start + k, (j + 1) * cb)
                blk = torch.from_numpy(G[j, :, lo - j * cb : hi - j * cb]).float()
                acc += (blk * blk).sum(1).numpy().astype(np.float64) * sc[j].astype(np.float64) ** 2
            out.append(acc)
        cache.memo[key] = np.sqrt(np.concatenate(out) / k)
    return cache.memo[key]


def sketched_system(
    cache: ScoringCache, k: int, alpha: float, start: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(C̃(α), ũ, eigenvalues of C̃) at sketch rows [start, start+k) of the cache, scaled."""
    from chips_core.scoring.curvature import combine, eigenvalues

    sl = slice(start, start + k)
    C = combine(cache.phi_pos[sl, sl], cache.phi_neg[sl, sl], alpha) / k
    key = (k, float(alpha), start)
    if key not in cache.memo:
        cache.memo[key] = eigenvalues(C)
    return C, cache.u[sl] / math.sqrt(k), cache.memo[key]


@dataclass
class RankResult:
    """Per-pair table (pair_id, alignment, learnability, relevance, score, rank, selected), run info and
    the parameters that made it (with the cache's blocks), which a score run stores."""

    frame: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)
    params: RankParams | None = None

    def to_frame(self) -> pd.DataFrame:
        return self.frame


def _check_k(cache: ScoringCache, k: int | None) -> int:
    k = default_k(cache.k_max) if k is None else int(k)
    if not 1 <= k <= cache.k_max:
        raise ValueError(f"k must lie in [1, k_max={cache.k_max}], got {k}")
    return max(k, 1)


def default_lambda(eigs: np.ndarray, k: int, damping: str, scale: float = DAMPING_SCALE) -> float:
    """The default λ of a sketched curvature with eigenvalues `eigs` at prefix k.

    'trace': λ = scale·tr(C̃). tr(C̃) estimates tr(C) without bias at every k, so λ does not swing with k
    (METHOD.md §9: λ* fell 15× from k = 256 to 1024 on the demo and lifted mismatches with it).
    'dimension': λ* with d(λ*) = k/4 (METHOD.md §4, the paper preset): a fidelity choice.
    """
    from chips_core.scoring.curvature import lambda_star

    if damping == "trace":
        return float(scale) * float(np.sum(np.clip(eigs, 0, None)))
    if damping == "dimension":
        return lambda_star(eigs, k / 4)
    raise ValueError(f"damping must be 'trace' or 'dimension', got {damping!r}")


def _newton_system(
    cache: ScoringCache,
    k: int,
    alpha: float,
    lam: float | None,
    start: int = 0,
    *,
    damping: str,
    normalize: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(C̃(α), scaled ũ, info with the λ used): the system Â solves; λ = the damping rule's λ unless
    given. normalize: ũ is scaled to unit norm (LESS-style cosine; the ranking is unchanged by it)."""
    from chips_core.scoring.curvature import effective_dimension, lambda_star

    C, u, eigs = sketched_system(cache, k, alpha, start)
    lam_s = lambda_star(eigs, k / 4)
    lam_base = default_lambda(eigs, k, damping)
    lam_used = lam_base if lam is None else float(lam)
    if lam_used <= 0:
        raise ValueError(f"lam must be positive, got {lam}")
    if normalize:
        u = u / max(float(np.linalg.norm(u)), 1e-300)
    info = {
        "lam": lam_used,
        "lam_base": lam_base,
        "lam_star": lam_s,
        "d_over_k": effective_dimension(eigs, lam_used) / k,
        "curvature_ratio": float(np.trace(cache.phi_pos[start : start + k, start : start + k]))
        / max(float(np.trace(cache.phi_neg[start : start + k, start : start + k])), 1e-300),
    }
    return C, u, info


def _newton_alignment(
    cache: ScoringCache,
    k: int,
    alpha: float,
    lam: float | None,
    start: int = 0,
    max_rows: int | None = None,
    *,
    damping: str,
    normalize: bool = False,
) -> tuple[np.ndarray, dict]:
    """Â = g̃·M̃⁻¹ũ for every pair (the first max_rows); normalize divides each g̃ by its norm."""
    from chips_core.scoring.curvature import newton_solve

    C, u, info = _newton_system(cache, k, alpha, lam, start, damping=damping, normalize=normalize)
    x = newton_solve(C, u, info["lam"])
    A = project(cache, x, start, max_rows) / math.sqrt(k)
    if normalize:
        norms = row_norms(cache, k, start)[: len(A)]
        A = A / np.maximum(norms, 1e-300)
    return A, info


def _newton_settings(params: RankParams) -> tuple[float, str, bool]:
    """(α, damping, normalize) of the Newton solve of `params`: trak's are fixed (α = 0, literal damping,
    raw gradients); every other method's are the parameters' own."""
    if params.method == "trak":
        return 0.0, "dimension", False
    return params.alpha, params.damping, params.normalize


def eval_contributions(
    cache: ScoringCache, pair_id: int, params: RankParams | None = None, top: int | None = 5
) -> pd.DataFrame:
    """Each eval pair's share of one pool pair's alignment: c_e = g̃_e·M̃⁻¹g̃(z) / n_eval (METHOD.md §4).

    ũ is the mean of the eval pairs' sketched gradients, so Σ_e c_e = Â(z) exactly (up to the fp16
    storage of g̃(z)); M̃ = C̃(α) + λI at sketch prefix k, as in `rank` with the same parameters (trak's
    solve for method 'trak', CHIPS's at `params` for any other method).
    Returns columns eval_pair_id, contribution, share (c_e / Â(z)), sorted by contribution, highest
    first: the `top` eval pairs z helps most and the `top` it hurts most (all when top is None).
    The frame's attrs hold alignment (Σ_e c_e), k, alpha and lam.
    """
    if cache.G_eval is None or cache.eval_ids is None:
        if cache.record.get("zero_shot"):
            raise PrepareError(
                f"{cache.root} was prepared against a label-only (zero-shot) eval set: it has no eval "
                "pairs, so per-eval-pair contributions do not exist"
            )
        raise PrepareError(
            f"{cache.root} holds no per-eval-pair gradients (prepared by an older version); "
            "re-run prepare into a new folder to see eval-pair contributions"
        )
    if top is not None and top < 1:
        raise ValueError(f"top must be at least 1 (or None for all), got {top}")
    from chips_core.scoring.curvature import newton_solve

    params = RankParams() if params is None else params
    alpha, damping, normalize = _newton_settings(params)
    k = _check_k(cache, params.k)
    C, u, info = _newton_system(cache, k, alpha, params.lam, damping=damping)
    g = cache.row(pair_id)[:k] / math.sqrt(k)
    w = newton_solve(C, g, info["lam"])
    contrib = cache.G_eval[:, :k].astype(np.float64) @ w / (math.sqrt(k) * len(cache.G_eval))
    if normalize:  # Â = (g̃/‖g̃‖)·M̃⁻¹(ũ/‖ũ‖): the same split, scaled
        contrib = contrib / max(float(np.linalg.norm(g) * np.linalg.norm(u)), 1e-300)
    total = float(contrib.sum())
    frame = pd.DataFrame(
        {
            "eval_pair_id": cache.eval_ids.astype(np.int64),
            "contribution": contrib,
            "share": contrib / total if total != 0 else np.nan,
        }
    ).sort_values("contribution", ascending=False, kind="stable")
    if top is not None and len(frame) > 2 * top:
        frame = pd.concat([frame.head(top), frame.tail(top)])
    frame = frame.reset_index(drop=True)
    frame.attrs.update(alignment=total, k=k, alpha=float(alpha), **info)
    return frame


def _stability(
    cache: ScoringCache, A: np.ndarray, k: int, alpha: float, lam: float, damping: str, normalize: bool
) -> tuple[float, int]:
    """Spearman between scores from sketch rows [0, k) and [k, 2k) on the first rows (a random subsample),
    at the same absolute λ."""
    if 2 * k > cache.k_max:
        return float("nan"), 0
    m = min(cache.n, STABILITY_ROWS)
    A2, _ = _newton_alignment(cache, k, alpha, lam, start=k, max_rows=m, damping=damping, normalize=normalize)
    return _spearman(A[:m], A2), m


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1…n of `a`, ties sharing their mean rank (scipy.stats.rankdata's 'average')."""
    order = np.argsort(a, kind="mergesort")
    ordered = a[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]
    group = np.empty(len(a), np.int64)
    group[order] = np.cumsum(first)
    ends = np.r_[np.flatnonzero(first), len(a)]
    return 0.5 * (ends[group] + ends[group - 1] + 1)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation, as scipy.stats.spearmanr computes it (Pearson's r of the average ranks;
    nan when either side holds a nan or is constant), without importing scipy.stats (a second on a
    dashboard server's first run)."""
    if len(a) < 2 or np.isnan(a).any() or np.isnan(b).any() or (a == a[0]).all() or (b == b[0]).all():
        return float("nan")
    return float(np.corrcoef(np.column_stack((_average_ranks(a), _average_ranks(b))), rowvar=False)[1, 0])


def reselect(result: RankResult, ratio: float) -> RankResult:
    """`result` with the selection ratio `ratio`: what `rank` returns for the same parameters at that ratio
    (the top ceil(ratio·N) ranks, guarded pairs never), without ranking again: a ratio change moves only
    the cut-off, so it costs O(N) instead of the Newton solves and the projections."""
    params = (result.params or RankParams()).replace(ratio=ratio)  # validates the ratio
    frame = result.frame.copy()
    n_sel = int(math.ceil(params.ratio * len(frame)))
    frame["selected"] = (frame["rank"].to_numpy() <= n_sel) & ~frame["guarded"].to_numpy(bool)
    info = {**result.info, "ratio": params.ratio, "n_selected": int(frame["selected"].sum())}
    return RankResult(frame, info, params)


def selection_change(before: RankResult, after: RankResult) -> dict[str, np.ndarray]:
    """Pair ids that enter and leave the selection between two rankings of the same pool."""
    a = before.frame.loc[before.frame["selected"], "pair_id"].to_numpy()
    b = after.frame.loc[after.frame["selected"], "pair_id"].to_numpy()
    return {"entering": np.setdiff1d(b, a), "leaving": np.setdiff1d(a, b)}


#: below this trace ratio tr Φ_pos / tr Φ_neg, α only rescales λ (METHOD.md §9 "inert α")
ALPHA_INERT_RATIO = 0.05


def guard_mask(clipscore: np.ndarray, guard: str, mads: float) -> tuple[np.ndarray, dict]:
    """(held-out mask, info): the pairs whose image and caption disagree, by CLIPScore outliers.

    'mad' holds out CLIPScore < median − mads·1.4826·MAD (MAD = median |c − median|): a robust low-tail
    outlier rule that needs no labels. 'none' holds out nothing.
    """
    if guard == "none":
        return np.zeros(len(clipscore), bool), {"guard": "none", "n_guarded": 0, "guard_threshold": None}
    if guard != "mad":
        raise ValueError(f"guard must be one of {', '.join(GUARDS)}, got {guard!r}")
    if mads <= 0:
        raise ValueError(f"guard_mads must be positive, got {mads}")
    med = float(np.median(clipscore))
    sigma = 1.4826 * float(np.median(np.abs(clipscore - med)))
    threshold = med - mads * sigma
    held = clipscore < threshold
    return held, {"guard": "mad", "guard_mads": float(mads), "guard_threshold": threshold,
                  "n_guarded": int(held.sum())}  # fmt: skip


def _table(
    ids: np.ndarray,
    A: np.ndarray,
    wl: np.ndarray,
    wr: np.ndarray,
    agree: np.ndarray,
    score: np.ndarray,
    ratio: float,
    guarded: np.ndarray,
):
    """The ranking: by score, descending, with guarded pairs after every other pair (their scores kept)."""
    n = len(ids)
    order = np.lexsort((-score, guarded))
    rank_ = np.empty(n, np.int64)
    rank_[order] = np.arange(1, n + 1)
    n_sel = int(math.ceil(ratio * n))
    frame = pd.DataFrame(
        {
            "pair_id": ids,
            "alignment": A,
            "learnability": wl,
            "relevance": wr,
            "agreement": agree,
            "score": score,
            "rank": rank_,
            "selected": (rank_ <= n_sel) & ~guarded,
            "guarded": guarded,
        }
    )
    return frame, n_sel


def _weights(cache: ScoringCache, beta: float, use_l: bool, use_r: bool) -> tuple[np.ndarray, np.ndarray]:
    one = np.ones(cache.n)
    wl = learnability(cache.column("one_minus_p"), cache.column("margin")) if use_l else one
    wr = relevance(cache.column("cos_x"), cache.column("cos_y"), beta) if use_r else one
    return wl, wr


def _per_cache(cache: ScoringCache, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """A per-pair array that depends on the cache alone (the agreement, CLIPScore's percentile), computed
    once and kept read-only in cache.memo, so that a slider step does not sort and fit the pool again."""
    if key not in cache.memo:
        value = compute()
        value.flags.writeable = False  # shared by every ranking of this cache
        cache.memo[key] = value
    return cache.memo[key]


def _finish(cache: ScoringCache, A: np.ndarray, info: dict, params: RankParams, weighted: bool) -> RankResult:
    """The ranking of alignments A under `params`: weights and the agreement (unless not `weighted`: the
    baselines stay literal), the guard and the selection. The `agreement` column (`weights.agreement`) is
    every pair's, whether or not it weighs in."""
    p = params
    use_l, use_r = (p.use_learnability, p.use_relevance) if weighted else (False, False)
    wl, wr = _weights(cache, p.beta, use_l, use_r)
    base = percentile(A) if p.rank_normalized and weighted else A
    clipscore = cache.column("clipscore")
    cols = ("clipscore", "cos_x", "cos_y")
    agree = _per_cache(cache, "agreement", lambda: agreement(*(cache.column(c) for c in cols)))
    gamma = p.agreement if weighted else 0.0
    delta = p.clipscore_weight if weighted else 0.0
    score = blend(base * wl * wr, agree, gamma)
    if delta:
        score = blend(score, _per_cache(cache, "clipscore_percentile", lambda: percentile(clipscore)), delta)
    guarded, guard_info = guard_mask(clipscore, p.guard_rule, p.guard_mads)
    frame, n_sel = _table(cache.pair_ids, A, wl, wr, agree, score, p.ratio, guarded)
    info.update(guard_info, agreement=gamma, clipscore_weight=delta)
    info.update(frac_positive=float(np.mean(A > 0)), n_selected=int(frame["selected"].sum()), n=cache.n)
    return RankResult(frame, info, params.replace(blocks=cache.config.blocks))


def _check_blocks(cache: ScoringCache, params: RankParams) -> None:
    if params.blocks is not None and params.blocks != cache.config.blocks:
        raise ValueError(
            f"blocks={params.blocks} asks for a scoring cache of those endpoint blocks, but {cache.root} "
            f"scores {cache.config.blocks}; prepare one with PrepareConfig(blocks={params.blocks!r}) "
            "(or leave blocks None)"
        )


def _solved_alignment(
    cache: ScoringCache,
    k: int,
    alpha: float,
    lam: float | None,
    damping: str,
    normalize: bool,
    stability: bool,
    stored: bool,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(Â, the solve's info) of rank's Newton methods, with the ranking stability when `stability`;
    `stored`: read from / written to the cache folder (`stored.py`), keyed by exactly these settings."""
    settings = stored_alignments.newton_settings(k, alpha, lam, damping, normalize)
    hit = stored_alignments.read(cache, settings) if stored else None
    if hit is not None and (not stability or hit[1].get("stability_rows") is not None):
        A, info = hit
        if not stability:  # as computed without it
            info = {key: v for key, v in info.items() if key not in ("stability", "stability_rows")}
        return A, info
    if hit is not None:  # stored without the stability: compute only that
        A, info = hit
    else:
        A, info = _newton_alignment(cache, k, alpha, lam, damping=damping, normalize=normalize)
    if stability:
        stab, m = _stability(cache, A, k, alpha, info["lam"], damping, normalize)
        info = {**info, "stability": stab, "stability_rows": m}
    if stored:
        stored_alignments.write(cache, settings, A, info)
    return A, info


def store_rankings(cache: ScoringCache, params: RankParams | None = None) -> list[RankResult]:
    """Rank `params` (default: RankParams()) with its stability, and at α = 0 and 1 (the ends of its α
    range, which the dashboard compares it with), storing each solve with the cache (`rank(...,
    stored=True)`): a first dashboard page on this cache then reads them instead of solving. A prepare
    calls it once the cache is finished."""
    p = RankParams() if params is None else params
    out = [rank(cache, p, stored=True)]
    if p.method == "chips":
        out += [rank(cache, p.replace(alpha=a), stability=False, stored=True) for a in (0.0, 1.0)]
    return out


def rank(
    cache: ScoringCache,
    params: RankParams | None = None,
    checkpoints: list[tuple[ScoringCache, float]] | None = None,
    *,
    stability: bool = True,
    stored: bool = False,
) -> RankResult:
    """Rank every pair of the cache's pool by `params.method`; keep the top ceil(ratio·N) (`selected`).

    chips: Â = g̃·(C̃(α) + λI)⁻¹ũ at sketch prefix k over the cache's parameter blocks, times w_L and w_R
    (each switchable; rank_normalized replaces Â by its rank in (0, 1]); with agreement γ > 0 the score is
    P(Â·w_L·w_R)^(1−γ)·agreement^γ (`weights.agreement`: the percentile of CLIPScore against pairs as
    close to the target), so that a pair ranks high only when it is expected to help and its image and
    caption agree; with clipscore_weight δ > 0 that score s becomes P(s)^(1−δ)·P(CLIPScore)^δ. λ: the
    `damping` rule's
    (`default_lambda`) unless given. normalize: unit-norm g̃ and ũ (LESS-style cosine in the Newton
    metric's numerator), so a pair's gradient size (its loss) does not decide its rank.
    guard: 'mad' holds CLIPScore outliers out of the selection before ranking (`guard_mask`), 'none'
    holds out nothing; None means 'mad' for chips and 'none' for the baselines, which stay literal.
    Baselines on the same features and batches: random (seeded), clipscore, dot (g̃·ũ), tracin
    (Σ_c η_c g̃_c·ũ_c over the `checkpoints` caches), trak (α = 0, w_L ≡ w_R ≡ 1, literal damping).
    k defaults to k_max/2 so that the ranking stability (Spearman of rows [0, k) vs [k, 2k)) is reported;
    `stability=False` skips it (a second solve and a Spearman over up to STABILITY_ROWS rows; info
    'stability' None) for a ranking only compared with others.
    `params` defaults to RankParams() (the default preset); RankParams validates every value.
    `stored=True` (chips, trak): read the Newton solve's alignment from the cache folder when an earlier
    call stored it, and store it when computed (`stored.py`): the same result, without the solve and the
    projection (nor the torch import) when it is there.
    """
    p = RankParams() if params is None else params
    if not isinstance(p, RankParams):
        raise TypeError(f"rank takes a RankParams, got {type(p).__name__}")
    _check_blocks(cache, p)
    method = p.method
    k = _check_k(cache, p.k)
    info: dict[str, Any] = {
        "method": method,
        "k": k,
        "k_max": cache.k_max,
        "blocks": cache.config.blocks,
        "alpha": p.alpha,
        "beta": p.beta,
        "ratio": p.ratio,
        "lam": None,
        "lam_star": None,
        "d_over_k": None,
        "stability": None,
    }
    if method in ("chips", "trak"):
        a, damp, norm = _newton_settings(p)
        A, sys_info = _solved_alignment(cache, k, a, p.lam, damp, norm, stability, stored)
        info.update(sys_info, alpha=a, damping=damp, normalize=norm)
        return _finish(cache, A, info, p, weighted=method == "chips")
    if method == "random":
        A = np.random.default_rng(p.seed).random(cache.n)
    elif method == "clipscore":
        A = cache.column("clipscore").copy()
    elif method == "dot":
        A = project(cache, cache.u[:k], 0) / k
    else:  # tracin
        if not checkpoints:
            raise ValueError(
                "tracin needs checkpoints: a list of (ScoringCache, eta) from checkpoint feature runs"
            )
        A = np.zeros(cache.n)
        for other, eta in checkpoints:
            if other.n != cache.n or not np.array_equal(other.pair_ids, cache.pair_ids):
                raise ValueError(
                    f"checkpoint cache {other.root} has other pairs or batches than {cache.root}"
                )
            kk = min(k, other.k_max)
            A += float(eta) * project(other, other.u[:kk], 0) / kk
    return _finish(cache, A, info, p, weighted=False)


def rank_exact(
    cache: ScoringCache,
    pool: FeatureSource,
    endpoint: Any,
    params: RankParams | None = None,
    tol: float = 1e-8,
    maxiter: int = 2000,
) -> RankResult:
    """CHIPS without a sketch (the paper's "w/o JL"): x = M⁻¹u by CG in the full endpoint space.

    Uses the cache's batches, seeds, sampled negatives, parameter blocks and full-space u; λ defaults to
    the damping rule's λ from the sketched curvature at prefix k, so the two rankings are comparable at
    the same absolute λ. normalize divides by the exact ‖g_i‖ (forms each batch's per-sample gradients:
    B·p floats). Reads pool features again (float64), runs no encoder. `endpoint`: the model's
    EndpointParams; `params.method` must be chips.
    """
    import torch

    from chips_core.scoring.curvature import effective_dimension, lambda_star
    from chips_core.scoring.endpoint import grads_from_state, mask_grads, parse_blocks
    from chips_core.scoring.exact import ExactSystem, exact_scores
    from chips_core.scoring.prepare import exact_batches

    p = RankParams() if params is None else params
    if p.method != "chips":
        raise ValueError(f"rank_exact computes CHIPS only (method 'chips'), got method {p.method!r}")
    _check_blocks(cache, p)
    alpha, damping, normalize = p.alpha, p.damping, p.normalize
    k = _check_k(cache, p.k)
    _, _, eigs = sketched_system(cache, k, alpha)
    lam_s = lambda_star(eigs, k / 4)
    lam_base = default_lambda(eigs, k, damping)
    lam_used = lam_base if p.lam is None else float(p.lam)
    p64 = endpoint.to(dtype=torch.float64)
    cfg = cache.config
    blocks = parse_blocks(cfg.blocks)
    curv = list(exact_batches(cache, pool, p64, range(cache.meta["n_curvature_batches"])))
    system = ExactSystem(p64, curv, alpha, lam_used, cfg.negatives_per_row, cfg.seed, blocks)
    u = system.mask * torch.from_numpy(cache.u_full)
    if normalize:
        u = u / u.norm()
    x, cg = system.solve(u, tol=tol, maxiter=maxiter)
    parts = []
    for _, st in exact_batches(cache, pool, p64):
        a = exact_scores(st, x, p64, cfg.negatives)
        if normalize:
            a = a / mask_grads(grads_from_state(st, cfg.negatives), blocks).flat().norm(dim=1)
        parts.append(a)
    A = torch.cat(parts).numpy()
    info = {
        "method": "chips",
        "exact": True,
        "k": k,
        "blocks": cfg.blocks,
        "alpha": alpha,
        "beta": p.beta,
        "ratio": p.ratio,
        "lam": lam_used,
        "lam_base": lam_base,
        "lam_star": lam_s,
        "damping": damping,
        "normalize": normalize,
        "d_over_k": effective_dimension(eigs, lam_used) / k,
        "stability": None,
        "cg_iterations": cg.iterations,
        "cg_rel_residual": cg.rel_residual,
    }
    return _finish(cache, A, info, p, weighted=True)

"""prepare → ScoringCache → rank on small real arrays (float64), resume after an interruption, baselines."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from chips_core.scoring.batches import assign_batches
from chips_core.scoring.cache import PrepareError, ScoringCache
from chips_core.scoring.curvature import CurvatureAccumulator, combine, eigenvalues, lambda_star, newton_solve
from chips_core.scoring.endpoint import (
    EndpointGrads,
    EndpointParams,
    batch_grad_sum,
    batch_state,
    grads_from_state,
    zeroshot_grad_sum,
)
from chips_core.scoring.exact import unflat
from chips_core.scoring.params import PrepareConfig, RankParams
from chips_core.scoring.prepare import ArrayFeatures, ZeroShotEval, prepare
from chips_core.scoring.ranking import (
    eval_contributions,
    guard_mask,
    project,
    rank,
    rank_exact,
    reselect,
    sketched_system,
)
from chips_core.scoring.sketch import make_sketch
from chips_core.scoring.weights import agreement, percentile

pytestmark = pytest.mark.unit

D, DV, DT = 6, 10, 8


def _params(seed=0, theta=2.3):
    g = torch.Generator().manual_seed(seed)
    return EndpointParams(
        torch.randn(D, DV + 1, generator=g, dtype=torch.float64),
        torch.randn(D, DT, generator=g, dtype=torch.float64),
        torch.tensor(theta, dtype=torch.float64),
        v_bias=True,
    )


def _features(n, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4))  # shared latent: pairs are aligned, as real image-text pairs are
    h = z @ rng.standard_normal((4, DV)) + 0.5 * rng.standard_normal((n, DV))
    t = z @ rng.standard_normal((4, DT)) + 0.5 * rng.standard_normal((n, DT))
    ids = rng.integers(-(2**62), 2**62, size=n)
    return ArrayFeatures(ids, h.astype(np.float16), t.astype(np.float16), shard_size=50)


CFG = PrepareConfig(
    k_max=64,
    batch_size=24,
    seed=3,
    curvature_pairs=100,
    negatives_per_row=4,
    chunk_batches=3,
    dtype="float64",
)


ALL_BLOCKS = "visual,text,temperature"


@pytest.fixture(scope="module", params=["visual,text", ALL_BLOCKS])
def built(request, tmp_path_factory):
    """The default cache (no temperature block) and the paper's (every endpoint block)."""
    pool, ev, params = _features(230, 1), _features(60, 2), _params()
    cfg = PrepareConfig(**{**CFG.__dict__, "blocks": request.param})
    cache = prepare(pool, ev, params, cfg, tmp_path_factory.mktemp("c") / "cache")
    return pool, ev, params, cache


def _zero_blocks(g: EndpointGrads, blocks: str) -> EndpointGrads:
    """g with the blocks outside `blocks` zeroed, written out here (independent of chips_core's mask)."""
    keep = blocks.split(",")
    return EndpointGrads(
        g.G_v * ("visual" in keep), g.G_t * ("text" in keep), g.g_theta * ("temperature" in keep)
    )


def _reference_G(pool, params, cfg):
    """Sketched gradients recomputed batch by batch in float64 (no quantisation), in cache order: the
    unrestricted sketch applied to full-space gradients whose unscored blocks are zeroed."""
    full_sk = make_sketch(cfg.sketch, params, cfg.k_max, cfg.seed)
    sk = make_sketch(cfg.sketch, params, cfg.k_max, cfg.seed, tuple(cfg.blocks.split(",")))
    out, acc = [], CurvatureAccumulator(cfg.k_max, cfg.negatives_per_row, cfg.seed)
    batches = assign_batches(pool.pair_ids(), cfg.batch_size, cfg.seed)
    n_curv = math.ceil(cfg.curvature_pairs / len(batches[0]))
    for b, rows in enumerate(batches):
        h, t = pool.rows(rows)
        st = batch_state(torch.from_numpy(h).double(), torch.from_numpy(t).double(), params)
        out.append(full_sk.apply(_zero_blocks(grads_from_state(st, cfg.negatives), cfg.blocks)))
        if b < n_curv:
            acc.add(sk, st, b)
    return torch.cat(out).numpy(), acc, full_sk


def test_cache_matches_direct_computation(built):
    pool, ev, params, cache = built
    G, acc, sk = _reference_G(pool, params, cache.config)
    assert cache.n == 230 and len(cache.pair_ids) == 230
    order = np.concatenate(assign_batches(pool.pair_ids(), CFG.batch_size, CFG.seed))
    assert np.array_equal(cache.pair_ids, pool.pair_ids()[order])
    pos, neg = acc.result()
    assert np.allclose(cache.phi_pos, pos) and np.allclose(cache.phi_neg, neg)
    # ũ is the sketched mean eval gradient over the eval set's own batches
    u = None
    for rows in assign_batches(ev.pair_ids(), CFG.batch_size, CFG.seed):
        h, t = ev.rows(rows)
        g = batch_grad_sum(torch.from_numpy(h).double(), torch.from_numpy(t).double(), params).flat()
        u = g if u is None else u + g
    u = _zero_blocks(unflat(u[0] / 60, params), cache.config.blocks)
    assert np.allclose(cache.u, sk.apply(u)[0].numpy())
    assert np.allclose(cache.u_full, u.flat()[0].numpy())
    assert (cache.u_full[-1] == 0) == ("temperature" not in cache.config.blocks)
    # fp16 storage with per-row, per-block scales keeps every row to ~1e-3 relative
    x = np.random.default_rng(0).standard_normal(64)
    got, ref = project(cache, x), G @ x
    assert np.max(np.abs(got - ref)) < 3e-3 * np.abs(G).max(1).mean() * np.abs(x).sum()
    assert spearmanr(got, ref).statistic > 0.9999


def _reference_alignment(cache, G, k, alpha, lam, normalize):
    C = combine(cache.phi_pos[:k, :k], cache.phi_neg[:k, :k], alpha) / k
    u = cache.u[:k] / math.sqrt(k)
    if normalize:
        u = u / np.linalg.norm(u)
    x = np.linalg.solve(C + lam * np.eye(k), u)
    Gk = G[:, :k] / math.sqrt(k)
    A = Gk @ x
    return A / np.linalg.norm(Gk, axis=1) if normalize else A


def test_rank_chips_paper_preset_against_reference(built):
    pool, ev, params, cache = built
    G, _, _ = _reference_G(pool, params, cache.config)
    k, alpha = 32, 0.7
    res = rank(
        cache,
        RankParams(
            alpha=alpha,
            k=k,
            ratio=0.25,
            damping="dimension",
            normalize=False,
            guard="none",
            agreement=0.0,
            clipscore_weight=0.0,
        ),
    )
    C = combine(cache.phi_pos[:k, :k], cache.phi_neg[:k, :k], alpha) / k
    lam = lambda_star(eigenvalues(C), k / 4)
    A = _reference_alignment(cache, G, k, alpha, lam, False)
    f = res.frame
    assert list(f.columns) == [
        "pair_id",
        "alignment",
        "learnability",
        "relevance",
        "agreement",
        "score",
        "rank",
        "selected",
        "guarded",
    ]
    assert np.allclose(f["alignment"], A, rtol=0, atol=5e-3 * np.abs(A).max())
    assert spearmanr(f["alignment"], A).statistic > 0.999
    # d(λ*) = k/4 written out from a brute-force eigen-sum, not the library's effective_dimension
    sig = np.linalg.eigvalsh(C)
    assert np.sum(sig / (sig + res.info["lam"])) == pytest.approx(k / 4, rel=1e-6)
    assert res.info["lam"] == pytest.approx(lam) and res.info["d_over_k"] == pytest.approx(0.25, abs=1e-6)
    assert sorted(f["rank"]) == list(range(1, 231)) and f["selected"].sum() == math.ceil(0.25 * 230)
    assert res.info["n_selected"] == 58 and not f["guarded"].any()
    assert res.info["frac_positive"] == pytest.approx(np.mean(f["alignment"] > 0))
    assert np.isfinite(res.info["stability"]) and -1 <= res.info["stability"] <= 1
    best = f.loc[f["rank"] == 1]
    assert float(best["score"].iloc[0]) == f["score"].max()
    assert np.allclose(f["score"], f["alignment"] * f["learnability"] * f["relevance"])
    # learnability written out from the stored columns: (1 − p_corr)(1 + σ(−m))
    p_corr, margin = cache.column("p_corr"), cache.column("margin")
    assert np.allclose(f["learnability"], (1 - p_corr) * (1 + 1 / (1 + np.exp(margin))), rtol=1e-6)
    # stability: Spearman of rows [0, k) against rows [k, 2k) at the same λ, computed here
    C2 = combine(cache.phi_pos[k:, k:], cache.phi_neg[k:, k:], alpha) / k
    x2 = np.linalg.solve(C2 + lam * np.eye(k), cache.u[k:] / math.sqrt(k))
    assert res.info["stability"] == pytest.approx(spearmanr(A, G[:, k:] @ x2).statistic, abs=0.01)
    # …and it is scipy's Spearman of the two halves' scores to the last bit (rank computes it without scipy)
    C2s, u2, _ = sketched_system(cache, k, alpha, start=k)
    A2 = project(cache, newton_solve(C2s, u2, res.info["lam"]), start=k) / math.sqrt(k)
    assert res.info["stability"] == spearmanr(f["alignment"], A2).statistic
    # λ is honoured, k defaults to k_max/2, stability needs 2k ≤ k_max
    assert rank(cache, RankParams(lam=10 * lam, k=k)).info["d_over_k"] < 0.25
    assert rank(cache).info["k"] == 32
    assert (
        rank(cache, RankParams(k=64)).info["stability"] != rank(cache, RankParams(k=64)).info["stability"]
    )  # NaN: no second half
    with pytest.raises(ValueError, match="k must lie"):
        rank(cache, RankParams(k=65))


@pytest.mark.parametrize("k", [16, 32, 64])
def test_rank_chips_default_against_reference(built, k):
    """The default: λ = 0.1·tr C̃ (the same at every k in expectation), unit-norm g̃ and ũ, MAD guard."""
    pool, ev, params, cache = built
    G, _, _ = _reference_G(pool, params, cache.config)
    res = rank(cache, RankParams(k=k, ratio=0.2))
    C = combine(cache.phi_pos[:k, :k], cache.phi_neg[:k, :k], 0.7) / k
    lam = 0.1 * np.trace(C)
    assert res.info["lam"] == pytest.approx(lam, rel=1e-9) and res.info["damping"] == "trace"
    A = _reference_alignment(cache, G, k, 0.7, lam, True)
    f = res.frame
    assert np.allclose(f["alignment"], A, rtol=0, atol=5e-3 * np.abs(A).max())
    assert np.abs(f["alignment"]).max() <= 1 / (lam * (1 - 1e-9)) + 1e-9  # |ĝ·M⁻¹û| ≤ 1/λ
    # the guard: CLIPScore below median − 2.5·1.4826·MAD, held out of the selection and ranked last
    cs = cache.column("clipscore")
    med = np.median(cs)
    held = cs < med - 2.5 * 1.4826 * np.median(np.abs(cs - med))
    assert np.array_equal(f["guarded"].to_numpy(), held) and res.info["n_guarded"] == held.sum()
    assert not (f["selected"] & f["guarded"]).any()
    if held.any():
        assert f.loc[f["guarded"], "rank"].min() > f.loc[~f["guarded"], "rank"].max()
    kept = f.loc[~f["guarded"]].sort_values("rank")
    assert kept["score"].is_monotonic_decreasing
    assert f["selected"].sum() == min(math.ceil(0.2 * 230), (~held).sum())
    # the default weights: s = P(CHIPS)^¼ · agreement^¾ (agreement 0.75), then P(s)^¾ · P(CLIPScore)^¼
    # (CLIPScore weight 0.25), every pool percentile written out by counting
    chips = f["alignment"] * f["learnability"] * f["relevance"]
    agree = _agreement_reference(cache)
    assert np.allclose(f["agreement"], agree)
    s = _share_at_or_below(chips) ** 0.25 * agree**0.75
    assert np.allclose(f["score"], _share_at_or_below(s) ** 0.75 * _share_at_or_below(cs) ** 0.25)
    off = rank(cache, RankParams(k=k, ratio=0.2, agreement=0.0, clipscore_weight=0.0)).frame
    assert np.allclose(off["score"], chips) and np.array_equal(
        off["guarded"], f["guarded"]
    )  # its own control


def _share_at_or_below(x) -> np.ndarray:
    """P(x): for each value, the share of all values at or below it (brute force)."""
    x = np.asarray(x, dtype=np.float64)
    return (x[None, :] <= x[:, None]).sum(1) / len(x)


def _agreement_reference(cache) -> np.ndarray:
    """CLIPScore's residual from its least-squares fit on (1, cos_x, cos_y), by the normal equations, as
    a percentile by counting."""
    cs, cx, cy = (cache.column(c).astype(np.float64) for c in ("clipscore", "cos_x", "cos_y"))
    X = np.column_stack([np.ones_like(cs), cx, cy])
    return _share_at_or_below(cs - X @ np.linalg.solve(X.T @ X, X.T @ cs))


def test_agreement_compares_pairs_equally_close_to_the_target():
    """The agreement ignores the part of CLIPScore that closeness to the target explains: adding any linear
    function of the relevance cosines changes nothing, while a caption that fits worse ranks lower."""
    rng = np.random.default_rng(0)
    cx, cy, noise = rng.normal(size=(3, 400))
    base = agreement(0.1 * noise, cx, cy)
    assert np.allclose(agreement(0.1 * noise + 3.0 * cx - 2.0 * cy + 1.0, cx, cy), base)
    familiar = 0.1 * noise - 2.0 * cx  # off-target pairs (low cos_x) the model reads well score high
    assert np.allclose(agreement(familiar, cx, cy), base)
    worse = noise.copy()
    worse[:20] -= 5.0  # twenty captions that fit their images badly
    assert agreement(0.1 * worse, cx, cy)[:20].max() < 0.1
    assert not np.allclose(percentile(familiar), base)  # raw CLIPScore's percentile would differ
    # a pair without a finite CLIPScore ranks last and leaves the others' fit alone; an exact fit is a tie
    holed = 0.1 * noise.copy()
    holed[5] = np.nan
    got = agreement(holed, cx, cy)
    keep = np.arange(400) != 5
    assert got[5] == 0.0 and np.allclose(got[keep] * 400 / 399, agreement(holed[keep], cx[keep], cy[keep]))
    assert (agreement(1.0 + 2.0 * cx, cx, cy) == 1.0).all()  # CLIPScore explained exactly: every pair ties
    assert list(percentile(np.array([2.0, np.nan, 1.0, np.inf]))) == [0.5, 0.0, 0.25, 0.0]


def test_agreement_weight_moves_between_chips_and_agreement(built):
    """γ = 0: the CHIPS score itself; γ = 1: the agreement's order; the γ in between, P^(1−γ)·agreement^γ
    by counting; baselines ignore it; the agreement column is there for every method."""
    cache = built[3]
    agree = _agreement_reference(cache)
    plain = rank(cache, RankParams(k=16, guard="none", agreement=0.0, clipscore_weight=0.0)).frame
    product = plain["alignment"] * plain["learnability"] * plain["relevance"]
    assert np.allclose(plain["score"], product) and np.allclose(plain["agreement"], agree)
    only = rank(cache, RankParams(k=16, guard="none", agreement=1.0, clipscore_weight=0.0)).frame
    assert np.allclose(only["score"], agree)
    quarter = rank(cache, RankParams(k=16, guard="none", agreement=0.25, clipscore_weight=0.0))
    want = _share_at_or_below(product) ** 0.75 * agree**0.25
    assert np.allclose(quarter.frame["score"], want) and quarter.info["agreement"] == 0.25
    top = quarter.frame.sort_values("rank")["pair_id"].to_numpy()
    assert (top == plain["pair_id"].to_numpy()[np.lexsort((np.arange(len(want)), -want))]).all()
    # agreement lowers the rank of the pairs whose image and caption agree least
    worst = np.argsort(agree)[:10]
    assert quarter.frame["rank"].to_numpy()[worst].mean() > plain["rank"].to_numpy()[worst].mean()
    dot = rank(cache, RankParams(method="dot", k=16, agreement=1.0))
    assert dot.info["agreement"] == 0.0 and np.allclose(dot.frame["score"], dot.frame["alignment"])


def test_clipscore_weight_moves_between_the_score_and_clipscore(built):
    """δ = 0: the score without it; δ = 1: CLIPScore's order; δ in between, P(s)^(1−δ)·P(CLIPScore)^δ by
    counting; the baselines ignore it; the paper preset has none."""
    cache = built[3]
    cs = cache.column("clipscore").astype(np.float64)
    without = rank(cache, RankParams(k=16, guard="none", clipscore_weight=0.0)).frame
    s = without["score"].to_numpy()
    only = rank(cache, RankParams(k=16, guard="none", clipscore_weight=1.0)).frame
    assert np.allclose(only["score"], _share_at_or_below(cs))
    assert (only.sort_values("rank")["pair_id"].to_numpy() == without["pair_id"].to_numpy()[
        np.lexsort((np.arange(len(cs)), -_share_at_or_below(cs)))
    ]).all()  # fmt: skip
    third = rank(cache, RankParams(k=16, guard="none", clipscore_weight=1 / 3))
    want = _share_at_or_below(s) ** (2 / 3) * _share_at_or_below(cs) ** (1 / 3)
    assert np.allclose(third.frame["score"], want) and third.info["clipscore_weight"] == pytest.approx(1 / 3)
    assert not np.allclose(
        third.frame["score"], _share_at_or_below(s) ** (1 / 3) * _share_at_or_below(cs) ** (2 / 3)
    )
    dot = rank(cache, RankParams(method="dot", k=16, clipscore_weight=1.0))
    assert dot.info["clipscore_weight"] == 0.0 and np.allclose(dot.frame["score"], dot.frame["alignment"])
    assert RankParams.preset("paper").clipscore_weight == 0.0 and RankParams().clipscore_weight == 0.25


def test_guard_catches_planted_outliers_and_switches_off(built):
    pool, ev, params, cache = built
    cs = cache.column("clipscore")
    mads = RankParams().guard_mads
    held, info = guard_mask(np.concatenate([cs, [cs.min() - 5.0]]), "mad", mads)
    assert held[-1] and info["guard"] == "mad" and info["guard_threshold"] < np.median(cs)
    assert not guard_mask(cs, "none", mads)[0].any()
    with pytest.raises(ValueError, match="guard"):
        guard_mask(cs, "median", mads)
    with pytest.raises(ValueError, match="guard"):
        RankParams(guard="median")
    off = rank(cache, RankParams(k=16, guard="none"))
    assert not off.frame["guarded"].any() and off.info["n_guarded"] == 0
    assert not rank(cache, RankParams(method="dot", k=16)).frame["guarded"].any()  # baselines stay literal


@pytest.mark.parametrize("method", ["chips", "dot"])
def test_reselect_equals_ranking_again_at_the_new_ratio(built, method):
    cache = built[3]
    base = rank(cache, RankParams(method=method, k=16, ratio=0.3, guard_mads=1.0))
    assert base.info["n_guarded"] > 0 or method == "dot"  # the guard's pairs stay out of every selection
    for ratio in (0.05, 0.5, 1.0):
        want = rank(cache, RankParams(method=method, k=16, ratio=ratio, guard_mads=1.0))
        got = reselect(base, ratio)
        pd.testing.assert_frame_equal(got.frame, want.frame)
        assert got.params == want.params and got.info["n_selected"] == want.info["n_selected"]
        assert got.info["ratio"] == ratio
    assert base.info["ratio"] == 0.3 and base.frame["selected"].sum() == base.info["n_selected"]  # unchanged
    with pytest.raises(ValueError, match="ratio"):
        reselect(base, 0.0)


def test_damping_rules_and_normalisation_change_the_ranking(built):
    pool, ev, params, cache = built
    trace = rank(cache, RankParams(k=32, guard="none", normalize=False))
    dim = rank(cache, RankParams(k=32, guard="none", normalize=False, damping="dimension"))
    assert trace.info["lam"] != pytest.approx(dim.info["lam"])
    assert dim.info["lam"] == pytest.approx(trace.info["lam_star"])
    unit = rank(cache, RankParams(k=32, guard="none", normalize=True))
    G, _, _ = _reference_G(pool, params, cache.config)
    norms = np.linalg.norm(G[:, :32], axis=1)
    # normalising divides each Â by ‖g̃‖ (and by a constant ‖ũ‖): the rank order changes with the norms
    ratio = trace.frame["alignment"] / unit.frame["alignment"]
    assert spearmanr(ratio, norms).statistic > 0.999
    with pytest.raises(ValueError, match="damping"):
        rank(cache, RankParams(damping="k/4"))


def test_flags_and_baselines(built):
    pool, ev, params, cache = built
    off = rank(
        cache,
        RankParams(
            use_learnability=False,
            use_relevance=False,
            k=16,
            guard="none",
            agreement=0.0,
            clipscore_weight=0.0,
        ),
    )
    assert (off.frame["learnability"] == 1).all() and np.allclose(off.frame["score"], off.frame["alignment"])
    rn = rank(
        cache, RankParams(rank_normalized=True, k=16, guard="none", agreement=0.0, clipscore_weight=0.0)
    ).frame
    assert (rn["score"] > 0).all()
    ranks_a = rn["alignment"].rank(method="first").to_numpy() / len(rn)
    assert np.allclose(rn["score"], ranks_a * rn["learnability"] * rn["relevance"])
    r1, r2 = (
        rank(cache, RankParams(method="random", seed=1)),
        rank(cache, RankParams(method="random", seed=1)),
    )
    assert np.array_equal(r1.frame["rank"], r2.frame["rank"])
    assert not np.array_equal(
        r1.frame["rank"], rank(cache, RankParams(method="random", seed=2)).frame["rank"]
    )
    cs = rank(cache, RankParams(method="clipscore")).frame
    assert np.allclose(cs["score"], cache.column("clipscore"))
    G, _, _ = _reference_G(pool, params, cache.config)
    dot = rank(cache, RankParams(method="dot", k=16)).frame
    assert spearmanr(dot["score"], G[:, :16] @ cache.u[:16]).statistic > 0.999
    trak = rank(cache, RankParams(method="trak", k=16))
    assert trak.info["alpha"] == 0.0 and (trak.frame["relevance"] == 1).all()
    assert (trak.frame["learnability"] == 1).all() and trak.info["damping"] == "dimension"
    C = cache.phi_pos[:16, :16] / 16
    x = np.linalg.solve(C + trak.info["lam"] * np.eye(16), cache.u[:16] / 4)
    assert spearmanr(trak.frame["score"], G[:, :16] @ x).statistic > 0.999
    with pytest.raises(ValueError, match="unknown method"):
        rank(cache, RankParams(method="influence"))
    with pytest.raises(ValueError, match="checkpoints"):
        rank(cache, RankParams(method="tracin"))


def test_tracin_sums_checkpoint_dots(built, tmp_path):
    pool, ev, params, cache = built
    other = prepare(pool, ev, _params(seed=9), CFG, tmp_path / "ckpt")
    res = rank(cache, RankParams(method="tracin", k=16), checkpoints=[(cache, 0.5), (other, 2.0)])
    d1 = rank(cache, RankParams(method="dot", k=16)).frame["score"].to_numpy()
    d2 = rank(other, RankParams(method="dot", k=16)).frame["score"].to_numpy()
    assert np.allclose(res.frame["score"], 0.5 * d1 + 2.0 * d2)


def test_resume_after_interruption_gives_same_cache(built, tmp_path):
    pool, ev, params, cache = built
    calls = []

    def stop_after_two(p):
        calls.append(p)
        if p.stage == "pool" and len([c for c in calls if c.stage == "pool"]) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(pool, ev, params, cache.config, tmp_path / "r", progress=stop_after_two)
    assert not (tmp_path / "r" / "meta.json").exists()
    done = sorted(p.name for p in (tmp_path / "r").glob("chunk-*") if (p / "done.json").exists())
    assert len(done) == 2
    mtime = (tmp_path / "r" / done[0] / "G.npy").stat().st_mtime_ns
    seen = []
    resumed = prepare(pool, ev, params, cache.config, tmp_path / "r", progress=seen.append)
    assert (tmp_path / "r" / done[0] / "G.npy").stat().st_mtime_ns == mtime
    assert seen[0].stage == "pool" and seen[0].done > 2 * 3 * 20  # started after the two finished chunks
    for a, b in zip(resumed.G, cache.G, strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(resumed.phi_neg, cache.phi_neg)
    with pytest.raises(PrepareError, match="different config"):
        prepare(pool, ev, params, PrepareConfig(k_max=32, dtype="float64"), tmp_path / "r")


def test_self_only_and_zero_shot(built, tmp_path):
    pool, ev, params, cache = built
    cfg = PrepareConfig(
        **{**json.loads((cache.root / "config.json").read_text())["config"], "negatives": "self"}
    )
    zcfg = PrepareConfig(**{**CFG.__dict__, "blocks": cache.config.blocks})
    selfo = prepare(pool, ev, params, cfg, tmp_path / "self")
    assert not np.allclose(project(selfo, np.ones(64)), project(cache, np.ones(64)))
    rng = np.random.default_rng(4)
    zs = ZeroShotEval(rng.standard_normal((40, DV)), rng.integers(0, 3, 40), rng.standard_normal((3, DT)))
    z = prepare(pool, zs, params, zcfg, tmp_path / "zs")
    u = zeroshot_grad_sum(
        torch.from_numpy(zs.h), torch.from_numpy(zs.labels), torch.from_numpy(zs.class_t), params
    )
    assert np.allclose(z.u_full, _zero_blocks(u, cache.config.blocks).flat()[0].numpy() / 40)
    assert z.record["zero_shot"] and len(rank(z, RankParams(k=16)).frame) == 230
    with pytest.raises(PrepareError, match="zero-shot"):
        eval_contributions(z, int(z.pair_ids[0]))


def test_eval_contributions_sum_to_alignment(built, tmp_path):
    pool, ev, params, cache = built
    # G_eval holds every eval pair once, with its id, and ũ is exactly their mean
    assert cache.G_eval.shape == (60, 64) and cache.G_eval.dtype == np.float32
    assert sorted(cache.eval_ids) == sorted(ev.pair_ids())
    assert np.allclose(
        cache.G_eval.astype(np.float64).mean(0), cache.u, rtol=1e-5, atol=1e-6 * np.abs(cache.u).max()
    )
    k, alpha = 32, 0.5
    res = rank(cache, RankParams(alpha=alpha, k=k))
    lam = res.info["lam"] * 3
    res = rank(cache, RankParams(alpha=alpha, k=k, lam=lam)).frame.set_index("pair_id")
    A = res["alignment"]
    scale = np.abs(A).max()
    for pid in (A.idxmax(), A.idxmin(), int(cache.pair_ids[100])):
        full = eval_contributions(cache, pid, RankParams(alpha=alpha, lam=lam, k=k), top=None)
        assert len(full) == 60 and set(full["eval_pair_id"]) == set(ev.pair_ids())
        assert full["contribution"].is_monotonic_decreasing
        assert full["contribution"].sum() == pytest.approx(full.attrs["alignment"])
        assert full.attrs["alignment"] == pytest.approx(A[pid], abs=3e-3 * scale)
        assert full["share"].sum() == pytest.approx(1.0)
        top = eval_contributions(cache, pid, RankParams(alpha=alpha, lam=lam, k=k), top=3)
        assert list(top["eval_pair_id"]) == list(full["eval_pair_id"].iloc[[0, 1, 2, -3, -2, -1]])
    # a different α changes the solve, so the contributions change
    other = eval_contributions(cache, pid, RankParams(alpha=0.0, lam=lam, k=k), top=None)
    assert not np.allclose(np.sort(other["contribution"]), np.sort(full["contribution"]))
    with pytest.raises(KeyError, match="not in the scoring cache"):
        eval_contributions(cache, 12345)
    # a cache prepared before per-eval-pair gradients were stored still loads, and says to re-run prepare
    old = tmp_path / "old"
    old.mkdir()
    for f in cache.root.iterdir():
        if f.is_dir():
            (old / f.name).symlink_to(f)
        elif f.name != "eval.npz":
            (old / f.name).write_bytes(f.read_bytes())
    e = np.load(cache.root / "eval.npz")
    np.savez(old / "eval.npz", **{n: e[n] for n in e.files if n not in ("G_eval", "eval_ids")})
    legacy = ScoringCache.load(old)
    assert np.allclose(
        rank(legacy, RankParams(k=k)).frame["alignment"], rank(cache, RankParams(k=k)).frame["alignment"]
    )
    with pytest.raises(PrepareError, match="re-run prepare"):
        eval_contributions(legacy, pid)


@pytest.mark.parametrize("normalize", [False, True])
def test_exact_rank_runs_and_agrees_at_large_lambda(built, normalize):
    pool, ev, params, cache = built
    sk = rank(cache, RankParams(k=64, lam=1e3, normalize=normalize))
    ex = rank_exact(cache, pool, params, RankParams(k=64, lam=1e3, normalize=normalize))
    assert ex.info["exact"] and ex.info["cg_rel_residual"] < 1e-8
    # at large λ both approach g·u/λ (the sketch of a dot product is unbiased): clearly positive agreement
    assert spearmanr(sk.frame["alignment"], ex.frame["alignment"]).statistic > 0.5
    # the exact score lives in the same blocks: at large λ it is (g_S·u_S)/λ, written out here
    ref = []
    for rows in assign_batches(pool.pair_ids(), CFG.batch_size, CFG.seed):
        h, t = pool.rows(rows)
        st = batch_state(torch.from_numpy(h).double(), torch.from_numpy(t).double(), params)
        ref.append(_zero_blocks(grads_from_state(st, "all"), cache.config.blocks).flat())
    g = torch.cat(ref).numpy()
    u = cache.u_full
    ref_a = g @ u / np.linalg.norm(g, axis=1) / np.linalg.norm(u) if normalize else g @ u
    assert spearmanr(ex.frame["alignment"], ref_a).statistic > 0.99


def test_bad_inputs_named(tmp_path):
    with pytest.raises(PrepareError, match="not a finished scoring cache"):
        ScoringCache.load(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        PrepareConfig(dtype="float16").validate()
    with pytest.raises(ValueError, match="differ in length"):
        ArrayFeatures(np.arange(3), np.zeros((2, 4)), np.zeros((3, 4)))


def test_rank_params_validate_and_presets():
    """RankParams checks every value in one place, naming the parameter; presets are RankParams."""
    assert RankParams() == RankParams.preset("default", blocks=None)
    paper = RankParams.preset("paper", alpha=0.5)
    assert (paper.blocks, paper.damping, paper.normalize, paper.guard, paper.alpha) == (
        ALL_BLOCKS,
        "dimension",
        False,
        "none",
        0.5,
    )
    assert paper.agreement == 0.0 and RankParams().agreement == 0.75
    assert RankParams.preset("paper", agreement=0.5).agreement == 0.5  # an explicit value wins
    assert RankParams().guard_rule == "mad" and RankParams(method="dot").guard_rule == "none"
    assert RankParams(blocks="text, visual").blocks == "visual,text"
    for bad, name in (
        ({"alpha": 1.5}, "alpha"),
        ({"beta": -0.1}, "beta"),
        ({"ratio": 0.0}, "ratio"),
        ({"lam": -1.0}, "lam"),
        ({"k": 0}, "k"),
        ({"guard_mads": 0.0}, "guard_mads"),
        ({"agreement": 1.5}, "agreement"),
        ({"agreement": float("nan")}, "agreement"),
        ({"clipscore_weight": -0.1}, "clipscore_weight"),
        ({"clipscore_weight": float("inf")}, "clipscore_weight"),
        ({"damping": "k/4"}, "damping"),
        ({"guard": "median"}, "guard"),
        ({"method": "influence"}, "method"),
        ({"blocks": "logit"}, "blocks"),
        ({"alpha": "0.7"}, "alpha"),
    ):
        with pytest.raises(ValueError, match=name):
            RankParams(**bad)
    with pytest.raises(ValueError, match="unknown preset"):
        RankParams.preset("fast")


def test_params_module_imports_no_torch():
    """The CLI builds and checks its flags from chips_core.scoring.params before any heavy import."""
    import subprocess
    import sys

    code = (
        "import argparse, sys, chips_core.scoring.params, chips_core.cli; "
        "from chips_core.cli.common import COMMANDS; "
        "[COMMANDS[c].add_arguments(argparse.ArgumentParser()) for c in ('prepare', 'score', 'train')]; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ranking_module_imports_no_scipy_stats():
    """The dashboard's first Scores run imports the ranking, without scipy.stats (a second to import)."""
    import subprocess
    import sys

    code = "import sys, chips_core.scoring.ranking; assert 'scipy.stats' not in sys.modules, 'scipy.stats'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rank_refuses_a_cache_of_other_blocks(built):
    pool, ev, params, cache = built
    other = "visual" if cache.config.blocks != "visual" else "text"
    with pytest.raises(ValueError, match="blocks"):
        rank(cache, RankParams(blocks=other))
    assert rank(cache, RankParams(k=16)).params.blocks == cache.config.blocks


def test_score_run_stores_its_rank_params(built, tmp_path):
    """A score run stores asdict(RankParams); RankParams(**stored) ranks the cache the same way again."""
    from dataclasses import asdict

    from chips_core.curation import selection as sel
    from chips_core.workspace.store import Workspace

    pool, ev, params, cache = built
    ws = Workspace.init(tmp_path / "ws")
    with ws.connect() as con:
        con.execute(
            "INSERT INTO pools (pool_id, name, kind, source, format, status) "
            "VALUES (?, 'pool', 'pool', 'x', 'csv', 'ready')",
            [ws.next_id(con)],
        )
    wanted = RankParams(alpha=0.4, k=16, beta=0.8, ratio=0.2, damping="dimension", guard_mads=1.5)
    result = rank(cache, wanted)
    run_id = sel.record_score_run(ws, "pool", result, "chips", {"preset": "default"})
    stored = sel.score_run_info(ws, run_id)["params"]
    assert stored["rank_params"] == asdict(wanted.replace(blocks=cache.config.blocks))
    assert stored["preset"] == "default" and stored["info"]["k"] == 16
    again = rank(cache, RankParams(**stored["rank_params"]))
    assert again.frame.equals(result.frame)
    assert (
        sel.load_score_run(ws, run_id)["pair_id"].tolist()
        == again.frame.sort_values("rank")["pair_id"].tolist()
    )

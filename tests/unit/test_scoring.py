"""prepare → ScoringCache → rank on small real arrays (float64), resume after an interruption, baselines."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from chips_core.batches import assign_batches
from chips_core.curvature import CurvatureAccumulator, combine, eigenvalues, lambda_star, newton_solve
from chips_core.endpoint import EndpointParams, batch_grad_sum, batch_state, zeroshot_grad_sum
from chips_core.exact import unflat
from chips_core.scoring import (
    ArrayFeatures,
    PrepareConfig,
    PrepareError,
    ScoringCache,
    ZeroShotEval,
    eval_contributions,
    prepare,
    rank,
    rank_exact,
)
from chips_core.sketch import make_sketch

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


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pool, ev, params = _features(230, 1), _features(60, 2), _params()
    cache = prepare(pool, ev, params, CFG, tmp_path_factory.mktemp("c") / "cache")
    return pool, ev, params, cache


def _reference_G(pool, params, cfg):
    """Sketched gradients recomputed batch by batch in float64 (no quantisation), in cache order."""
    sk = make_sketch(cfg.sketch, params, cfg.k_max, cfg.seed)
    out, acc = [], CurvatureAccumulator(cfg.k_max, cfg.negatives_per_row, cfg.seed)
    batches = assign_batches(pool.pair_ids(), cfg.batch_size, cfg.seed)
    n_curv = math.ceil(cfg.curvature_pairs / len(batches[0]))
    for b, rows in enumerate(batches):
        h, t = pool.rows(rows)
        st = batch_state(torch.from_numpy(h).double(), torch.from_numpy(t).double(), params)
        out.append(sk.batch_grads(st, cfg.negatives))
        if b < n_curv:
            acc.add(sk, st, b)
    return torch.cat(out).numpy(), acc, sk


def test_cache_matches_direct_computation(built):
    pool, ev, params, cache = built
    G, acc, sk = _reference_G(pool, params, CFG)
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
    assert np.allclose(cache.u, sk.apply(unflat(u[0] / 60, params))[0].numpy())
    assert np.allclose(cache.u_full, (u / 60)[0].numpy())
    # fp16 storage with per-row, per-block scales keeps every row to ~1e-3 relative
    x = np.random.default_rng(0).standard_normal(64)
    got, ref = cache.project(x), G @ x
    assert np.max(np.abs(got - ref)) < 3e-3 * np.abs(G).max(1).mean() * np.abs(x).sum()
    assert spearmanr(got, ref).statistic > 0.9999


def test_rank_chips_against_reference(built):
    pool, ev, params, cache = built
    G, _, _ = _reference_G(pool, params, CFG)
    k, alpha = 32, 0.7
    res = rank(cache, alpha=alpha, k=k, ratio=0.25)
    C = combine(cache.phi_pos[:k, :k], cache.phi_neg[:k, :k], alpha) / k
    lam = lambda_star(eigenvalues(C), k / 4)
    x = newton_solve(C, cache.u[:k] / math.sqrt(k), lam)
    A = G[:, :k] @ x / math.sqrt(k)
    f = res.frame
    assert list(f.columns) == [
        "pair_id",
        "alignment",
        "learnability",
        "relevance",
        "score",
        "rank",
        "selected",
    ]
    assert np.allclose(f["alignment"], A, rtol=0, atol=5e-3 * np.abs(A).max())
    assert spearmanr(f["alignment"], A).statistic > 0.999
    assert res.info["lam"] == pytest.approx(lam) and res.info["d_over_k"] == pytest.approx(0.25, abs=1e-6)
    assert sorted(f["rank"]) == list(range(1, 231)) and f["selected"].sum() == math.ceil(0.25 * 230)
    assert res.info["n_selected"] == 58 and 0 <= res.info["frac_positive"] <= 1
    assert np.isfinite(res.info["stability"]) and -1 <= res.info["stability"] <= 1
    best = f.loc[f["rank"] == 1]
    assert float(best["score"].iloc[0]) == f["score"].max()
    assert np.allclose(f["score"], f["alignment"] * f["learnability"] * f["relevance"])
    # λ is honoured, k defaults to k_max/2, stability needs 2k ≤ k_max
    assert rank(cache, lam=10 * lam, k=k).info["d_over_k"] < 0.25
    assert rank(cache).info["k"] == 32
    assert rank(cache, k=64).info["stability"] != rank(cache, k=64).info["stability"]  # NaN: no second half
    with pytest.raises(ValueError, match="k must lie"):
        rank(cache, k=65)


def test_flags_and_baselines(built):
    pool, ev, params, cache = built
    off = rank(cache, use_learnability=False, use_relevance=False, k=16)
    assert (off.frame["learnability"] == 1).all() and np.allclose(off.frame["score"], off.frame["alignment"])
    rn = rank(cache, rank_normalized=True, k=16).frame
    assert (rn["score"] > 0).all()
    ranks_a = rn["alignment"].rank(method="first").to_numpy() / len(rn)
    assert np.allclose(rn["score"], ranks_a * rn["learnability"] * rn["relevance"])
    r1, r2 = rank(cache, "random", seed=1), rank(cache, "random", seed=1)
    assert np.array_equal(r1.frame["rank"], r2.frame["rank"])
    assert not np.array_equal(r1.frame["rank"], rank(cache, "random", seed=2).frame["rank"])
    cs = rank(cache, "clipscore").frame
    assert np.allclose(cs["score"], cache.column("clipscore"))
    G, _, _ = _reference_G(pool, params, CFG)
    dot = rank(cache, "dot", k=16).frame
    assert spearmanr(dot["score"], G[:, :16] @ cache.u[:16]).statistic > 0.999
    trak = rank(cache, "trak", k=16)
    assert trak.info["alpha"] == 0.0 and (trak.frame["relevance"] == 1).all()
    with pytest.raises(ValueError, match="unknown method"):
        rank(cache, "influence")
    with pytest.raises(ValueError, match="checkpoints"):
        rank(cache, "tracin")


def test_tracin_sums_checkpoint_dots(built, tmp_path):
    pool, ev, params, cache = built
    other = prepare(pool, ev, _params(seed=9), CFG, tmp_path / "ckpt")
    res = rank(cache, "tracin", k=16, checkpoints=[(cache, 0.5), (other, 2.0)])
    d1 = rank(cache, "dot", k=16).frame["score"].to_numpy()
    d2 = rank(other, "dot", k=16).frame["score"].to_numpy()
    assert np.allclose(res.frame["score"], 0.5 * d1 + 2.0 * d2)


def test_resume_after_interruption_gives_same_cache(built, tmp_path):
    pool, ev, params, cache = built
    calls = []

    def stop_after_two(p):
        calls.append(p)
        if p.stage == "pool" and len([c for c in calls if c.stage == "pool"]) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(pool, ev, params, CFG, tmp_path / "r", progress=stop_after_two)
    assert not (tmp_path / "r" / "meta.json").exists()
    done = sorted(p.name for p in (tmp_path / "r").glob("chunk-*") if (p / "done.json").exists())
    assert len(done) == 2
    mtime = (tmp_path / "r" / done[0] / "G.npy").stat().st_mtime_ns
    seen = []
    resumed = prepare(pool, ev, params, CFG, tmp_path / "r", progress=seen.append)
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
    selfo = prepare(pool, ev, params, cfg, tmp_path / "self")
    assert not np.allclose(selfo.project(np.ones(64)), cache.project(np.ones(64)))
    rng = np.random.default_rng(4)
    zs = ZeroShotEval(rng.standard_normal((40, DV)), rng.integers(0, 3, 40), rng.standard_normal((3, DT)))
    z = prepare(pool, zs, params, CFG, tmp_path / "zs")
    u = zeroshot_grad_sum(
        torch.from_numpy(zs.h), torch.from_numpy(zs.labels), torch.from_numpy(zs.class_t), params
    )
    assert np.allclose(z.u_full, u.flat()[0].numpy() / 40)
    assert z.record["zero_shot"] and len(rank(z, k=16).frame) == 230
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
    res = rank(cache, alpha=alpha, k=k)
    lam = res.info["lam"] * 3
    res = rank(cache, alpha=alpha, k=k, lam=lam).frame.set_index("pair_id")
    A = res["alignment"]
    scale = np.abs(A).max()
    for pid in (A.idxmax(), A.idxmin(), int(cache.pair_ids[100])):
        full = eval_contributions(cache, pid, alpha=alpha, lam=lam, k=k, top=None)
        assert len(full) == 60 and set(full["eval_pair_id"]) == set(ev.pair_ids())
        assert full["contribution"].is_monotonic_decreasing
        assert full["contribution"].sum() == pytest.approx(full.attrs["alignment"])
        assert full.attrs["alignment"] == pytest.approx(A[pid], abs=3e-3 * scale)
        assert full["share"].sum() == pytest.approx(1.0)
        top = eval_contributions(cache, pid, alpha=alpha, lam=lam, k=k, top=3)
        assert list(top["eval_pair_id"]) == list(full["eval_pair_id"].iloc[[0, 1, 2, -3, -2, -1]])
    # a different α changes the solve, so the contributions change
    other = eval_contributions(cache, pid, alpha=0.0, lam=lam, k=k, top=None)
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
    assert np.allclose(rank(legacy, k=k).frame["alignment"], rank(cache, k=k).frame["alignment"])
    with pytest.raises(PrepareError, match="re-run prepare"):
        eval_contributions(legacy, pid)


def test_exact_rank_runs_and_agrees_at_large_lambda(built):
    pool, ev, params, cache = built
    sk = rank(cache, k=64, lam=1e3)
    ex = rank_exact(cache, pool, params, k=64, lam=1e3)
    assert ex.info["exact"] and ex.info["cg_rel_residual"] < 1e-8
    # at large λ both approach g·u/λ (the sketch of a dot product is unbiased): clearly positive agreement
    assert spearmanr(sk.frame["alignment"], ex.frame["alignment"]).statistic > 0.5


def test_bad_inputs_named(tmp_path):
    with pytest.raises(PrepareError, match="not a finished scoring cache"):
        ScoringCache.load(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        PrepareConfig(dtype="float16").validate()
    with pytest.raises(ValueError, match="differ in length"):
        ArrayFeatures(np.arange(3), np.zeros((2, 4)), np.zeros((3, 4)))

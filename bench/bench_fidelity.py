"""Fidelity of the sketched CHIPS score: Spearman(sketched, exact at the same λ) beside Spearman(score, Dot).

Real images (scikit-image samples, random crops/flips) through chips-tiny-vit (random init), both sketches
prepared once at k_max, every k a prefix; exact = CG in the full endpoint space (same batches, negatives
and λ). Run: PYTHONPATH=. python bench/bench_fidelity.py [--n 1024] [--ks 256,512,1024,2048,4096]
[--factors 0.01,0.1,1,10,100] [--device cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from chips_core.scoring.params import PrepareConfig, RankParams
from chips_core.scoring.prepare import prepare
from chips_core.scoring.ranking import rank, rank_exact

ROOT = Path(__file__).resolve().parents[1]


def _features(n: int):
    spec = importlib.util.spec_from_file_location("fid", ROOT / "tests/integration/test_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_features(n_pool=n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--ks", default="256,512,1024,2048,4096")
    ap.add_argument("--factors", default="0.01,0.1,1,10,100")
    ap.add_argument("--sketches", default="dense,kronecker")
    ap.add_argument("--alpha", type=float, default=0.7)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    ks = [int(x) for x in a.ks.split(",")]
    factors = [float(x) for x in a.factors.split(",")]
    t0 = time.perf_counter()
    pool, ev, params = _features(a.n)
    print(
        f"features: {a.n} pool pairs, p = {params.p}, {time.perf_counter() - t0:.1f} s; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    exact_cache: dict[float, object] = {}
    print(
        "\n| sketch | k | λ/λ* | λ | d(λ)/k | Spearman(sketched, exact) | Spearman(sketched, Dot) | "
        "Spearman(exact, Dot) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in a.sketches.split(","):
            cfg = PrepareConfig(
                k_max=max(ks), sketch=kind, batch_size=128, negatives_per_row=4, device=a.device
            )
            t1 = time.perf_counter()
            cache = prepare(pool, ev, params, cfg, Path(tmp) / kind)
            prep_s = time.perf_counter() - t1
            for k in ks:
                base = rank(cache, RankParams(k=k, alpha=a.alpha))
                dot = rank(cache, RankParams(method="dot", k=k)).frame["score"]
                for f in factors:
                    lam = base.info["lam_star"] * f
                    sk = rank(cache, RankParams(k=k, alpha=a.alpha, lam=lam))
                    key = round(lam, 15)
                    if key not in exact_cache:
                        exact_cache[key] = rank_exact(
                            cache, pool, params, RankParams(alpha=a.alpha, k=k, lam=lam), tol=1e-6
                        )
                    ex = exact_cache[key]
                    r_ex = spearmanr(sk.frame["alignment"], ex.frame["alignment"]).statistic
                    r_dot = spearmanr(sk.frame["alignment"], dot).statistic
                    r_exdot = spearmanr(ex.frame["alignment"], dot).statistic
                    print(
                        f"| {kind} | {k} | {f:g} | {lam:.3g} | {sk.info['d_over_k']:.3f} | {r_ex:.3f} | "
                        f"{r_dot:.3f} | {r_exdot:.3f} |",
                        flush=True,
                    )
            print(f"(prepare {kind} at k_max {max(ks)}: {prep_s:.1f} s)")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()

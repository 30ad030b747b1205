"""Time `rank` on a large scoring cache (default 1,000,000 pairs, k = 512): the dashboard's slider path.

The cache is synthetic (random sketched gradients, curvature and weights' ingredients) but written in
exactly the on-disk format prepare writes (fp16 column blocks, memory-mapped), so the timing is that of
the real rank. Run: python bench/bench_rank.py [--n 1000000] [--k-max 1024] [--k 512] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from chips_core.scoring.cache import (
    AUX_COLUMNS,
    CACHE_VERSION,
    COL_BLOCK,
    ScoringCache,
    save_json,
    save_npy,
    save_npz,
)
from chips_core.scoring.params import PRESETS, PrepareConfig, RankParams
from chips_core.scoring.prepare import quantize_blocks
from chips_core.scoring.ranking import project, rank


def build(root: Path, n: int, k_max: int, chunk_rows: int = 65536) -> None:
    """Write a synthetic cache of n pairs (skipped when a finished one is already there)."""
    if (root / "meta.json").exists():
        return
    rng = np.random.default_rng(0)
    cfg = PrepareConfig(k_max=k_max)
    save_json(
        root / "config.json",
        {
            "version": CACHE_VERSION,
            "config": asdict(cfg),
            "pool_fingerprint": "synthetic",
            "n_pairs": n,
            "params_digest": "synthetic",
            "D": 512,
            "d_v": 768,
            "d_t": 512,
            "v_bias": False,
            "t_bias": False,
            "zero_shot": False,
        },
    )
    A = rng.standard_normal((k_max, k_max)) / np.sqrt(k_max)
    curv_pos = A @ A.T
    curv_neg = 0.5 * curv_pos + np.diag(rng.random(k_max))
    save_npz(
        root / "eval.npz",
        u_sketch=rng.standard_normal(k_max),
        u_full=np.zeros(1),
        mu_x=np.zeros(1),
        mu_y=np.zeros(1),
        n_eval=np.array(1000),
    )
    direction = rng.standard_normal(k_max)
    for c, s in enumerate(range(0, n, chunk_rows)):
        m = min(chunk_rows, n - s)
        G = torch.from_numpy(rng.standard_normal((m, k_max), dtype=np.float32))
        G += torch.from_numpy((rng.standard_normal(m) * 0.3).astype(np.float32))[:, None] * torch.from_numpy(
            direction.astype(np.float32)
        )
        q, scale = quantize_blocks(G)
        d = root / f"chunk-{c:05d}"
        save_npy(d / "G.npy", q)
        save_npy(d / "scale.npy", scale)
        aux = np.stack(
            [
                rng.random(m),
                rng.random(m) * 0.5,
                rng.standard_normal(m),
                rng.uniform(-1, 1, m),
                rng.uniform(-1, 1, m),
                rng.uniform(-1, 1, m),
            ],
            axis=1,
        )
        assert aux.shape[1] == len(AUX_COLUMNS)
        save_npy(d / "aux.npy", aux)
        save_npy(d / "ids.npy", np.arange(s, s + m, dtype=np.int64))
        if c == 0:
            save_npz(d / "curv.npz", pos=curv_pos * m, neg=curv_neg * m, n=np.array(m))
        save_json(d / "done.json", {"chunk": c})
    save_json(
        root / "meta.json",
        {
            "n_chunks": -(-n // chunk_rows),
            "n_batches": -(-n // 1024),
            "n_curvature_batches": 64,
            "col_block": COL_BLOCK,
            "aux_columns": list(AUX_COLUMNS),
            "sketch_kind": "synthetic",
        },
    )


def with_blocks(root: Path, blocks: str) -> Path:
    """The cache at `root` recorded as scoring `blocks` (its files linked, its config.json rewritten), so a
    preset that fixes the parameter blocks ranks it as it is: rank's cost does not depend on them."""
    view = root.with_name(f"{root.name}_{blocks.replace(',', '-')}")
    view.mkdir(exist_ok=True)
    for entry in root.iterdir():
        if entry.name != "config.json" and not (view / entry.name).exists():
            (view / entry.name).symlink_to(entry.resolve())
    record = json.loads((root / "config.json").read_text())
    save_json(view / "config.json", {**record, "config": {**record["config"], "blocks": blocks}})
    return view


def timed(fn, reps: int) -> tuple[float, float, float]:
    """(best wall s, median wall s, median process CPU s): CPU time shows the cost on a busy machine."""
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(times), statistics.median(times), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--k-max", type=int, default=1024)
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/chips_bench_rank")
    a = ap.parse_args()
    root = Path(a.dir) / f"n{a.n}_k{a.k_max}"
    t0 = time.perf_counter()
    build(root, a.n, a.k_max)
    print(f"cache: {root} ({a.n:,} pairs, k_max {a.k_max}), built/reused in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    cache = ScoringCache.load(root)
    print(
        f"ScoringCache.load: {time.perf_counter() - t0:.3f} s; torch threads {torch.get_num_threads()}, "
        f"cpus {os.cpu_count()}"
    )
    paper_cache = ScoringCache.load(with_blocks(root, PRESETS["paper"]["blocks"]))
    default, paper = RankParams.preset("default", k=a.k), RankParams.preset("paper", k=a.k)
    lam0 = rank(cache, default).info["lam"]  # warms the page cache and the eigenvalue cache of (k, α)
    rank(paper_cache, paper)  # and those of the paper preset's view (a ScoringCache of its own)
    rows = [
        (f"chips, default preset, α={default.alpha:g}", lambda: rank(cache, default)),
        (
            "chips, λ = 10 × the default λ (slider move)",
            lambda: rank(cache, default.replace(lam=10 * lam0)),
        ),
        (
            "chips, paper preset (every block, λ*, raw gradients, no guard, no agreement weight)",
            lambda: rank(paper_cache, paper),
        ),
        (
            "chips, default preset with β=0.8, ratio 0.1 (weights only)",
            lambda: rank(cache, default.replace(beta=0.8, ratio=0.1)),
        ),
        ("dot", lambda: rank(cache, RankParams(method="dot", k=a.k))),
        ("clipscore", lambda: rank(cache, RankParams(method="clipscore"))),
        ("matvec only (project)", lambda: project(cache, np.ones(a.k))),
    ]
    print(f"load average {os.getloadavg()[0]:.1f} at start; every chips row includes the ranking stability")
    print(f"\n| rank call ({a.n:,} pairs, k = {a.k}) | best wall s | median wall s | median CPU s |")
    print("|---|---|---|---|")
    for name, fn in rows:
        best, med, cpu = timed(fn, a.reps)
        print(f"| {name} | {best:.3f} | {med:.3f} | {cpu:.3f} |")
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    t0 = time.perf_counter()
    rank(cache, default.replace(alpha=0.3))
    print(f"\nfirst call at a new α (k×k eigenvalues, then cached): {time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()

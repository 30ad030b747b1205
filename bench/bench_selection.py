"""Selection quality without training: the planted-noise shares of each scoring variant's top ranks.

For a workspace whose pool carries ground truth (a `planted` label per pair: none | mismatch | off_domain),
prints one row per variant: the share of planted wrong captions and off-domain pairs in the top 10 % and
30 %, wrong captions among the top 10 ranks, λ, and the ranking stability. The variants climb from the
paper's literal score to the default preset one change at a time, so each change is measured against the
one before; a λ-scale sweep and a k sweep show what the damping rule does. Scores only (no CPT): the CPT
tables come from `chips experiment` (docs/SCORING.md).

  python bench/bench_selection.py --demo WS            # the bundled demo workspace (truth from data/demo)
  python bench/bench_selection.py WS POOL EVAL --truth pool.csv   # truth: pair_id or filepath + planted
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chips_core.engines.pipeline import cache_with_blocks, prepare_workspace  # noqa: E402
from chips_core.scoring.cache import ScoringCache  # noqa: E402
from chips_core.scoring.params import PRESETS, PrepareConfig, RankParams  # noqa: E402
from chips_core.scoring.ranking import rank  # noqa: E402
from chips_core.workspace.store import Workspace  # noqa: E402

ALL = PRESETS["paper"]["blocks"]
VT = PRESETS["default"]["blocks"]
LADDER = [  # (label, blocks, rank options): one change per step, from the paper to the default
    ("paper preset (literal CHIPS)", ALL, dict(damping="dimension", normalize=False, guard="none")),
    ("− temperature block", VT, dict(damping="dimension", normalize=False, guard="none")),
    ("+ unit-norm gradients", VT, dict(damping="dimension", normalize=True, guard="none")),
    ("+ λ = 0.1·tr C̃", VT, dict(damping="trace", normalize=True, guard="none")),
    ("+ CLIPScore guard = default preset", VT, dict(damping="trace", normalize=True, guard="mad")),
    ("default + temperature block", ALL, dict(damping="trace", normalize=True, guard="mad")),
    ("paper + guard", ALL, dict(damping="dimension", normalize=False, guard="mad")),
]


def truth_series(ws: Workspace, pool: str, path: str) -> pd.Series:
    """planted label per pair_id, from a CSV with pair_id or filepath (joined on the pool's file names)."""
    t = pd.read_csv(path)
    if "pair_id" in t.columns:
        return t.set_index("pair_id")["planted"]
    with ws.connect(read_only=True) as con:
        pairs = con.execute(
            "SELECT pair_id, filepath FROM pairs JOIN pools USING (pool_id) WHERE name = ?", [pool]
        ).df()
    pairs["name"] = pairs["filepath"].map(lambda p: Path(p).name)
    t["name"] = t["filepath"].map(lambda p: Path(p).name)
    return pairs.merge(t[["name", "planted"]], on="name", how="left").set_index("pair_id")["planted"]


def shares(frame: pd.DataFrame, truth: pd.Series) -> dict:
    n = len(frame)
    order = frame.sort_values("rank")["pair_id"].to_numpy()
    row = {}
    for frac in (0.1, 0.3):
        top = truth.reindex(order[: math.ceil(frac * n)])
        row[f"wrong@{frac:.0%}"] = float((top == "mismatch").mean())
        row[f"off@{frac:.0%}"] = float((top == "off_domain").mean())
    row["wrong in top 10"] = int((truth.reindex(order[:10]) == "mismatch").sum())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ws", nargs="?")
    ap.add_argument("pool", nargs="?")
    ap.add_argument("eval", nargs="?")
    ap.add_argument("--truth", help="CSV with pair_id (or filepath) and planted")
    ap.add_argument(
        "--demo", metavar="WS", help="the demo workspace (pool, eval set and truth from data/demo)"
    )
    ap.add_argument("--k", type=int, default=512)
    a = ap.parse_args()
    if a.demo:
        from chips_core import demo

        ws, pool, ev = Workspace(a.demo), demo.POOL_NAME, demo.EVAL_NAME
        truth = demo.ground_truth("pool").set_index("pair_id")["planted"]
    else:
        ws, pool, ev = Workspace(a.ws), a.pool, a.eval
        truth = truth_series(ws, pool, a.truth)
    # the model the pool was first featurized with (never a later checkpoint's features)
    base = prepare_workspace(ws, pool, ev, PrepareConfig(device="cpu"))
    caches = {}
    for blocks in (VT, ALL):
        cid = cache_with_blocks(ws, base, blocks)
        with ws.connect(read_only=True) as con:
            caches[blocks] = ScoringCache.load(
                con.execute("SELECT dir FROM scoring_caches WHERE cache_id = ?", [cid]).fetchone()[0]
            )
    print(f"pool {pool}: {len(truth)} pairs; rates " + ", ".join(
        f"{k} {v:.1%}" for k, v in truth.value_counts(normalize=True).items()))  # fmt: skip
    rows = []

    def add(label: str, res) -> None:
        info = res.info
        rows.append({"variant": label, **shares(res.frame, truth), "λ": info.get("lam"),
                     "stability": info.get("stability"), "guarded": info.get("n_guarded")})  # fmt: skip

    for label, blocks, opts in LADDER:
        add(label, rank(caches[blocks], RankParams(k=a.k, **opts)))
    cache = caches[VT]
    lam0 = rank(cache, RankParams(k=a.k)).info["lam"]
    for scale in (0.01, 1.0):
        add(f"default, λ = {scale:g}·tr C̃", rank(cache, RankParams(k=a.k, lam=lam0 * scale / 0.1)))
    for k in sorted({a.k // 4, a.k // 2, a.k}):
        add(f"default, k = {k}", rank(cache, RankParams(k=k)))
        add(
            f"paper, k = {k}", rank(caches[ALL], RankParams(k=k, **{kk: v for kk, v in LADDER[0][2].items()}))
        )
    random = [shares(rank(cache, RankParams(method="random", seed=s)).frame, truth) for s in range(10)]
    rows.append({"variant": "random (mean of 10 seeds)", **pd.DataFrame(random).mean().to_dict()})
    add("clipscore", rank(cache, RankParams(method="clipscore")))
    add("dot (projections)", rank(cache, RankParams(method="dot", k=a.k)))
    add("dot (with temperature)", rank(caches[ALL], RankParams(method="dot", k=a.k)))
    add("trak-style", rank(caches[ALL], RankParams(method="trak", k=a.k)))
    df = pd.DataFrame(rows)
    cols = list(df.columns)
    print("| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|")
    for r in df.itertuples(index=False):
        print("| " + " | ".join(_fmt(v) for v in r) + " |")


def _fmt(v: object) -> str:
    if isinstance(v, float | np.floating):
        return "—" if not np.isfinite(v) else f"{v:.3g}"
    return "—" if v is None else str(v)


if __name__ == "__main__":
    main()

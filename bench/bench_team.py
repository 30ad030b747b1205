"""What team curation costs a decision: single-user mode (no identity provider) against a signed-in
curator (one role read per write), side by side in one run, on a real workspace file.

Each row records `--n` single-pair decisions through `selection.record_decision` (what one click in the
dashboard does), alternating the two modes so that the machine's noise falls on both alike, plus the
activity trail's query over everything written.

    PYTHONPATH=. python bench/bench_team.py [--n 200] [--pairs 100000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chips_core.curation import selection  # noqa: E402
from chips_core.team import audit, roles  # noqa: E402
from chips_core.team.identity import actor_from_claims, local_actor  # noqa: E402
from chips_core.workspace.store import Workspace  # noqa: E402


def build(root: Path, n_pairs: int) -> Workspace:
    """A workspace with one pool of `n_pairs` pairs (rows only; no images are read here)."""
    ws = Workspace.init(root)
    with ws.connect() as con:
        con.execute(
            "INSERT INTO pools (pool_id, name, kind, source, format, status) "
            "VALUES (1, 'pool', 'pool', 'x', 'csv', 'ready')"
        )
        con.register("_p", pd.DataFrame({"pair_id": np.arange(n_pairs, dtype=np.int64)}))
        con.execute(
            "INSERT INTO pairs (pool_id, pair_id, row_index, filepath, caption) "
            "SELECT 1, pair_id, pair_id, '/img/' || pair_id, 'caption' FROM _p"
        )
        con.execute("SELECT setval('id_seq', 10)")
    return ws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="decisions per mode")
    ap.add_argument("--pairs", type=int, default=100_000, help="pairs in the pool")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = build(Path(tmp) / "ws", args.pairs)
        curator = actor_from_claims({"sub": "s-1", "email": "curator@hospital.org"})
        roles.grant(ws, local_actor(), "curator@hospital.org", "curator")
        modes = {"single-user (local lead)": local_actor(), "signed-in curator": curator}
        times: dict[str, list[float]] = {m: [] for m in modes}
        rng = np.random.default_rng(0)
        for i in range(args.n):
            for mode, actor in modes.items():
                pid = int(rng.integers(args.pairs))
                t0 = time.perf_counter()
                selection.record_decision(ws, "pool", pid, "include" if i % 2 else "exclude", actor=actor)
                times[mode].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        trail = audit.activity(ws)
        trail_s = time.perf_counter() - t0
    print(f"{args.n} decisions per mode on a {args.pairs:,}-pair pool\n")
    print("| mode | median ms per decision | p90 ms |")
    print("|---|---|---|")
    for mode, ts in times.items():
        p90 = sorted(ts)[int(0.9 * len(ts))]
        print(f"| {mode} | {1000 * statistics.median(ts):.1f} | {1000 * p90:.1f} |")
    print(f"\nactivity trail over {len(trail):,} rows: {1000 * trail_s:.0f} ms")


if __name__ == "__main__":
    main()

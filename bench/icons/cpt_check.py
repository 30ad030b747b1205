"""Does CPT on the right pairs help? No CPT vs full pool vs clean target-style pairs, several seeds.

    python bench/icons/cpt_check.py /work/bench-ws/icons-free --seeds 0 1 2 --epochs 5 --lr 1e-4 \
        --batch-size 64 [--arms none full clean] [--out DIR] [--extra "--wd 0.1"]

Every CPT cell is `chips train WS --csv ...` (open_clip_train, starting from the workspace's base model)
followed by `chips evaluate WS icons-test --run RUN`; 'none' is `chips evaluate WS icons-test --model
BASE`. Arms: full = every pool pair (DATA/pool.csv), clean = the pool's clean target-style pairs
(DATA/pool_clean_target.csv, planted == none and style == outlined). Writes OUT/cells.csv (one row per
cell: metrics, run id, wall seconds) and prints mean ± standard error over seeds (SE = std/sqrt(n)) and
the difference of each arm to no CPT in SE units (SE of a difference: sqrt(SE_a^2 + SE_b^2); 'none' is
deterministic, SE 0). A rerun with the same OUT skips finished cells.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[2]
METRICS = ["i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", "zeroshot_top1"]
ARMS = {"full": "pool.csv", "clean": "pool_clean_target.csv"}


def chips(*argv: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", CHIPS_PROGRESS="0")
    proc = subprocess.run(
        [sys.executable, "-m", "chips_core.cli", *argv], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(
            f"cpt_check.py: chips {' '.join(argv[:2])} failed ({proc.returncode}): "
            + proc.stderr.strip()[-2000:]
        )
    return proc.stdout


def abs_csv(data: Path, manifest: str, dest: Path) -> Path:
    """filepath,title CSV with absolute paths (open_clip_train reads paths as they are)."""
    df = pd.read_csv(data / manifest)
    df["filepath"] = [str((data / p).resolve()) for p in df["filepath"]]
    dest.parent.mkdir(parents=True, exist_ok=True)
    df[["filepath", "title"]].to_csv(dest, index=False)
    return dest


def summary(cells: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    g = cells.groupby("arm", sort=False)[metrics]
    n = g.size()
    mean, se = g.mean(), g.std(ddof=1).div(np.sqrt(n), axis=0).fillna(0.0)
    rows = []
    base = mean.loc["none"] if "none" in mean.index else None
    for arm in mean.index:
        row = {"arm": arm, "n": int(n[arm])}
        for m in metrics:
            row[m] = f"{mean.loc[arm, m]:.4f} ± {se.loc[arm, m]:.4f}"
            if base is not None and arm != "none":
                d = mean.loc[arm, m] - base[m]
                s = float(np.hypot(se.loc[arm, m], se.loc["none", m]))
                row[f"{m} Δ/SE"] = (
                    f"{d / s:+.1f}" if s > 0 else ("+inf" if d > 0 else "-inf" if d < 0 else "0")
                )
        rows.append(row)
    return pd.DataFrame(rows).fillna("—")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ws", type=Path)
    ap.add_argument("--arms", nargs="+", default=["none", "full", "clean"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--extra", default="--wd 0.1", help="more open_clip_train flags, one string")
    ap.add_argument(
        "--test",
        nargs="+",
        default=["icons-test", "icons-test-seen"],
        help="eval sets; metrics of the 2nd, 3rd... are prefixed with their name",
    )
    ap.add_argument("--out", type=Path, default=None, help="default WS/cpt-check/<recipe>")
    args = ap.parse_args(argv)
    ws = args.ws.resolve()
    info = json.loads((ws / "icons-bench.json").read_text())
    data, model = Path(info["data"]), info["model"]
    recipe = f"e{args.epochs}-lr{args.lr:g}-b{args.batch_size}" + (f"-w{args.warmup}" if args.warmup else "")
    recipe += re.sub(r"[^A-Za-z0-9.]+", "_", args.extra).strip("_")
    out = (args.out or ws / "cpt-check" / recipe).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cells_path = out / "cells.csv"
    cells = pd.read_csv(cells_path) if cells_path.is_file() else pd.DataFrame(columns=["arm", "seed"])
    done = {(a, int(s)) for a, s in cells[["arm", "seed"]].itertuples(index=False)}
    rows = cells.to_dict("records")
    recipe_args = [
        "--model",
        model,
        "--epochs",
        str(args.epochs),
        "--lr",
        str(args.lr),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        "1",
        "--device",
        "cpu",
        f"--extra={args.extra}",
    ]
    if args.warmup is not None:
        recipe_args += ["--warmup", str(args.warmup)]
    (out / "recipe.json").write_text(
        json.dumps(
            {
                "ws": str(ws),
                "model": model,
                "args": vars(args) | {"ws": str(ws), "out": str(out)},
                "train_flags": recipe_args,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    for arm in args.arms:
        for seed in [0] if arm == "none" else args.seeds:
            if (arm, seed) in done:
                continue
            t0 = time.monotonic()
            row = {"arm": arm, "seed": seed}
            if arm == "none":
                who = ["--model", model]
                train_s = 0.0
            else:
                csv = abs_csv(data, ARMS[arm], out / f"{arm}.csv")
                text = chips("train", str(ws), "--csv", str(csv), "--seed", str(seed), *recipe_args)
                run = int(re.search(r"CPT run (\d+) finished", text).group(1))
                train_s = time.monotonic() - t0
                who = ["--run", str(run)]
                row["cpt_run_id"] = run
            metrics = {}
            for i, test in enumerate(args.test):
                got = json.loads(chips("evaluate", str(ws), test, *who))
                metrics |= {(f"{test}/{k}" if i else k): v for k, v in got.items()}
            row |= {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            row |= {"train_s": round(train_s, 1), "cell_s": round(time.monotonic() - t0, 1)}
            rows.append(row)
            pd.DataFrame(rows).to_csv(cells_path, index=False)
            shown = [m for m in row if any(m.endswith(k) for k in ("i2t_R@1", "t2i_R@1", "zeroshot_top1"))]
            print(
                f"{arm} seed {seed}: "
                + " ".join(f"{m}={row[m]:.4f}" for m in shown)
                + f" ({row['cell_s']} s)",
                flush=True,
            )
    cells = pd.DataFrame(rows)
    metrics = [f"{t}/{m}" if i else m for i, t in enumerate(args.test) for m in METRICS]
    metrics = [m for m in metrics if m in cells.columns]
    table = summary(cells, metrics)
    cols = list(table.columns)
    md = "\n".join(
        ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        + ["| " + " | ".join(str(r[c]) for c in cols) + " |" for _, r in table.iterrows()]
    )
    times = cells[cells.arm != "none"].groupby("arm")["cell_s"].mean().round(1).to_dict()
    text = f"{ws} — recipe {recipe}, test {' '.join(args.test)}\n\n{md}\n\n"
    text += f"mean wall s per CPT cell (train + eval): {times}\n"
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

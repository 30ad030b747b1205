"""The method table on an icon-benchmark workspace: `chips experiment`, then ground truth per selection.

    python bench/icons/run.py /work/bench-ws/icons-free [--methods ...] [--ratios 0.1 0.3] [--seeds 0 1 2]
        [--epochs E --lr LR --batch-size B --extra "--wd 0.1"] [--out DIR] [--table-only]
        [-- any further flags for `chips experiment`, e.g. --preset paper --blocks visual,text --normalize]

1. Runs `chips experiment WS icons-pool --test icons-test --cache <the workspace's cache> --methods ...
   --ratios ... --seeds ... --tracin-eval icons-val --model <base model> <recipe> --out OUT <pass-through>`
   (every flag this script does not know, and everything after `--`, goes to `chips experiment`
   unchanged: the hook for new scoring options). A rerun with the same OUT skips finished cells.
2. Reads OUT/cells.csv and, for every selection the experiment saved, its members from the workspace,
   joined with the benchmark manifest (DATA/pool.csv) by file path: the share of planted wrong captions,
   off-domain pairs, clean target-style and near-style pairs in it.
3. Prints (and writes OUT/bench_table.md, OUT/bench_table.csv) one row per method x ratio: mean ± SE over
   seeds (SE = std/sqrt(n)) of i2t R@1, t2i R@1, zero-shot top-1, and the ground-truth shares (mean over
   seeds; deterministic methods select the same pairs in every seed).

`--table-only` skips step 1 (tables from an existing OUT). The recipe defaults to the workspace's
"recipe" in WS/icons-bench.json (written by setup_ws.py: the one measured in bench/icons/README.md).

`--scores-only` trains nothing: for each method (tracin excepted: it needs CPT checkpoints) it runs
`chips score WS icons-pool --eval icons-val --method M --out OUT/scores-M.parquet <pass-through>` and
prints the ground-truth shares of the top r of each ranking (seconds, not hours).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
METRICS = ["i2t_R@1", "t2i_R@1", "zeroshot_top1"]
TARGET = "outlined"
NEAR = "two-tone"
RECIPE = {
    "epochs": "5",
    "lr": "1e-4",
    "batch_size": "64",
    "extra": "--wd 0.1",
}  # WS/icons-bench.json "recipe" wins


def composition(ws_root: Path, selection_id: int, manifest: pd.DataFrame) -> dict[str, float]:
    from chips_core.curation.selection import selection_members
    from chips_core.workspace.store import Workspace

    members = selection_members(Workspace(ws_root), int(selection_id))
    m = members.merge(manifest, left_on="filepath", right_on="abs_path", how="left")
    n = len(m)
    if n == 0:
        return {}
    clean = m["planted"] == "none"
    return {
        "n": n,
        "mismatch": float((m["planted"] == "mismatch").mean()),
        "off_domain": float((m["planted"] == "off_domain").mean()),
        "target_clean": float((clean & (m["style"] == TARGET)).mean()),
        "near": float((clean & (m["style"] == NEAR)).mean()),
        "unmatched": float(m["planted"].isna().mean()),
    }


def fmt(mean: float, se: float, n: int) -> str:
    return f"{mean:.3f} ± {se:.3f}" if n > 1 else f"{mean:.3f}"


def table(cells: pd.DataFrame, ws_root: Path, manifest: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    comp_cache: dict[int, dict] = {}
    rows = []
    for i, c in cells.iterrows():
        sel = c.get("selection_id")
        if pd.notna(sel):
            sel = int(sel)
            comp_cache.setdefault(sel, composition(ws_root, sel, manifest))
            for k, v in comp_cache[sel].items():
                cells.loc[i, f"share_{k}"] = v
    order = [m for m in methods if m in set(cells["method"])] + [
        r for r in ("full", "none") if r in set(cells["method"])
    ]
    for method in order:
        part = cells[cells["method"] == method]
        for ratio in sorted(part["ratio"].unique()):
            g = part[np.isclose(part["ratio"], ratio)]
            n = len(g)
            row: dict = {"method": method, "ratio": ratio, "seeds": n}
            for m in METRICS:
                if m in g:
                    sd = float(g[m].std(ddof=1)) if n > 1 else 0.0
                    row[m] = fmt(float(g[m].mean()), sd / np.sqrt(n), n)
            for k in ("mismatch", "off_domain", "target_clean", "near"):
                col = f"share_{k}"
                row[f"% {k}"] = f"{100 * g[col].mean():.1f}" if col in g and g[col].notna().any() else "—"
            rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(f"{r[c]:.0%}" if c == "ratio" else str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def shares(ranked: pd.DataFrame, manifest: pd.DataFrame, ratio: float) -> dict[str, float]:
    top = ranked.sort_values("rank").head(int(np.ceil(ratio * len(ranked))))
    m = top.merge(manifest, left_on="filepath", right_on="abs_path", how="left")
    clean = m["planted"] == "none"
    return {
        "mismatch": (m["planted"] == "mismatch").mean(),
        "off_domain": (m["planted"] == "off_domain").mean(),
        "target_clean": (clean & (m["style"] == TARGET)).mean(),
        "near": (clean & (m["style"] == NEAR)).mean(),
    }


def scores_only(
    ws: Path, out: Path, args: argparse.Namespace, passthrough: list[str], manifest: pd.DataFrame
) -> int:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", CHIPS_PROGRESS="0")
    rows = []
    for method in [m for m in args.methods if m != "tracin"]:
        f = out / f"scores-{method}.parquet"
        cmd = [
            sys.executable,
            "-m",
            "chips_core.cli",
            "score",
            str(ws),
            "icons-pool",
            "--eval",
            "icons-val",
            "--method",
            method,
            "--out",
            str(f),
            *passthrough,
        ]
        print("$ chips " + " ".join(cmd[3:]), flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"run.py: chips score failed: {proc.stderr.strip()[-1500:]}")
        ranked = pd.read_parquet(f)
        for ratio in args.ratios:
            sh = shares(ranked, manifest, float(ratio))
            rows.append(
                {"method": method, "ratio": float(ratio)}
                | {f"% {k}": f"{100 * v:.1f}" for k, v in sh.items()}
            )
    df = pd.DataFrame(rows)
    base = {
        k: 100 * v
        for k, v in shares(
            pd.DataFrame({"filepath": manifest["abs_path"], "rank": range(len(manifest))}), manifest, 1.0
        ).items()
    }
    text = (
        f"{ws} — ground-truth shares (%) of the top r of each ranking (no CPT); "
        f"flags: {' '.join(passthrough) or '(defaults)'}\n"
        f"whole pool: " + ", ".join(f"{k} {v:.1f}" for k, v in base.items()) + "\n\n" + to_markdown(df)
    )
    df.to_csv(out / "scores_shares.csv", index=False)
    (out / "scores_shares.md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tail = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ws", type=Path)
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["random", "clipscore", "dot", "trak", "tracin", "chips-paper", "chips"],
    )
    ap.add_argument("--ratios", nargs="+", default=["0.1", "0.3"])
    ap.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    ap.add_argument("--epochs", default=None)
    ap.add_argument("--lr", default=None)
    ap.add_argument("--batch-size", default=None)
    ap.add_argument(
        "--extra", default=None, help="open_clip_train flags for every CPT cell (default --wd 0.1)"
    )
    ap.add_argument("--cache", default=None, help="scoring cache id (default: the one setup_ws.py prepared)")
    ap.add_argument("--out", type=Path, default=None, help="default WS/experiments/bench-<tag>")
    ap.add_argument("--tag", default="default", help="names the default output folder")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--scores-only", action="store_true", help="rank only: ground-truth shares, no CPT")
    args, passthrough = ap.parse_known_args(argv)
    passthrough += tail
    ws = args.ws.resolve()
    info = json.loads((ws / "icons-bench.json").read_text())
    out = (args.out or ws / "experiments" / f"bench-{args.tag}").resolve()
    recipe = RECIPE | info.get("recipe", {})  # the workspace's measured recipe, then the flags
    for k in ("epochs", "lr", "batch_size", "extra"):
        if getattr(args, k) is None:
            setattr(args, k, recipe[k])
    data = Path(info["data"])
    manifest = pd.read_csv(data / "pool.csv")
    manifest["abs_path"] = [str((data / p).resolve()) for p in manifest["filepath"]]
    manifest = manifest[["abs_path", "planted", "style"]]
    if args.scores_only:
        return scores_only(ws, out, args, passthrough, manifest)
    if not args.table_only:
        cmd = [
            sys.executable,
            "-m",
            "chips_core.cli",
            "experiment",
            str(ws),
            "icons-pool",
            "--test",
            "icons-test",
            "--cache",
            str(args.cache or info["cache_id"]),
            "--methods",
            *args.methods,
            "--ratios",
            *args.ratios,
            "--seeds",
            *args.seeds,
            "--model",
            info["model"],
            "--epochs",
            args.epochs,
            "--lr",
            args.lr,
            "--batch-size",
            args.batch_size,
            "--workers",
            "1",
            "--device",
            "cpu",
            f"--extra={args.extra}",
            "--primary",
            "i2t_R@1",
            "--out",
            str(out),
        ]
        if "tracin" in args.methods:
            cmd += ["--tracin-eval", "icons-val"]
        cmd += passthrough
        print("$ chips " + " ".join(cmd[3:]), flush=True)
        env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            print(
                f"run.py: chips experiment exited {rc}; tables from the cells finished so far",
                file=sys.stderr,
            )
    cells = pd.read_csv(out / "cells.csv")
    df = table(cells, ws, manifest, args.methods)
    cells.to_csv(out / "bench_cells.csv", index=False)
    df.to_csv(out / "bench_table.csv", index=False)
    head = (
        f"{ws} — test icons-test; mean ± SE over seeds; shares of the selection in %\n"
        f"(experiment folder {out})\n\n"
    )
    text = head + to_markdown(df)
    (out / "bench_table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Build a CHIPS workspace for the icon benchmark through the real CLI (init, ingest, featurize, prepare).

    python bench/icons/setup_ws.py /work/bench-ws/icons-free    --data /work/bench-data/icons --model free
    python bench/icons/setup_ws.py /work/bench-ws/icons-clamped --data /work/bench-data/icons --model clamped

Pools in the workspace: `icons-pool` (the pool), `icons-val` (eval set: the target gradient),
`icons-test` (eval set: held-out concepts, for evaluation after CPT only), `icons-test-seen` (new
renders of pool concepts, for evaluation after CPT only). Steps already done are skipped by the CLI.
The model is the local-dir bundle DATA/models/<model>/ written by build.py. Extra arguments after
`--` go to `chips prepare`.
Prints the scoring cache id (also written to WS/icons-bench.json with the model and data paths).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# CPT recipes measured in bench/icons/README.md (run.py's defaults for the workspace)
RECIPES = {
    "free": {"epochs": "3", "lr": "5e-4", "batch_size": "64", "extra": "--wd 0.1"},
    "clamped": {"epochs": "5", "lr": "1e-4", "batch_size": "64", "extra": "--wd 0.1"},
}
POOLS = {
    "icons-pool": ("pool.csv", False),
    "icons-val": ("val.csv", True),
    "icons-test": ("test.csv", True),
    "icons-test-seen": ("test_seen.csv", True),
}


def chips(*argv: str) -> str:
    """Run `python -m chips_core.cli ARGV` from this checkout; return stdout (exit on failure)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", CHIPS_PROGRESS="0")
    cmd = [sys.executable, "-m", "chips_core.cli", *argv]
    print("$ chips " + " ".join(argv), flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"setup_ws.py: chips {argv[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    if proc.stdout.strip():
        print(proc.stdout.strip(), flush=True)
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ws", type=Path)
    ap.add_argument("--data", type=Path, default=Path("/work/bench-data/icons"))
    ap.add_argument("--model", default="free", help="free | clamped (a folder under DATA/models)")
    ap.add_argument("--workers", default="1", help="ingest processes")
    args = ap.parse_args(argv)
    ws, data = args.ws.resolve(), args.data.resolve()
    model_dir = data / "models" / args.model
    if not (model_dir / "open_clip_config.json").is_file():
        sys.exit(f"setup_ws.py: no model bundle at {model_dir}; run bench/icons/build.py first")
    model = f"local-dir:{model_dir}"
    t0 = time.monotonic()
    chips("init", str(ws))
    for name, (manifest, is_eval) in POOLS.items():
        chips(
            "ingest",
            str(ws),
            name,
            str(data / manifest),
            "--label-col",
            "label",
            "--workers",
            args.workers,
            *(["--eval"] if is_eval else []),
        )
    for name in POOLS:
        chips("featurize", str(ws), name, "--model", model, "--device", "cpu")
    chips("prepare", str(ws), "icons-pool", "--eval", "icons-val", "--device", "cpu", *extra)
    status = json.loads(chips("status", str(ws), "--json"))
    caches = [
        c for c in status.get("scoring caches", status.get("scoring_caches", [])) if c.get("status") == "done"
    ]
    cache_id = max(int(c["cache_id"]) for c in caches)
    info = {
        "data": str(data),
        "model": model,
        "variant": args.model,
        "cache_id": cache_id,
        "prepare_args": extra,
        "seconds": round(time.monotonic() - t0, 1),
        "recipe": RECIPES.get(args.model, RECIPES["clamped"]),
    }
    (ws / "icons-bench.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Engine overhead: pairs/s of featurize and prepare through Ray versus the local path, same pool and model.

Builds a pool of N real images (seeded crops of scikit-image's pictures, PNG files + a CSV manifest), ingests
it into two fresh workspaces, featurizes it locally and with `featurize_ray`, then prepares a scoring
cache both ways, and prints a table. Ray runs on a local cluster started here (`--num-cpus`) unless
`--address` names a running one. Every figure is wall time of one call as a user sees it (Ray's start-up
is timed on its own line; actor start and model load are inside the Ray rows).

    /work/venv/bin/python bench/bench_ray.py --n 512
    python bench/bench_ray.py --n 20000 --model ViT-B-16 --address 127.0.0.1:6379 --num-gpus-per-worker 1
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chips_core.features.featurize import FeatureStore, featurize  # noqa: E402
from chips_core.features.models import load_model  # noqa: E402
from chips_core.pools.ingest import ingest  # noqa: E402
from chips_core.scoring.params import PrepareConfig  # noqa: E402
from chips_core.scoring.prepare import prepare  # noqa: E402
from chips_core.workspace.store import Workspace  # noqa: E402
from tests.fixtures_build import make_csv_pool  # noqa: E402


def _timed(fn, *args, **kwargs) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=512, help="pairs in the pool")
    ap.add_argument("--model", default="chips-tiny-vit")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--address", default=None, help="a running Ray cluster (default: start a local one)")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    ap.add_argument("--num-encoders", type=int, default=1)
    ap.add_argument("--num-gpus-per-worker", type=float, default=0.0)
    ap.add_argument("--prepare-workers", type=int, default=2)
    ap.add_argument("--k-max", type=int, default=256)
    args = ap.parse_args()

    import ray

    from chips_core.engines.ray_featurize import featurize_ray
    from chips_core.engines.ray_prepare import prepare_ray

    device = "cuda" if args.num_gpus_per_worker > 0 else "cpu"
    rows: list[tuple[str, str, int, float]] = []
    with tempfile.TemporaryDirectory(prefix="chips-bench-ray-") as tmp:
        root = Path(tmp)
        manifest = make_csv_pool(root, n=args.n)
        wss = {e: Workspace.init(root / e) for e in ("local", "ray")}
        for ws in wss.values():
            ingest(ws, "pool", str(manifest))
        loaded = load_model(args.model, device=device)
        run_local, dt = _timed(
            featurize, wss["local"], "pool", loaded, device=device, batch_size=args.batch_size,
            shard_size=args.shard_size,
        )  # fmt: skip
        rows.append(("featurize", "local", args.n, dt))
        _, dt = _timed(
            ray.init, address=args.address or "local", num_cpus=None if args.address else args.num_cpus,
            include_dashboard=False if args.address is None else None, log_to_driver=False,
            logging_level="WARNING",
        )  # fmt: skip
        rows.append(("ray.init", "ray", 0, dt))
        run_ray, dt = _timed(
            featurize_ray, wss["ray"], "pool", args.model, batch_size=args.batch_size,
            shard_size=args.shard_size, num_encoders=args.num_encoders,
            num_gpus_per_worker=args.num_gpus_per_worker,
        )  # fmt: skip
        rows.append(("featurize", "ray", args.n, dt))

        params = loaded.adapter.endpoint_params()
        cfg = PrepareConfig(k_max=args.k_max, batch_size=64, chunk_batches=2, device=device)
        pool = FeatureStore(wss["local"], run_local)
        half = FeatureStore(wss["ray"], run_ray)  # same pairs: used as the eval set
        _, dt = _timed(prepare, pool, half, params, cfg, root / "cache-local")
        rows.append(("prepare", "local", len(pool), dt))
        _, dt = _timed(
            prepare_ray, pool, half, params, cfg, root / "cache-ray", num_workers=args.prepare_workers,
            num_gpus_per_worker=args.num_gpus_per_worker,
        )  # fmt: skip
        rows.append((f"prepare ({args.prepare_workers} actors)", "ray", len(pool), dt))
        ray.shutdown()

    print(f"# bench_ray: model {args.model}, {args.n} pairs, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"| {'stage':<24} | {'engine':<6} | {'pairs':>6} | {'seconds':>8} | {'pairs/s':>8} |")
    print(f"|{'-' * 26}|{'-' * 8}|{'-' * 8}|{'-' * 10}|{'-' * 10}|")
    for stage, engine, n, dt in rows:
        rate = f"{n / dt:8.1f}" if n else f"{'-':>8}"
        print(f"| {stage:<24} | {engine:<6} | {n:>6} | {dt:8.2f} | {rate} |")


if __name__ == "__main__":
    main()

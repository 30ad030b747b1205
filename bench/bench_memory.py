"""Peak memory of writing a ViT-B/16-sized feature store and of `prepare` over it, per pool size.

(a) One child process writes a synthetic feature run of --write-pairs pairs (default 2,000,000) at
ViT-B/16 widths (d_v = 768, d_t = 512, fp16: 2,560 B/pair, ≈5.1 GB) through `features.write_shard`, the
writer featurize uses, shard by shard (8,192 rows), into a real workspace, and records its peak RSS when
each requested size has been written. Every smaller size is then registered as its own finished feature
run over the first whole shards of the same files (sizes are rounded up to whole shards), so each size
is read back through the real `FeatureStore`.
(b) For each size, a FRESH child process runs `chips_core.scoring.prepare.prepare` on that run against a small
in-memory eval set, sampling /proc/self/status (RssAnon, RssFile, VmRSS) every 20 ms; VmHWM, the
kernel's exact peak of the total RSS, is read at the end. RssAnon is the process's own memory; RssFile
is page cache of the memory-mapped shards (shared, clean, reclaimable by the kernel) and counts in VmRSS.

The features are synthetic (64 clusters, text features a noisy linear image of the image features, so
p_corr is spread out like a real pool) and the endpoint random; prepare's memory and work do not depend
on the values. Speed is not the point, but pairs/s is printed. The defaults aim at ≈15 minutes on an idle
2-core machine (prepare at ≈1,500 pairs/s): the write is the full 2,000,000 pairs; prepare runs at k_max 64
(Kronecker sketch, batch 1024) with a 16,384-pair curvature subsample on the sizes of --sizes, 62.5k…500k.
On a shared machine it takes longer: 38 min at load average 17–21 on 2 cores (prepare at 245–824
pairs/s; peak anon flat at 804–810 MB from 65k to 508k pairs). The 250k…2M sweep:

    PYTHONPATH=. python bench/bench_memory.py                                  # default, ≈15 min
    PYTHONPATH=. python bench/bench_memory.py --sizes 250000,500000,1000000,2000000   # ≈1 h on 2 cores
    PYTHONPATH=. python bench/bench_memory.py --write-pairs 300000 --sizes 50000,100000,300000 --k-max 256

Everything lives in a temp folder under --dir (default /tmp) that is deleted at the end, also on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

D, D_V, D_T = 512, 768, 512
N_CLUSTERS = 64
FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
MB = 1 << 20


# --- measurement ----------------------------------------------------------------------------------------


def read_status() -> dict[str, int]:
    """FIELDS of /proc/self/status in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in FIELDS:
                out[key] = int(rest.split()[0]) * 1024
    return out


class RssSampler:
    """A daemon thread recording the maximum of each /proc/self/status field every `interval` seconds."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = dict.fromkeys(FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, int]:
        now = read_status()
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# --- synthetic data -------------------------------------------------------------------------------------


def endpoint_params(seed: int):
    """A random ViT-B/16-shaped endpoint (D 512, d_v 768, d_t 512), W_t = scaled first d_t columns of W_v,
    logit scale 100."""
    import torch

    from chips_core.scoring.endpoint import EndpointParams

    rng = np.random.default_rng(seed)
    W_v = rng.standard_normal((D, D_V), dtype=np.float32) / np.sqrt(D_V)
    W_t = W_v[:, :D_T] * np.float32(np.sqrt(D_V / D_T))
    return EndpointParams(torch.from_numpy(W_v), torch.from_numpy(W_t.copy()), torch.tensor(np.log(100.0)))


def synthetic_features(start: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, h, t) of positions [start, start+n): unique ids (a bijective 64-bit mix of the position),
    h = 3·cluster centre + N(0, 1), t = 0.3·h[:, :d_t] + 1.5·N(0, 1), in fp16; seeded by (seed, start)."""
    from chips_core.scoring.batches import mix64

    centres = np.random.default_rng(seed).standard_normal((N_CLUSTERS, D_V), dtype=np.float32)
    rng = np.random.default_rng([seed, start])
    ids = mix64(np.arange(start, start + n, dtype=np.int64), seed).view(np.int64)
    h = rng.standard_normal((n, D_V), dtype=np.float32)
    h += 3.0 * centres[rng.integers(0, N_CLUSTERS, n)]
    t = rng.standard_normal((n, D_T), dtype=np.float32)
    t *= 1.5
    t += 0.3 * h[:, :D_T]
    return ids, h.astype(np.float16), t.astype(np.float16)


# --- child processes ------------------------------------------------------------------------------------


def _register(ws, name: str, model_id: int, run_dir: Path, status: str) -> tuple[int, int]:
    """A ready synthetic pool and its feature run row; (pool_id, run_id)."""
    with ws.connect() as con:
        pool_id = ws.next_id(con)
        con.execute(
            "INSERT INTO pools (pool_id, name, kind, source, format, options, status) "
            "VALUES (?, ?, 'pool', 'synthetic', 'synthetic', '{}', 'ready')",
            [pool_id, name],
        )
        run_id = ws.next_id(con)
        con.execute(
            "INSERT INTO feature_runs (run_id, pool_id, model_id, status, dir, d_v, d_t) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [run_id, pool_id, model_id, status, str(run_dir), D_V, D_T],
        )
    return pool_id, run_id


def child_write(root: Path, n_total: int, sizes: list[int], seed: int) -> dict:
    """Write the feature run of n_total pairs; register a prefix run per size; peak RSS per size."""
    from chips_core.features.featurize import SHARD_SIZE, RunInfo, finish_run, write_shard
    from chips_core.features.models import ModelIdentity, register_model
    from chips_core.workspace.store import Workspace

    ws = Workspace.init(root / "ws")
    model_id = register_model(ws, ModelIdentity("ViT-B-16", "synthetic-features"))
    run_dir = ws.root / "features" / "synthetic"
    run_dir.mkdir(parents=True)
    pool_id, run_id = _register(ws, f"synthetic-{n_total}", model_id, run_dir, "running")
    info = RunInfo(run_id, pool_id, model_id, run_dir, SHARD_SIZE, n_total, D_V, D_T)
    marks, per_size = sorted(set(sizes)), []
    base = read_status()
    t0 = time.perf_counter()
    with RssSampler() as rss:
        for s in range(info.n_shards):
            start, end = info.shard_range(s)
            write_shard(ws, info, s, *synthetic_features(start, end - start, seed))
            while marks and end >= min(marks[0], n_total):
                per_size.append(
                    {
                        "n": end,
                        "seconds": time.perf_counter() - t0,
                        "bytes": sum(p.stat().st_size for p in run_dir.glob("shard-*.npy")),
                        "peak_total": rss.sample()["VmHWM"],
                        "peak_anon": rss.peak["RssAnon"],
                    }
                )
                marks.pop(0)
        finish_run(ws, info)
    runs = {}
    for size in sorted(set(sizes)):
        n_shards = min(-(-size // SHARD_SIZE), info.n_shards)
        n = info.shard_range(n_shards - 1)[1]
        if n == n_total:
            runs[size] = {"run_id": run_id, "n": n}
            continue
        _, rid = _register(ws, f"synthetic-prefix-{n}", model_id, run_dir, "done")
        with ws.connect() as con:
            for s in range(n_shards):
                con.execute(
                    "INSERT INTO feature_shards (run_id, shard_index, n_rows, first_row) VALUES (?, ?, ?, ?)",
                    [rid, s, SHARD_SIZE, s * SHARD_SIZE],
                )
            con.execute("UPDATE feature_runs SET n_pairs = ?, finished_at = now() WHERE run_id = ?", [n, rid])
        runs[size] = {"run_id": rid, "n": n}
    return {"per_size": per_size, "runs": runs, "base_anon": base["RssAnon"], "base_total": base["VmRSS"]}


def child_prepare(root: Path, run_id: int, cfg: dict, seed: int, n_eval: int) -> dict:
    """prepare over one feature run in this (fresh) process; memory before, during and at the end."""
    from chips_core.features.featurize import FeatureStore
    from chips_core.scoring.params import PrepareConfig
    from chips_core.scoring.prepare import ArrayFeatures, prepare
    from chips_core.workspace.store import Workspace

    store = FeatureStore(Workspace(root / "ws"), run_id)
    eval_set = ArrayFeatures(*synthetic_features(10**15, n_eval, seed + 1))
    params = endpoint_params(seed)
    out = root / f"cache-{run_id}"
    timeline: list[tuple[int, int, int]] = []

    def progress(p) -> None:
        if p.stage == "pool":
            now = read_status()
            timeline.append((p.done, now["RssAnon"], now["RssFile"]))

    base = read_status()
    t0 = time.perf_counter()
    with RssSampler() as rss:
        cache = prepare(store, eval_set, params, PrepareConfig(**cfg), out, progress=progress)
    seconds = time.perf_counter() - t0
    end = read_status()
    result = {
        "n": len(store),
        "seconds": seconds,
        "base_anon": base["RssAnon"],
        "base_total": base["VmRSS"],
        "base_file": base["RssFile"],
        "peak_anon": rss.peak["RssAnon"],
        "peak_file": rss.peak["RssFile"],
        "end_anon": end["RssAnon"],
        "peak_total": end["VmHWM"],
        "timeline": timeline,
        "cache_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "p_corr_mean": float(cache.column("p_corr").mean()),
    }
    shutil.rmtree(out)
    return result


def run_child(role: str, **kwargs) -> dict:
    """Run `role` in a fresh interpreter; its result is the JSON line after 'RESULT '."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    payload = json.dumps({"role": role, **kwargs})
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", payload],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{role} child failed with exit code {proc.returncode}: {proc.stdout[-2000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :])


def child_main(payload: str) -> None:
    a = json.loads(payload)
    root = Path(a["root"])
    if a["role"] == "write":
        res = child_write(root, a["n_total"], a["sizes"], a["seed"])
    else:
        res = child_prepare(root, a["run_id"], a["cfg"], a["seed"], a["n_eval"])
    print("RESULT " + json.dumps(res), flush=True)


# --- orchestration and report ---------------------------------------------------------------------------


def _mb(x: float) -> str:
    return f"{x / MB:,.0f}"


def chunk_estimate(cfg: dict) -> dict[str, float]:
    """Analytic per-process terms (bytes) of prepare that depend on the config, not on N."""
    from chips_core.features.featurize import _OPEN_SHARDS, SHARD_SIZE
    from chips_core.scoring.cache import COL_BLOCK

    rows = cfg["chunk_batches"] * cfg["batch_size"]
    kp = -(-cfg["k_max"] // COL_BLOCK) * COL_BLOCK
    return {
        # G parts + their concatenation (float32), then quantize_blocks: padded float64, scaled, fp16 out
        "chunk": rows * (2 * 4 * cfg["k_max"] + 2 * 8 * kp + 2 * kp),
        # logits, softmaxes and their temporaries: ~10 B×B float32 matrices
        "batch": 10 * 4 * cfg["batch_size"] ** 2,
        # memory-mapped shards FeatureStore keeps open (file-backed, shared page cache)
        "mapped": _OPEN_SHARDS * SHARD_SIZE * (D_V + D_T) * 2,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-pairs", type=int, default=2_000_000, help="pairs in the written store")
    ap.add_argument("--sizes", default="62500,125000,250000,500000", help="pool sizes for prepare")
    ap.add_argument("--k-max", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--curvature-pairs", type=int, default=16_384)
    ap.add_argument("--chunk-batches", type=int, default=32)
    ap.add_argument("--n-eval", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default="/tmp", help="parent of the temp folder (needs ≈2.6 kB/pair free)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        child_main(a.child)
        return
    try:
        sizes = sorted({int(s) for s in a.sizes.split(",") if s.strip()})
    except ValueError:
        raise SystemExit(f"--sizes: expected a comma list of integers, got {a.sizes!r}") from None
    if not sizes or sizes[0] < 2 * a.batch_size or sizes[-1] > a.write_pairs:
        raise SystemExit(f"--sizes must lie in [2·batch size, --write-pairs = {a.write_pairs}], got {sizes}")
    cfg = {
        "k_max": a.k_max,
        "batch_size": a.batch_size,
        "curvature_pairs": a.curvature_pairs,
        "chunk_batches": a.chunk_batches,
        "seed": a.seed,
    }
    root = Path(tempfile.mkdtemp(prefix="chips-bench-memory-", dir=a.dir))
    try:
        t0 = time.perf_counter()
        w = run_child(
            "write", root=str(root), n_total=a.write_pairs, sizes=[*sizes, a.write_pairs], seed=a.seed
        )
        print(f"wrote {a.write_pairs:,} pairs in {time.perf_counter() - t0:.0f} s", flush=True)
        prep = []
        for size in sizes:
            run = w["runs"][str(size)]
            r = run_child(
                "prepare", root=str(root), run_id=run["run_id"], cfg=cfg, seed=a.seed, n_eval=a.n_eval
            )
            prep.append(r)
            print(f"prepare on {r['n']:,} pairs: {r['seconds']:.0f} s, peak anon {_mb(r['peak_anon'])} MB, "
                  f"peak total {_mb(r['peak_total'])} MB", flush=True)  # fmt: skip
            print("  " + json.dumps({k: v for k, v in r.items() if k != "timeline"}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(a, cfg, w, prep)


def report(a: argparse.Namespace, cfg: dict, w: dict, prep: list[dict]) -> None:
    """The two markdown tables and the inferred bound."""
    print(
        f"\n(a) writing the feature store: {a.write_pairs:,} pairs, d_v {D_V}, d_t {D_T}, fp16, one process "
        f"(RSS after imports: {_mb(w['base_total'])} MB, anon {_mb(w['base_anon'])} MB)"
    )
    print("| pairs written | GB on disk | seconds | MB/s | peak RSS (VmHWM) MB | peak anon MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in w["per_size"]:
        rate = r["bytes"] / MB / max(r["seconds"], 1e-9)
        print(f"| {r['n']:,} | {r['bytes'] / 1e9:.2f} | {r['seconds']:.0f} | {rate:,.0f} "
              f"| {_mb(r['peak_total'])} | {_mb(r['peak_anon'])} |")  # fmt: skip
    print(f"\n(b) prepare, one fresh process per size: k_max {cfg['k_max']} (kronecker), "
          f"batch {cfg['batch_size']}, curvature subsample {cfg['curvature_pairs']:,} pairs, "
          f"{cfg['chunk_batches']} batches per chunk, eval {a.n_eval} pairs; {os.cpu_count()} CPUs; "
          f"seconds and pairs/s end to end (eval pass and cache load included)")  # fmt: skip
    print(
        "| pairs | seconds | pairs/s | anon before MB | anon at chunk ends MB | anon after return MB "
        "| peak anon MB | file-backed before → peak MB | peak RSS (VmHWM) MB | mean p_corr |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in prep:
        tl = [a for _, a, _ in r["timeline"]]
        ends = f"{_mb(min(tl))}–{_mb(max(tl))}" if tl else "-"
        print(f"| {r['n']:,} | {r['seconds']:.0f} | {r['n'] / r['seconds']:,.0f} | {_mb(r['base_anon'])} "
              f"| {ends} | {_mb(r['end_anon'])} | {_mb(r['peak_anon'])} "
              f"| {_mb(r['base_file'])} → {_mb(r['peak_file'])} | {_mb(r['peak_total'])} "
              f"| {r['p_corr_mean']:.2f} |")  # fmt: skip
    print(
        "anon = RssAnon (private memory), sampled every 5 ms (a shorter spike can be missed); "
        "VmHWM is the kernel's exact peak of anon + file-backed; 'after return' holds the loaded ScoringCache"
    )
    est = chunk_estimate(cfg)
    rows = cfg["chunk_batches"] * cfg["batch_size"]
    full = [r for r in prep if r["n"] >= rows]  # smaller pools have smaller chunks
    print("\ninferred bound:")
    if len(full) >= 2:
        n = np.array([r["n"] for r in full], float)
        for key, what in (("end_anon", "anon after return"), ("peak_anon", "peak anon")):
            slope, icept = np.polyfit(n, np.array([r[key] for r in full], float), 1)
            print(f"  {what} ≈ {icept / MB:,.0f} MB + {slope:,.1f} B/pair × N (least squares over the sizes "
                  f"≥ one chunk of {rows:,} rows); extrapolated to 2,000,000 pairs: "
                  f"{(icept + slope * 2e6) / MB:,.0f} MB")  # fmt: skip
    print(
        f"  config terms: chunk buffers ≈ {est['chunk'] / MB:,.0f} MB (chunk_batches·B rows × k_max: "
        f"G float32 + quantize_blocks float64 padded to 256-column blocks), per-batch B×B matrices "
        f"≈ {est['batch'] / MB:,.0f} MB; the O(N) part is the pair ids, the hashed batch order and the "
        f"finished cache's per-pair columns (aux, ids, scales) that prepare loads to return the ScoringCache"
    )
    print(
        f"  file-backed RSS = shared libraries (the 'before' figure) + page cache of the mapped shards, "
        f"capped by FeatureStore's open-shard limit at {est['mapped'] / MB:,.0f} MB "
        f"(128 shards × 8,192 rows × 2,560 B); clean pages the kernel can drop"
    )


if __name__ == "__main__":
    main()

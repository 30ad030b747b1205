"""Ingest throughput: records/s of `chips_core.pools.ingest.ingest` on CSV and WebDataset pools of real JPEGs.

Builds a pool of N distinct JPEGs (seeded crops of scikit-image's bundled photographs, via
tests/fixtures_build.py) twice: as image files with a CSV manifest and as WebDataset tars (jpg + txt + cls
members). Each (format, workers) cell ingests the pool into a fresh workspace, so every record is read,
fully decoded, hashed and written to DuckDB; the cell checks that all N pairs arrived with no rejects.
workers=0 checks records in the calling process; "default" is ingest's own choice, min(8, CPUs).

    PYTHONPATH=. python bench/bench_ingest.py                       # N=1000, 256 px, csv+wds, 0 vs default
    PYTHONPATH=. python bench/bench_ingest.py --n 5000 --px 512 --workers 0,2,4,default --repeat 3

Prints a markdown table (best of --repeat runs; records/s = N / wall seconds of the ingest call).
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path

from chips_core.pools.ingest import ingest
from chips_core.workspace.store import Workspace
from tests.fixtures_build import real_images, write_images


def make_csv(root: Path, n: int, px: int) -> Path:
    """root/csv/pool.csv (filepath,title,label) over n real JPEG files of px×px."""
    import csv

    folder = root / "csv"
    items = write_images(folder / "images", n, size=px, fmt="jpg")
    manifest = folder / "pool.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title", "label"])
        for path, caption, label in items:
            w.writerow([path.relative_to(folder), caption, label])
    return manifest


def make_wds(root: Path, n: int, px: int, shards: int) -> Path:
    """root/wds/shard-NNNNN.tar with key.jpg + key.txt + key.cls members, the same n images as make_csv."""
    folder = root / "wds"
    folder.mkdir(parents=True, exist_ok=True)
    items = real_images(n, size=px)
    per = -(-n // shards)
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:05d}.tar", "w") as tf:
            for i in range(s * per, min(n, (s + 1) * per)):
                im, caption, label = items[i]
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                members = (("jpg", buf.getvalue()), ("txt", caption.encode()), ("cls", label.encode()))
                for ext, data in members:
                    info = tarfile.TarInfo(f"sample{i:07d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return folder


def image_bytes(fmt: str, source: Path) -> int:
    """Bytes the ingest reads: the JPEG files, or the whole tar shards (headers included)."""
    if fmt == "csv":
        return sum(p.stat().st_size for p in (source.parent / "images").glob("*.jpg"))
    return sum(p.stat().st_size for p in source.glob("*.tar"))


def run_one(root: Path, fmt: str, source: Path, workers: int | None, n: int, tag: str) -> float:
    """Wall seconds of one ingest into a fresh workspace; fails loudly unless all n pairs arrive."""
    ws = Workspace.init(root / f"ws-{tag}")
    t0 = time.perf_counter()
    summary = ingest(ws, "pool", source, fmt=fmt, workers=workers)
    seconds = time.perf_counter() - t0
    if summary.n_pairs != n or summary.n_rejects:
        raise RuntimeError(
            f"{fmt} ingest of {source} gave {summary.n_pairs} pairs and {summary.n_rejects} rejects "
            f"({summary.reject_counts}); expected {n} pairs and none rejected"
        )
    return seconds


def parse_workers(text: str) -> list[int | None]:
    """'0,2,default' → [0, 2, None] (None: ingest's default)."""
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        if part == "default":
            out.append(None)
        elif part.isdigit():
            out.append(int(part))
        else:
            raise SystemExit(f"--workers: expected integers or 'default', got {part!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="records in each pool")
    ap.add_argument("--px", type=int, default=256, help="JPEG side in pixels")
    ap.add_argument("--formats", default="csv,wds", help="comma list of csv, wds")
    ap.add_argument("--workers", default="0,default", help="comma list of worker counts or 'default'")
    ap.add_argument("--wds-shards", type=int, default=4, help="tar shards of the WebDataset pool")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell (best is reported)")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir, deleted after)")
    a = ap.parse_args()
    if a.n < 1 or a.px < 8 or a.repeat < 1 or a.wds_shards < 1:
        raise SystemExit("--n ≥ 1, --px ≥ 8, --repeat ≥ 1 and --wds-shards ≥ 1 are required")
    formats = [f.strip() for f in a.formats.split(",")]
    if bad := [f for f in formats if f not in ("csv", "wds")]:
        raise SystemExit(f"--formats: unknown {bad}; expected csv and/or wds")
    workers = parse_workers(a.workers)
    default_workers = min(8, os.cpu_count() or 1)

    with tempfile.TemporaryDirectory(prefix="chips-bench-ingest-", dir=a.dir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        sources = {}
        if "csv" in formats:
            sources["csv"] = make_csv(root, a.n, a.px)
        if "wds" in formats:
            sources["wds"] = make_wds(root, a.n, a.px, a.wds_shards)
        print(f"built {a.n} real {a.px}px JPEGs as {', '.join(formats)} in {time.perf_counter() - t0:.1f} s",
              flush=True)  # fmt: skip
        rows = []
        for fmt in formats:
            mb = image_bytes(fmt, sources[fmt]) / 1e6
            for w in workers:
                label = f"default (= {default_workers})" if w is None else str(w)
                times = [
                    run_one(root, fmt, sources[fmt], w, a.n, f"{fmt}-{label[:7]}-{r}".replace(" ", ""))
                    for r in range(a.repeat)
                ]
                best = min(times)
                rows.append((fmt, label, best, a.n / best, mb / best))
                print(f"  {fmt} workers={label}: {best:.2f} s", flush=True)

    load = os.getloadavg()
    print(f"\ningest of {a.n:,} records ({a.px}px JPEG), best of {a.repeat}; {os.cpu_count()} CPUs, "
          f"load average {load[0]:.1f} at the end")  # fmt: skip
    print("| format | workers | seconds | records/s | input MB/s |")
    print("|---|---|---:|---:|---:|")
    for fmt, label, sec, rate, mbs in rows:
        print(f"| {fmt} | {label} | {sec:.2f} | {rate:,.0f} | {mbs:.1f} |")


if __name__ == "__main__":
    main()

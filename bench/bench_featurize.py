"""Featurization throughput: end-to-end `featurize` vs the bare encoder forward, printed as a table.

CPU (default): the tiny model on N 256-px JPEG files.  GPU: `--device cuda --model ViT-B-16` compares
end-to-end featurization (PIL decoding in DataLoader workers, and nvJPEG decoding on the GPU) with the
bare bf16 encoder forward on preprocessed tensors, in the same process. Weights do not matter for speed:
without --pretrained the model is randomly initialised (no download).

    PYTHONPATH=. python bench/bench_featurize.py --n 2000 --workers 2
    PYTHONPATH=. python bench/bench_featurize.py --device cuda --model ViT-B-16 --n 20000 \
        --batch-size 1024 --workers 14
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from chips_core.features.featurize import FeatureStore, featurize
from chips_core.features.models import load_model, resolve_device
from chips_core.pools.ingest import ingest
from chips_core.workspace.store import Workspace

SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "retina", "immunohistochemistry", "cat")


def make_pool(root: Path, n: int, px: int) -> Path:
    """n distinct px-sized JPEG crops of scikit-image sample images and a CSV manifest."""
    rng = np.random.default_rng(0)
    images = [np.asarray(Image.fromarray(getattr(data, s)()).convert("RGB")) for s in SOURCES]
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        src = images[i % len(images)]
        h, w = src.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        im = Image.fromarray(src[y : y + side, x : x + side]).resize((px, px), Image.BICUBIC)
        path = root / "img" / f"{i:06d}.jpg"
        im.save(path, quality=90)
        rows.append((str(path), f"{SOURCES[i % len(SOURCES)]} crop {i} at {x},{y} size {side}"))
    manifest = root / "pool.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        w.writerows(rows)
    return manifest


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_forward(loaded, dev: torch.device, batch_size: int, n_batches: int) -> float:
    """Pairs/s of the bare encoder forward (both towers) on ready tensors, bf16 autocast on CUDA."""
    images = torch.randn(batch_size, 3, *loaded.image_size, device=dev)
    tokens = loaded.tokenizer([f"a photo number {i}" for i in range(batch_size)]).to(dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        loaded.encode(images, tokens)  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            loaded.encode(images, tokens)
        sync(dev)
    return batch_size * n_batches / (time.perf_counter() - t0)


def bench_decode(loaded, files: list[str]) -> float:
    """Pairs/s of PIL JPEG decode + open_clip preprocess on one CPU core."""
    t0 = time.perf_counter()
    for f in files:
        loaded.preprocess(Image.open(io.BytesIO(Path(f).read_bytes())).convert("RGB"))
    return len(files) / (time.perf_counter() - t0)


def bench_featurize(
    root: Path, manifest: Path, loaded, dev, args, gpu_decode: bool, tag: str
) -> tuple[float, int]:
    ws = Workspace.init(root / f"ws-{tag}")
    ingest(ws, "pool", manifest, workers=args.workers)
    t0 = time.perf_counter()
    run_id = featurize(
        ws, "pool", loaded, device=str(dev), batch_size=args.batch_size, num_workers=args.workers,
        shard_size=args.shard_size, gpu_decode=gpu_decode,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    return len(FeatureStore(ws, run_id)) / seconds, run_id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="chips-tiny-vit")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=2000, help="pairs in the synthetic pool")
    ap.add_argument("--px", type=int, default=256, help="JPEG side in pixels")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--shard-size", type=int, default=8192)
    ap.add_argument("--forward-batches", type=int, default=10)
    args = ap.parse_args()
    dev = resolve_device(args.device)
    loaded = load_model(args.model, args.pretrained, device=dev)
    rows = []
    with tempfile.TemporaryDirectory(prefix="chips-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        manifest = make_pool(root, args.n, args.px)
        print(f"made {args.n} JPEGs of {args.px}px in {time.perf_counter() - t0:.1f}s", flush=True)
        files = [str(p) for p in sorted((root / "img").glob("*.jpg"))[: min(args.n, 500)]]
        rows.append(("JPEG decode + preprocess, PIL, 1 core", "cpu", bench_decode(loaded, files)))
        precision = "bf16 autocast" if dev.type == "cuda" else "fp32"
        fwd = bench_forward(loaded, dev, args.batch_size, args.forward_batches)
        rows.append((f"encoder forward, both towers, {precision}", str(dev), fwd))
        rate, _ = bench_featurize(root, manifest, loaded, dev, args, False, "pil")
        rows.append((f"featurize end to end, PIL in {args.workers} workers", str(dev), rate))
        if dev.type == "cuda":
            rate, _ = bench_featurize(root, manifest, loaded, dev, args, True, "nvjpeg")
            rows.append((f"featurize end to end, nvJPEG on GPU, {args.workers} workers", str(dev), rate))
    print(f"\nmodel {loaded.identity.label()}, {args.n} pairs, {args.px}px JPEG, batch {args.batch_size}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"| {'what':<58} | {'device':<6} | {'pairs/s':>10} |")
    print(f"|{'-' * 60}|{'-' * 8}|{'-' * 12}|")
    for what, device, value in rows:
        print(f"| {what:<58} | {device:<6} | {value:>10,.0f} |")


if __name__ == "__main__":
    main()

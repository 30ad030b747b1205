"""Build the icon benchmark: Material Design icons in several styles, with ground truth, and two tiny CLIPs.

One command, deterministic with a seed, offline after a single `npm pack` of the icon package:

    python bench/icons/build.py --out /work/bench-data/icons            # images, manifests, both models
    python bench/icons/build.py --out DIR --skip-train                   # images and manifests only
    python bench/icons/build.py --out DIR --train free                   # one model (free | clamped)

Needs: `npm` (only for the first fetch; `--npm-cache DIR` holds the tarball, default /work/cache/icons),
`rsvg-convert` (Debian package librsvg2-bin) to rasterise the SVGs, and a Python with numpy, pandas,
pillow, scikit-learn and open_clip_torch + open_clip_train (the project's dev venv has them).

Source: @material-design-icons/svg 0.14.15 (Apache-2.0; Google's Material Icons, repackaged by
marella/material-design-icons). 2,122 icons, each drawn in five styles: filled, outlined, round, sharp,
two-tone. Only concepts whose filled and outlined drawings really differ are used (many icons have
no distinct outline drawing).

Styles and splits (concepts = icon names; `concept` column):
  pretrain  GENERAL style (filled) of every used concept: the tiny CLIPs learn the names here
  pool      >= 2,000 pairs: ~36% TARGET style (outlined) of pool concepts, ~36% NEAR style (two-tone) of
            pool concepts, ~9% target-style images with a wrong caption (planted=mismatch, the caption of
            another pool concept), ~19% off-domain (scikit-learn's handwritten digits, planted=off_domain)
  val       target style of VAL concepts: the eval set CHIPS scores against (target gradient)
  test      target style of TEST concepts (held out from pool and val): evaluation after CPT only
  test_seen new target-style renders of pool concepts (images not in the pool): the easier test, where
            CPT on the pool's clean target-style pairs must help
Concept sets of pool, val and test are disjoint; all three are in pretrain (general style), so CPT on
clean target-style pairs has to transfer the STYLE to unseen-in-target concepts.

Images: 64x64 PNG (the tiny model's input size); the SVG is rasterised once per (style, icon) at 96 px,
then every pair is a new light augmentation: scale 72-95%, shift, rotation +-8 degrees, random dark ink
on a random light background, a little noise. Every image is byte-distinct.
Captions: the icon name through templates ("an icon of a shopping cart", "shopping cart icon", ...); the
style is visible in the image only.
Manifest columns: filepath (relative to the manifest), title, label (the image's concept, 'digit' for
digits), planted (none | mismatch | off_domain), style (filled | outlined | two-tone | digits), concept,
split, true_caption (mismatch: what the caption should have said), augmentation.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

PACKAGE = "@material-design-icons/svg"
VERSION = "0.14.15"
LICENSE = "Apache-2.0 (Material Icons by Google, via @material-design-icons/svg 0.14.15)"
DIGITS_LICENSE = "scikit-learn load_digits (BSD-3-Clause package; UCI optical digits)"
GENERAL, TARGET, NEAR = "filled", "outlined", "two-tone"
PX = 64
RASTER_PX = 96
N_CONCEPTS = {"test": 60, "val": 40, "pool": 260}  # drawn at random from the usable concepts
PRETRAIN_RENDERS = 16  # general-style renders per concept
EVAL_RENDERS = 3  # target-style renders per val / test concept
SEEN_CONCEPTS = 180  # test_seen: one new target-style render each of this many pool concepts
POOL = {"target": 880, "near": 880, "mismatch": 220, "off_domain": 460}  # 2,440 pairs
MIN_STYLE_DIFF = 0.12  # mean |alpha(filled) - alpha(outlined)| over the icon's ink area
MODEL_NAME = "chips-tiny-vit"
REPO = Path(__file__).resolve().parents[2]
MODEL_CONFIG = REPO / "chips_core" / "model_configs" / f"{MODEL_NAME}.json"
TRAIN = {"batch_size": 64, "lr": 1e-3, "wd": 0.1, "warmup": 100, "epochs": 8}
VARIANTS = {"free": None, "clamped": float(np.log(100.0))}  # init_logit_scale (None: open_clip's ln(1/0.07))
TEMPLATES = [
    "an icon of {a} {n}",
    "{n} icon",
    "{a} {n} symbol",
    "pictogram of {a} {n}",
    "{n}",
    "the {n} icon",
    "{a} simple {n} glyph",
    "user interface icon: {n}",
]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = [
    "a handwritten digit {d}",
    "the number {w} written by hand",
    "handwritten {w}",
    "scanned digit: {d}",
    "digit {d}, pen on paper",
]
COLUMNS = [
    "filepath",
    "title",
    "label",
    "planted",
    "style",
    "concept",
    "split",
    "true_caption",
    "augmentation",
    "source_file",
    "source_license",
]


def need(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if not path:
        sys.exit(f"build.py: `{tool}` not found on PATH; {hint}")
    return path


def fetch_package(cache: Path) -> Path:
    """npm pack the icon package into `cache` once; return the unpacked `package/` folder."""
    root = cache / f"material-svg-{VERSION}"
    if (root / "package" / "filled").is_dir():
        return root / "package"
    cache.mkdir(parents=True, exist_ok=True)
    tgz = cache / f"material-design-icons-svg-{VERSION}.tgz"
    if not tgz.is_file():
        need("npm", "install Node.js/npm for the one-time fetch, or put the tarball at " + str(tgz))
        subprocess.run(["npm", "pack", f"{PACKAGE}@{VERSION}", "--silent"], cwd=cache, check=True)
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tgz) as tf:
        tf.extractall(root, filter="data")
    return root / "package"


def raster(pkg: Path, style: str, name: str, cache: Path) -> np.ndarray:
    """Alpha mask (float32 in [0, 1], RASTER_PX square) of one icon, rasterised by rsvg-convert (cached)."""
    out = cache / "raster" / style / f"{name}.png"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.png")
        subprocess.run(
            [
                "rsvg-convert",
                "-w",
                str(RASTER_PX),
                "-h",
                str(RASTER_PX),
                "-o",
                str(tmp),
                str(pkg / style / f"{name}.svg"),
            ],
            check=True,
        )
        os.replace(tmp, out)
    return np.asarray(Image.open(out).convert("RGBA"), np.float32)[..., 3] / 255.0


def caption_name(name: str) -> str:
    return name.replace("_", " ")


def usable(name: str) -> bool:
    """Icon names that read as words (skip '10k', '3p', 'wifi_1_bar'-style counters stay)."""
    return bool(re.fullmatch(r"[a-z][a-z0-9_]*", name)) and any(len(w) >= 3 for w in name.split("_"))


def choose_concepts(pkg: Path, cache: Path, seed: int) -> tuple[list[str], dict]:
    names = sorted(p.stem for p in (pkg / GENERAL).glob("*.svg"))
    names = [n for n in names if usable(n) and all((pkg / s / f"{n}.svg").is_file() for s in (TARGET, NEAR))]

    def diff(n: str) -> float:
        a, b = raster(pkg, GENERAL, n, cache), raster(pkg, TARGET, n, cache)
        ink = np.maximum(a, b) > 0.1
        return float(np.abs(a - b)[ink].mean()) if ink.any() else 0.0

    with ThreadPoolExecutor(4) as ex:
        diffs = dict(zip(names, ex.map(diff, names), strict=True))
    keep = [n for n in names if diffs[n] >= MIN_STYLE_DIFF]
    # one concept per caption string (e.g. 'call' and 'call_' never both)
    seen, concepts = set(), []
    for n in keep:
        if caption_name(n) not in seen:
            seen.add(caption_name(n))
            concepts.append(n)
    order = np.random.default_rng(seed).permutation(len(concepts))
    concepts = [concepts[i] for i in order][: sum(N_CONCEPTS.values())]
    stats = {
        "icons": len(list((pkg / GENERAL).glob("*.svg"))),
        "usable_names": len(names),
        "distinct_filled_vs_outlined": len(keep),
        "distinct_captions": len(seen),
        "concepts": len(concepts),
    }
    return concepts, stats


def colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    import colorsys

    ink = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.8), rng.uniform(0.05, 0.45))
    bg = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.15), rng.uniform(0.85, 1.0))
    return np.array(ink, np.float32), np.array(bg, np.float32)


def render(alpha: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """One augmented PX x PX view of an icon mask: scale, rotation, shift, colours, noise -> PNG bytes."""
    scale = float(rng.uniform(0.72, 0.95))
    size = max(8, round(PX * scale))
    angle = float(rng.uniform(-8, 8))
    m = Image.fromarray((alpha * 255).astype(np.uint8), "L").resize((size, size), Image.LANCZOS)
    m = m.rotate(angle, resample=Image.BILINEAR)
    dy, dx = int(rng.integers(0, PX - size + 1)), int(rng.integers(0, PX - size + 1))
    canvas = np.zeros((PX, PX), np.float32)
    canvas[dy : dy + size, dx : dx + size] = np.asarray(m, np.float32) / 255.0
    ink, bg = colours(rng)
    img = canvas[..., None] * ink + (1 - canvas[..., None]) * bg
    img = np.clip(img + rng.normal(0, 0.015, img.shape), 0, 1)
    buf = io.BytesIO()
    Image.fromarray((img * 255).round().astype(np.uint8), "RGB").save(buf, "PNG", optimize=True)
    aug = f"scale({scale:.2f}) rotate({angle:.1f}) shift({dy},{dx}) ink{_rgb(ink)} bg{_rgb(bg)}"
    return buf.getvalue(), aug


def _rgb(c: np.ndarray) -> str:
    return "(" + ",".join(f"{float(x):.2f}" for x in c) + ")"


def digit_render(pixels: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """An 8x8 scikit-learn digit as a mask, through the same augmentation as the icons."""
    a = pixels.reshape(8, 8).astype(np.float32) / 16.0
    a = np.asarray(
        Image.fromarray((a * 255).astype(np.uint8), "L").resize((RASTER_PX, RASTER_PX), Image.BILINEAR)
    )
    return render(a.astype(np.float32) / 255.0, rng)


def caption(name: str, rng: np.random.Generator) -> str:
    n = caption_name(name)
    a = "an" if n[0] in "aeiou" else "a"
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(a=a, n=n)


def build(out: Path, cache: Path, seed: int) -> dict:
    need("rsvg-convert", "install it with `apt-get install librsvg2-bin` (Debian/Ubuntu)")
    pkg = fetch_package(cache)
    concepts, stats = choose_concepts(pkg, cache, seed)
    n_test, n_val = N_CONCEPTS["test"], N_CONCEPTS["val"]
    sets = {
        "test": concepts[:n_test],
        "val": concepts[n_test : n_test + n_val],
        "pool": concepts[n_test + n_val :],
    }
    info_sets = {k: sorted(v) for k, v in sets.items()}
    from sklearn.datasets import load_digits

    digits = load_digits()
    img_root = out / "images"
    if img_root.exists():
        shutil.rmtree(img_root)
    seen: set[str] = set()
    manifests: dict[str, pd.DataFrame] = {}

    for split_i, split in enumerate(["pretrain", "pool", "val", "test", "test_seen"]):
        rng = np.random.default_rng([seed, split_i])
        plan: list[tuple[str, str, str]] = []  # (kind, style, concept)
        if split == "pretrain":
            plan = [("none", GENERAL, c) for c in concepts for _ in range(PRETRAIN_RENDERS)]
        elif split in ("val", "test"):
            plan = [("none", TARGET, c) for c in sets[split] for _ in range(EVAL_RENDERS)]
        elif split == "test_seen":  # new target-style renders of pool concepts (seen in the pool)
            plan = [
                ("none", TARGET, c)
                for c in sorted(sets["pool"])[:: max(1, len(sets["pool"]) // SEEN_CONCEPTS)][:SEEN_CONCEPTS]
            ]
        else:
            pc = sets["pool"]
            picks = {k: [pc[int(i)] for i in rng.integers(0, len(pc), POOL[k])] for k in ("target", "near")}
            picks["mismatch"] = [pc[int(i)] for i in rng.integers(0, len(pc), POOL["mismatch"])]
            plan = [("none", TARGET, c) for c in picks["target"]]
            plan += [("none", NEAR, c) for c in picks["near"]]
            plan += [("mismatch", TARGET, c) for c in picks["mismatch"]]
            plan += [("off_domain", "digits", "") for _ in range(POOL["off_domain"])]
        plan = [plan[i] for i in rng.permutation(len(plan))]
        digit_order = iter(rng.permutation(len(digits.target)))
        (img_root / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for kind, style, concept in plan:
            true_caption = ""
            while True:
                if kind == "off_domain":
                    di = int(next(digit_order))
                    d = int(digits.target[di])
                    data, aug = digit_render(digits.data[di], rng)
                    tmpl = DIGIT_TEMPLATES[int(rng.integers(len(DIGIT_TEMPLATES)))]
                    title, label, src, lic = (
                        tmpl.format(d=d, w=DIGIT_WORDS[d]),
                        "digit",
                        f"digits[{di}]",
                        DIGITS_LICENSE,
                    )
                else:
                    data, aug = render(raster(pkg, style, concept, cache), rng)
                    title, label, src, lic = (
                        caption(concept, rng),
                        caption_name(concept),
                        f"{style}/{concept}.svg",
                        LICENSE,
                    )
                    if kind == "mismatch":
                        other = concept
                        while caption_name(other) == caption_name(concept):
                            other = sets["pool"][int(rng.integers(len(sets["pool"])))]
                        true_caption, title = title, caption(other, rng)
                digest = hashlib.sha256(data).hexdigest()
                if digest not in seen:
                    seen.add(digest)
                    break
            rel = f"images/{split}/{len(rows):05d}.png"
            (out / rel).write_bytes(data)
            rows.append(
                {
                    "filepath": rel,
                    "title": title,
                    "label": label,
                    "planted": kind,
                    "style": style,
                    "concept": concept,
                    "split": split,
                    "true_caption": true_caption,
                    "augmentation": aug,
                    "source_file": src,
                    "source_license": lic,
                }
            )
        df = pd.DataFrame(rows, columns=COLUMNS)
        df.to_csv(out / f"{split}.csv", index=False)
        manifests[split] = df
    pool = manifests["pool"]
    clean = pool[(pool.planted == "none") & (pool["style"] == TARGET)]
    clean.to_csv(out / "pool_clean_target.csv", index=False)  # the 'right pairs' for the CPT check
    info = {
        "package": f"{PACKAGE}@{VERSION}",
        "license": LICENSE,
        "seed": seed,
        "px": PX,
        "styles": {"general": GENERAL, "target": TARGET, "near": NEAR},
        **stats,
        "concept_sets": {k: len(v) for k, v in sets.items()},
        "concepts_by_split": info_sets,
        "pairs": {k: len(v) for k, v in manifests.items()},
        "pool_by_kind": pool.groupby(["planted", "style"])
        .size()
        .rename("n")
        .reset_index()
        .to_dict("records"),
        "pool_clean_target": len(clean),
    }
    return info


def open_clip_config(variant: str) -> dict:
    cfg = json.loads(MODEL_CONFIG.read_text())
    if VARIANTS[variant] is not None:
        cfg["init_logit_scale"] = VARIANTS[variant]
    return {"model_name": MODEL_NAME, "model_cfg": cfg}


def train(out: Path, variant: str, epochs: int, seed: int) -> dict:
    """Pretrain one tiny CLIP on pretrain.csv with `python -m open_clip_train.main` (CPU, fp32)."""
    import torch

    work = out / "train" / variant
    if work.exists():
        shutil.rmtree(work)
    cfg_dir = work / "cfg"
    cfg_dir.mkdir(parents=True)
    (cfg_dir / "open_clip_config.json").write_text(json.dumps(open_clip_config(variant), indent=2))
    for split in ("pretrain", "val"):
        df = pd.read_csv(out / f"{split}.csv")
        df["filepath"] = [str((out / p).resolve()) for p in df["filepath"]]
        df[["filepath", "title"]].to_csv(work / f"{split}.csv", index=False)
    a = dict(TRAIN, epochs=epochs, seed=seed)
    cmd = [
        sys.executable,
        "-m",
        "open_clip_train.main",
        "--train-data",
        str(work / "pretrain.csv"),
        "--val-data",
        str(work / "val.csv"),
        "--dataset-type",
        "csv",
        "--csv-separator",
        ",",
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "title",
        "--model",
        f"local-dir:{cfg_dir}",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--workers",
        "1",
        "--batch-size",
        str(a["batch_size"]),
        "--lr",
        str(a["lr"]),
        "--wd",
        str(a["wd"]),
        "--warmup",
        str(a["warmup"]),
        "--epochs",
        str(a["epochs"]),
        "--seed",
        str(a["seed"]),
        "--logs",
        str(work / "logs"),
        "--name",
        variant,
        "--save-frequency",
        str(a["epochs"]),
        "--val-frequency",
        "1",
        "--log-every-n-steps",
        "20",
        "--report-to",
        "",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    with open(work / "train.log", "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        tail = (work / "train.log").read_text()[-3000:]
        raise RuntimeError(f"open_clip_train failed (exit {proc.returncode}):\n{tail}")
    ckpt = work / "logs" / variant / "checkpoints" / f"epoch_{epochs}.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    results = work / "logs" / variant / "checkpoints" / "results.jsonl"
    metrics = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    model_dir = out / "models" / variant
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    (model_dir / "open_clip_config.json").write_text(json.dumps(open_clip_config(variant), indent=2) + "\n")
    torch.save(state, model_dir / "open_clip_pytorch_model.bin")
    shutil.rmtree(work / "logs" / variant / "checkpoints")  # keep the log, drop the optimizer state
    return {
        "command": " ".join(cmd).replace(str(out), "$OUT").replace(sys.executable, "python"),
        "seconds": round(seconds, 1),
        "args": a,
        "logit_scale": float(state["logit_scale"].exp()),
        "val_metrics_per_epoch": [
            {k: round(float(v), 4) for k, v in m.items() if isinstance(v, int | float)} for m in metrics
        ],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/work/bench-data/icons"))
    ap.add_argument("--npm-cache", type=Path, default=Path("/work/cache/icons"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=TRAIN["epochs"])
    ap.add_argument("--skip-images", action="store_true", help="keep the images and manifests in --out")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--train", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS))
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / "bench.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if not args.skip_images:
        t0 = time.monotonic()
        info.update(build(out, args.npm_cache.resolve(), args.seed))
        info["build_seconds"] = round(time.monotonic() - t0, 1)
        info_path.write_text(json.dumps(info, indent=2) + "\n")
        print(f"images: {info['pairs']} ({info['concepts']} concepts) in {info['build_seconds']} s")
    if not args.skip_train:
        for variant in args.train:
            t = train(out, variant, args.epochs, args.seed)
            info = json.loads(info_path.read_text()) if info_path.exists() else {}  # parallel builds
            info.setdefault("models", {})[variant] = t
            info_path.write_text(json.dumps(info, indent=2) + "\n")
            print(
                f"model {variant}: {t['seconds']} s, logit_scale {t['logit_scale']:.2f}, "
                f"val {t['val_metrics_per_epoch'][-1] if t['val_metrics_per_epoch'] else {}}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

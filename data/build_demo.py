"""Rebuild the bundled demo (data/demo/): images, manifests, and a tiny CLIP trained by open_clip_train.

Everything comes from installed packages, offline: pydicom's and pydicom-data's DICOM test files,
scikit-image's bundled retina / microaneurysms / cell / immunohistochemistry images, scikit-learn's digits.
Few distinct source images exist, so every pair is a new random view of one (crop, flip, rotation,
intensity change) with a caption built from DICOM tags or the source's description, through templates.

Splits (disjoint in pairs, not in source images -- there are only 24 sources):
  pretrain  clean target-domain pairs + digits; used ONLY to train the demo model
  pool      the pool CHIPS ranks, with planted mismatched captions and off-domain digit pairs
  val       the target eval set (validation split) the scores are computed against
  test      held out for evaluation after CPT
The manifest column `planted` (none | mismatch | off_domain) is the ground truth for tests and the UI.

Usage: python data/build_demo.py [--out data/demo] [--skip-train] [--epochs N] [--seed S]
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
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))  # chips_core, when run as `python data/build_demo.py`
DEFAULT_OUT = ROOT / "demo"
IMAGE_PX = 96  # pool / eval images (the dashboard shows them)
PRETRAIN_PX = 64  # the model's input size: the large pretraining split stays small on disk
JPEG_QUALITY = 88
SPLIT_SIZES = {"pretrain": 4000, "pool": 720, "val": 150, "test": 150}  # clean target-domain pairs
POOL_MISMATCH = 120
POOL_OFF_DOMAIN = 120
PRETRAIN_DIGITS = 300
MANIFEST_NAMES = {
    "pretrain": "pretrain.csv",
    "pool": "pool.csv",
    "val": "eval_val.csv",
    "test": "eval_test.csv",
}
MANIFEST_COLUMNS = [
    "filepath", "title", "label", "planted", "split", "source_package", "source_file", "source_frame",
    "source_license", "augmentation", "true_caption",
]  # fmt: skip

# The tiny CLIP the project trains itself: teammate B's registered config, so
# chips_core.features.models.load_model loads the checkpoint by name; the bundle also carries the config
# (open_clip "local-dir:" format).
MODEL_NAME = "chips-tiny-vit"
MODEL_CONFIG_FILE = ROOT.parent / "chips_core" / "features" / "model_configs" / f"{MODEL_NAME}.json"
CHECKPOINT_NAME = "open_clip_pytorch_model.bin"
TRAIN_ARGS = {"batch_size": 64, "lr": 1e-3, "wd": 0.1, "warmup": 50, "epochs": 4, "seed": 0}

LICENSES = {
    "pydicom": "pydicom test file, shipped with pydicom (MIT); origin: pydicom/data/test_files/README.txt",
    "pydicom-data": "pydicom-data test file (package MIT); origin: pydicom/data/test_files/README.txt",
    "skimage:retina": "CC0 1.0 (Wikimedia Commons, M. Häggström), shipped in scikit-image (BSD-3-Clause)",
    "skimage:microaneurysms": "CC0 (HRF database, A. Maier), shipped in scikit-image (BSD-3-Clause)",
    "skimage:cell": "CC0 (P. Müller et al. 2018), shipped in scikit-image (BSD-3-Clause)",
    "skimage:ihc": "no known copyright restrictions (CMMI), shipped in scikit-image (BSD-3-Clause)",
    "sklearn:digits": "UCI optical digits test set, shipped in scikit-learn (BSD-3-Clause)",
}

MODALITY = {  # DICOM Modality -> (label, short name, long names)
    "CT": ("CT", "CT", ["computed tomography", "CT scan"]),
    "MR": ("MRI", "MRI", ["magnetic resonance image", "MR scan"]),
    "CR": ("X-ray", "X-ray", ["computed radiograph", "plain radiograph"]),
    "DX": ("X-ray", "X-ray", ["digital radiograph", "plain radiograph"]),
    "US": ("ultrasound", "ultrasound", ["ultrasound image", "sonogram"]),
    "NM": ("nuclear medicine", "scintigraphy", ["nuclear medicine scan", "gamma camera image"]),
}
MIN_SIDE = 64


@dataclass
class Source:
    """One distinct source image with what is known about it."""

    key: str
    image: np.ndarray  # float32 in [0, 1], (H, W) or (H, W, 3)
    label: str  # category, e.g. "CT", "fundus photograph"
    package: str
    file: str  # path inside its package
    frame: int
    fields: dict = field(default_factory=dict)  # caption ingredients (body, study, series, ...)


# ----------------------------------------------------------------------------------------------- sources
_BRACKETED = re.compile(r"<[^<>]*>")  # "<MPR Collection>": a vendor's series-type leftover
_SPACE_BEFORE_SEP = re.compile(r"\s+([,;:])")
_END_SEPARATORS = " ,;:/-_.|"


def clean_description(value: object) -> str:
    """A DICOM tag value as caption text: "" for a missing value, angle-bracketed leftovers
    ("marked lesion<MPR Collection>" -> "marked lesion") and stray angle brackets removed, the person-name
    separator ^ read as a space, whitespace collapsed, separators trimmed from both ends and the space
    before a comma dropped. A value with nothing left is "" (the caption templates then skip it)."""
    if value is None:
        return ""
    text = _BRACKETED.sub(" ", str(value).replace("^", " "))
    text = " ".join(text.replace("<", " ").replace(">", " ").split())
    return _SPACE_BEFORE_SEP.sub(r"\1", text).strip(_END_SEPARATORS)


def _tag(ds, name: str) -> str:
    return clean_description(ds.get(name))


def _package_of(path: str) -> tuple[str, str]:
    parts = Path(path).parts
    if "data_store" in parts:
        i = parts.index("data_store")
        return "pydicom-data", "/".join(parts[i:])
    i = parts.index("pydicom")
    return "pydicom", "/".join(parts[i:])


def _thumb(img: np.ndarray) -> np.ndarray:
    gray = img.mean(axis=-1) if img.ndim == 3 else img
    t = np.asarray(
        Image.fromarray((gray * 255).astype(np.uint8)).resize((24, 24), Image.BILINEAR), np.float32
    )
    return (t - t.mean()) / (t.std() + 1e-6)


def dicom_sources() -> tuple[list[Source], dict[str, int]]:
    """Distinct, decodable clinical DICOM images from pydicom and pydicom-data; skip counts by reason."""
    import pydicom
    import pydicom.data

    from chips_core.pools.dicom import DicomError
    from chips_core.pools.dicom import decode as decode_dicom

    sources: list[Source] = []
    thumbs: list[np.ndarray] = []
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    for path in sorted(pydicom.data.get_testdata_files()):
        if os.path.isdir(path):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            modality = _tag(ds, "Modality")
            if modality not in MODALITY:
                skip(f"not a clinical image (Modality {modality or 'missing'})")
                continue
            # The product's own DICOM reader: modality LUT, VOI window, MONOCHROME1 inverted, 8-bit,
            # palette and YBR to RGB, the middle frame of a multi-frame file.
            pixels = decode_dicom(Path(path).read_bytes()).pixels
        except DicomError as exc:  # no pixel data, codec missing offline, broken test file
            skip(exc.reason)
            continue
        except Exception as exc:  # not DICOM at all (pydicom's test folder holds other files too)
            skip(f"unreadable ({type(exc).__name__})")
            continue
        img = pixels.astype(np.float32) / 255.0
        if min(img.shape[:2]) < MIN_SIDE or float(img.std()) < 0.02:  # 16x16 DICOMDIR thumbnails: blobs
            skip(f"smaller than {MIN_SIDE} px or blank")
            continue
        th = _thumb(img)
        if any(np.mean(np.abs(th - o)) < 0.25 for o in thumbs):  # same picture, other transfer syntax
            skip("duplicate of another test file")
            continue
        thumbs.append(th)
        fields = {
            "modality": modality,
            "body": _tag(ds, "BodyPartExamined").lower(),
            "study": _tag(ds, "StudyDescription"),
            "series": _tag(ds, "SeriesDescription"),
        }
        package, rel = _package_of(path)
        frame = int(ds.get("NumberOfFrames", 1) or 1) // 2
        sources.append(
            Source(f"{package}:{rel}#{frame}", img, MODALITY[modality][0], package, rel, frame, fields)
        )
    return sources, skipped


def skimage_sources() -> list[Source]:
    """scikit-image's bundled medical and microscopy images (no download)."""
    import skimage.data as sd

    def f01(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32)
        return (a - a.min()) / max(float(a.max() - a.min()), 1e-6)

    return [
        Source("skimage:retina", f01(sd.retina()), "fundus photograph", "skimage:retina",
               "skimage/data/retina.jpg", 0, {"desc": "colour fundus photograph of a normal left eye"}),
        Source("skimage:microaneurysms", f01(sd.microaneurysms()), "fundus photograph",
               "skimage:microaneurysms", "skimage/data/microaneurysms.png", 0,
               {"desc": "retina detail with microaneurysms, green channel"}),
        Source("skimage:cell", f01(sd.cell()), "microscopy", "skimage:cell", "skimage/data/cell.png", 0,
               {"desc": "quantitative phase image of a cell floating in saline"}),
        Source("skimage:ihc", f01(sd.immunohistochemistry()), "histology", "skimage:ihc",
               "skimage/data/ihc.png", 0,
               {"desc": "immunohistochemistry of colonic glands, DAB with hematoxylin counterstain"}),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- captions
CATEGORY_TEMPLATES = {
    "fundus photograph": ["fundus photograph of the retina", "retinal fundus image", "{desc}",
                          "ophthalmology: fundus photo of the eye",
                          "photograph of the retina and its vessels"],
    "microscopy": ["microscopy image of a cell", "{desc}", "phase microscopy of a single cell",
                   "light microscopy, cell in saline"],
    "histology": ["histology slide", "{desc}", "stained tissue section under the microscope",
                  "pathology slide, stained tissue"],
}  # fmt: skip


_LETTER_VOWEL_SOUND = set("AEFHILMNORSX")  # letters whose name starts with a vowel sound: "an MR scan"
_VOWEL_LETTER_CONSONANT_SOUND = ("uni", "use", "usu", "uro", "eu", "one")  # "a unit", "a European"
_SILENT_H = ("hour", "honest", "honor", "honour", "heir")


def with_article(phrase: str) -> str:
    """The phrase with "a" or "an" by the sound of its first word: "an ultrasound image", "an MR scan",
    "an X-ray", "a CT scan", "a sonogram", "a unit". An initialism (all capitals, or one capital before a
    hyphen) is read letter by letter; any other word by its spelling, with the common exceptions."""
    word = phrase.split()[0] if phrase.split() else ""
    head = word.split("-")[0]
    if head.isalpha() and head.isupper() and (len(head) > 1 or "-" in word or len(word) == 1):
        vowel_sound = head[0] in _LETTER_VOWEL_SOUND
    else:
        w = word.lower()
        vowel_sound = (w[:1] in tuple("aeiou") and not w.startswith(_VOWEL_LETTER_CONSONANT_SOUND)) or (
            w.startswith(_SILENT_H)
        )
    return f"{'an' if vowel_sound else 'a'} {phrase}"


def caption_for(src: Source, rng: np.random.Generator) -> str:
    """A caption from the source's DICOM tags or description, through a randomly chosen template."""
    f = src.fields
    if "modality" in f:
        _, short, longs = MODALITY[f["modality"]]
        long = longs[int(rng.integers(len(longs)))]
        body, study, series = f["body"], f["study"], f["series"]
        options = [f"{long}", f"{short} image", with_article(long)]
        if body:
            options += [f"{long} of the {body}", f"{short} {body}", f"{body} {short} image"]
        if study:
            options += [f"{short}: {study}", f"{study} ({long})"]
        if series:
            options += [f"{short}, series {series}"]
        if body and study:
            options += [f"{short} of the {body}, {study}"]
        return options[int(rng.integers(len(options)))]
    templates = CATEGORY_TEMPLATES[src.label]
    return templates[int(rng.integers(len(templates)))].format(**f)


def with_attributes(caption: str, attrs: list[str]) -> str:
    """Append the view's visible attributes: "CT of the head, close-up, rotated 90 degrees"."""
    return ", ".join([caption, *attrs])


DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = ["a handwritten digit {d}", "the number {w} written by hand", "handwritten {w}",
                   "scanned digit: {d}", "a hand-drawn {d} on a form", "digit {d}, pen on paper"]  # fmt: skip


def digit_caption(d: int, rng: np.random.Generator) -> str:
    return DIGIT_TEMPLATES[int(rng.integers(len(DIGIT_TEMPLATES)))].format(d=d, w=DIGIT_WORDS[d])


# ------------------------------------------------------------------------------------------------ images
def augment(img: np.ndarray, rng: np.random.Generator, px: int) -> tuple[np.ndarray, str, list[str]]:
    """A random view: square crop, flip, rotation, gamma/contrast/brightness, noise; `px` square.

    Returns the image, the exact operations, and the visible attributes the caption states (zoom,
    orientation, brightness), so that captions tell views of one source apart as real captions do.
    """
    from skimage.transform import resize, rotate

    h, w = img.shape[:2]
    side0 = min(h, w)
    lo = 0.8 if side0 < 128 else 0.4
    for _ in range(20):  # avoid crops of plain background (air around a CT, black ultrasound margins)
        side = int(side0 * rng.uniform(lo, 1.0))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out = img[y : y + side, x : x + side]
        if float(out.std()) > 0.08:
            break
    ops = [f"crop({y},{x},{side})"]
    if rng.random() < 0.5:
        out = out[:, ::-1]
        ops.append("hflip")
    k = int(rng.choice([0, 0, 0, 1, 2, 3]))
    if k:
        out = np.rot90(out, k)
        ops.append(f"rot{90 * k}")
    angle = float(rng.uniform(-12, 12))
    out = rotate(np.ascontiguousarray(out), angle, mode="reflect", preserve_range=True)
    out = resize(out, (px, px) + out.shape[2:], anti_aliasing=True, preserve_range=True)
    gamma = float(np.exp(rng.uniform(-0.35, 0.35)))
    contrast, bright = float(rng.uniform(0.8, 1.2)), float(rng.uniform(-0.15, 0.15))
    noise = float(rng.uniform(0, 0.02))
    out = np.clip(out, 0, 1) ** gamma
    out = np.clip(contrast * (out - 0.5) + 0.5 + bright + rng.normal(0, noise, out.shape), 0, 1)
    ops.append(f"rotate({angle:.1f}) gamma({gamma:.2f}) contrast({contrast:.2f}) bright({bright:+.2f})")
    return out.astype(np.float32), " ".join(ops), view_attributes(side / side0, k, "hflip" in ops, out)


def view_attributes(zoom: float, quarter_turns: int, mirrored: bool, out: np.ndarray) -> list[str]:
    """What a reader sees in this view: close-up or full view, rotation, mirroring, dark or bright."""
    attrs = []
    if zoom < 0.6:
        attrs.append("close-up")
    elif zoom > 0.9:
        attrs.append("full view")
    if quarter_turns:
        attrs.append(f"rotated {90 * quarter_turns} degrees")
    if mirrored:
        attrs.append("mirrored")
    mean = float(out.mean())
    if mean < 0.22:
        attrs.append("dark")
    elif mean > 0.55:
        attrs.append("bright")
    return attrs


def digit_image(pixels: np.ndarray, rng: np.random.Generator, px: int) -> tuple[np.ndarray, str]:
    """An 8x8 digit (0..16) upscaled to `px`, dark ink on light paper, slightly jittered."""
    from skimage.transform import resize

    img = 1.0 - pixels.reshape(8, 8).astype(np.float32) / 16.0
    img = np.pad(img, 1, mode="constant", constant_values=1.0)
    out = resize(img, (px, px), order=1, anti_aliasing=False)
    bright = float(rng.uniform(-0.1, 0.0))
    out = np.clip(out + bright + rng.normal(0, 0.015, out.shape), 0, 1)
    return out.astype(np.float32), f"upscale(8->{px}) bright({bright:+.2f})"


def encode_jpeg(img: np.ndarray) -> bytes:
    """JPEG bytes of a float [0, 1] image (grayscale stays single-channel: smaller files)."""
    arr = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB" if arr.ndim == 3 else "L").save(
        buf, "JPEG", quality=JPEG_QUALITY, optimize=True
    )
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- assembly
def build_images(out: Path, seed: int) -> dict:
    """Write every split's images and manifest under `out`; return counts and source statistics."""
    from sklearn.datasets import load_digits

    dsources, skipped = dicom_sources()
    sources = dsources + skimage_sources()
    by_label: dict[str, list[Source]] = {}
    for s in sources:
        by_label.setdefault(s.label, []).append(s)
    labels = sorted(by_label)
    digits = load_digits()
    digit_order = np.random.default_rng(seed + 99).permutation(len(digits.target))
    digit_splits = {"pretrain": digit_order[:PRETRAIN_DIGITS],
                    "pool": digit_order[PRETRAIN_DIGITS : PRETRAIN_DIGITS + POOL_OFF_DOMAIN]}  # fmt: skip

    img_root = out / "images"
    if img_root.exists():
        shutil.rmtree(img_root)
    seen_bytes: set[str] = set()
    manifests: dict[str, list[dict]] = {}
    for split_i, split in enumerate(["pretrain", "pool", "val", "test"]):
        rng = np.random.default_rng([seed, split_i])
        rows: list[dict] = []
        plan = ["none"] * SPLIT_SIZES[split]
        px = PRETRAIN_PX if split == "pretrain" else IMAGE_PX
        if split == "pool":
            plan += ["mismatch"] * POOL_MISMATCH + ["off_domain"] * POOL_OFF_DOMAIN
        if split == "pretrain":
            plan += ["digit"] * PRETRAIN_DIGITS
        plan = [plan[i] for i in rng.permutation(len(plan))]
        digit_iter = iter(digit_splits.get(split, []))
        (img_root / split).mkdir(parents=True, exist_ok=True)
        for kind in plan:
            while True:
                if kind in ("off_domain", "digit"):
                    di = int(next(digit_iter))
                    img, aug = digit_image(digits.data[di], rng, px)
                    d = int(digits.target[di])
                    caption, label, true_caption = digit_caption(d, rng), "digit", ""
                    pkg, file, frame = "sklearn:digits", "sklearn/datasets/data/digits.csv.gz", di
                else:
                    label = labels[int(rng.integers(len(labels)))]
                    src = by_label[label][int(rng.integers(len(by_label[label])))]
                    img, aug, attrs = augment(src.image, rng, px)
                    caption, true_caption = with_attributes(caption_for(src, rng), attrs), ""
                    pkg, file, frame = src.package, src.file, src.frame
                    if kind == "mismatch":
                        other = [lb for lb in labels if lb != label]
                        wrong = by_label[other[int(rng.integers(len(other)))]]
                        true_caption = caption
                        # wrong content, true view attributes: only the semantics are mislabelled
                        caption = with_attributes(
                            caption_for(wrong[int(rng.integers(len(wrong)))], rng), attrs
                        )
                data = encode_jpeg(img)
                digest = hashlib.sha256(data).hexdigest()
                if digest not in seen_bytes:  # every pair is a distinct image
                    seen_bytes.add(digest)
                    break
            rel = f"images/{split}/{len(rows):05d}.jpg"
            (out / rel).write_bytes(data)
            rows.append({
                "filepath": rel, "title": caption, "label": label,
                "planted": {"digit": "none", "none": "none"}.get(kind, kind), "split": split,
                "source_package": pkg.split(":")[0], "source_file": file, "source_frame": frame,
                "source_license": LICENSES[pkg if pkg in LICENSES else pkg.split(":")[0]],
                "augmentation": aug, "true_caption": true_caption,
            })  # fmt: skip
        manifests[split] = rows
        df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        df.to_csv(out / MANIFEST_NAMES[split], index=False)
    return {
        "n_sources": {lb: len(v) for lb, v in sorted(by_label.items())},
        "sources": sorted(s.key for s in sources),
        "dicom_skipped": skipped,
        "pairs": {sp: len(r) for sp, r in manifests.items()},
        "pool_planted": pd.Series([r["planted"] for r in manifests["pool"]]).value_counts().to_dict(),
    }


# ---------------------------------------------------------------------------------------------- training
def train_model(out: Path, epochs: int, seed: int) -> dict:
    """Train the tiny CLIP on the pretrain split with `python -m open_clip_train.main` (CPU); fp16 weights."""
    import torch

    model_dir = out / "model"
    with tempfile.TemporaryDirectory(prefix="chips-demo-train-") as tmp:
        tmp = Path(tmp)
        cfg_dir = tmp / "cfg"  # config only: open_clip starts from random init
        cfg_dir.mkdir()
        (cfg_dir / "open_clip_config.json").write_text(json.dumps(open_clip_config(), indent=2))
        for split in ("pretrain", "val"):
            df = pd.read_csv(out / MANIFEST_NAMES[split])
            df["filepath"] = [str((out / p).resolve()) for p in df["filepath"]]
            df[["filepath", "title"]].to_csv(tmp / f"{split}.csv", index=False)
        a = dict(TRAIN_ARGS, epochs=epochs, seed=seed)
        cmd = [sys.executable, "-m", "open_clip_train.main", "--train-data", str(tmp / "pretrain.csv"),
               "--val-data", str(tmp / "val.csv"), "--dataset-type", "csv", "--csv-separator", ",",
               "--csv-img-key", "filepath", "--csv-caption-key", "title", "--model", f"local-dir:{cfg_dir}",
               "--device", "cpu", "--precision", "fp32", "--workers", "1",
               "--batch-size", str(a["batch_size"]),
               "--lr", str(a["lr"]), "--wd", str(a["wd"]), "--warmup", str(a["warmup"]),
               "--epochs", str(a["epochs"]), "--seed", str(a["seed"]), "--logs", str(tmp / "logs"),
               "--name", "demo", "--save-frequency", str(a["epochs"]), "--val-frequency", str(a["epochs"]),
               "--log-every-n-steps", "10", "--report-to", ""]  # fmt: skip
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"open_clip_train failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        ckpt = tmp / "logs" / "demo" / "checkpoints" / f"epoch_{a['epochs']}.pt"
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        state = {
            k.removeprefix("module."): v.half() if v.is_floating_point() else v for k, v in state.items()
        }
        metrics_file = tmp / "logs" / "demo" / "checkpoints" / "results.jsonl"
        metrics = (
            json.loads(metrics_file.read_text().strip().splitlines()[-1]) if metrics_file.exists() else {}
        )
        if model_dir.exists():
            shutil.rmtree(model_dir)
        model_dir.mkdir(parents=True)
        (model_dir / "open_clip_config.json").write_text(json.dumps(open_clip_config(), indent=2) + "\n")
        torch.save(state, model_dir / CHECKPOINT_NAME)
        (model_dir / f"{CHECKPOINT_NAME}.json").write_text(json.dumps({"model": MODEL_NAME}) + "\n")
    shown = [c if c != str(tmp) else "$TMP" for c in cmd]
    return {
        "command": " ".join(s.replace(str(tmp), "$TMP").replace(sys.executable, "python") for s in shown),
        "seconds": round(seconds, 1),
        "val_metrics": {k: round(float(v), 4) for k, v in metrics.items() if isinstance(v, int | float)},
        "args": a,
    }


def open_clip_config() -> dict:
    """open_clip's local-dir config (default preprocessing, as chips_core.features.models.load_model uses)."""
    return {"model_name": MODEL_NAME, "model_cfg": json.loads(MODEL_CONFIG_FILE.read_text())}


def bundle_hash(out: Path) -> str:
    """sha256 over every file of the bundle except bundle.json (names and bytes): the demo cache key."""
    h = hashlib.sha256()
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "bundle.json":
            h.update(p.relative_to(out).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=TRAIN_ARGS["epochs"])
    ap.add_argument("--skip-train", action="store_true", help="rebuild images and manifests only")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / "bundle.json"
    old = json.loads(info_path.read_text()) if info_path.exists() else {}
    t0 = time.monotonic()
    info = {
        "seed": args.seed,
        "image_px": IMAGE_PX,
        "pretrain_px": PRETRAIN_PX,
        **build_images(out, args.seed),
    }
    info["build_images_seconds"] = round(time.monotonic() - t0, 1)
    print(f"images: {info['pairs']} pool planted {info['pool_planted']} in {info['build_images_seconds']} s")
    if args.skip_train:
        info["training"] = old.get("training")
    else:
        info["training"] = train_model(out, args.epochs, args.seed)
        print(f"trained in {info['training']['seconds']} s: {info['training']['val_metrics']}")
    info["bundle_sha256"] = bundle_hash(out)
    info["bundle_bytes"] = sum(
        p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "bundle.json"
    )
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"bundle {out}: {info['bundle_bytes'] / 1e6:.1f} MB, sha256 {info['bundle_sha256'][:16]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

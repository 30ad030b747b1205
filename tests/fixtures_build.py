"""Small input pools built in a temp folder from REAL images (scikit-image's bundled data, pydicom's test
files), in every input format, plus a manifest of deliberately bad inputs with the reject reason each one
must get. Used by the ingest tests and by the CLI tests of other modules.

    from tests.fixtures_build import make_csv_pool
    manifest = make_csv_pool(tmp_path, n=12)      # tmp_path/csv/pool.csv + images
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# (skimage.data function, caption stem, label); all ship inside scikit-image (no download).
_SOURCES = (
    ("retina", "fundus photograph of the retina", "retina"),
    ("cell", "phase contrast microscopy of a cell", "cell"),
    ("immunohistochemistry", "immunohistochemistry stained tissue section", "ihc"),
    ("microaneurysms", "retinal microaneurysms close-up", "retina"),
    ("camera", "grayscale photograph of a cameraman", "other"),
    ("coins", "photograph of old coins", "other"),
)
_SIDES = ("upper left", "upper right", "lower left", "lower right", "centre")
# Uncompressed pydicom test files (decodable offline, no extra codecs).
DICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "SC_rgb.dcm", "rtdose_1frame.dcm")


def _source_arrays() -> list[tuple[np.ndarray, str, str]]:
    import skimage.data

    return [(getattr(skimage.data, fn)(), stem, label) for fn, stem, label in _SOURCES]


def real_images(n: int, size: int = 64, seed: int = 0) -> list[tuple[Image.Image, str, str]]:
    """n distinct (RGB image, caption, label) triples: seeded crops/flips of scikit-image's real images."""
    rng = np.random.default_rng(seed)
    sources = _source_arrays()
    out = []
    for i in range(n):
        arr, stem, label = sources[i % len(sources)]
        h, w = arr.shape[:2]
        side = int(rng.integers(max(8, min(h, w) // 4), min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = arr[y : y + side, x : x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        im = Image.fromarray(np.ascontiguousarray(crop)).convert("RGB").resize((size, size), Image.BILINEAR)
        out.append((im, f"{stem}, {_SIDES[i % len(_SIDES)]} crop {i}", label))
    return out


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG" if fmt == "jpg" else fmt.upper(), **({"quality": 90} if fmt == "jpg" else {}))
    return buf.getvalue()


def write_images(
    folder: Path, n: int, size: int = 64, fmt: str = "png", seed: int = 0
) -> list[tuple[Path, str, str]]:
    """Write n real images as files; returns (path, caption, label) per image."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (im, caption, label) in enumerate(real_images(n, size, seed)):
        path = folder / f"img_{i:04d}.{fmt}"
        path.write_bytes(_encode(im, fmt))
        out.append((path, caption, label))
    return out


def write_manifest(folder: Path, n: int, seed: int, captions: list[str] | None = None) -> Path:
    """folder/manifest.csv (filepath, title, label) over n real images; the first captions replaced by
    `captions` when given."""
    items = write_images(folder / "images", n, seed=seed)
    path = folder / "manifest.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title", "label"])
        for i, (p, caption, label) in enumerate(items):
            w.writerow([p, captions[i] if captions and i < len(captions) else caption, label])
    return path


def make_csv_pool(root: Path, n: int = 12, sep: str = ",", relative: bool = True, fmt: str = "png") -> Path:
    """root/csv/pool.csv (or .tsv for sep='\\t') with columns filepath,title,label and n real images."""
    folder = Path(root) / "csv"
    items = write_images(folder / "images", n, fmt=fmt)
    manifest = folder / ("pool.tsv" if sep == "\t" else "pool.csv")
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(["filepath", "title", "label"])
        for path, caption, label in items:
            w.writerow([path.relative_to(folder) if relative else path, caption, label])
    return manifest


def make_parquet_pool(root: Path, n: int = 12, image_col: str = "image", caption_col: str = "text") -> Path:
    """root/parquet/pool.parquet with absolute image paths under custom column names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(root) / "parquet"
    items = write_images(folder / "images", n, fmt="jpg")
    table = pa.table(
        {
            image_col: [str(p) for p, _, _ in items],
            caption_col: [c for _, c, _ in items],
            "label": [lb for _, _, lb in items],
        }
    )
    path = folder / "pool.parquet"
    pq.write_table(table, path)
    return path


def make_folder_pool(root: Path, n: int = 10) -> Path:
    """root/folder/ with x.png + x.txt caption sidecars (captions end with a newline, as editors write)."""
    folder = Path(root) / "folder"
    for path, caption, _ in write_images(folder, n):
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def make_wds_pool(root: Path, n: int = 10, shards: int = 2, caption: str = "txt") -> Path:
    """root/wds/shard-00000.tar ... with key.jpg + key.txt + key.cls, or key.json {"caption", "label"}."""
    folder = Path(root) / "wds"
    folder.mkdir(parents=True, exist_ok=True)
    items = real_images(n)
    per = -(-n // shards)
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:05d}.tar", "w") as tf:
            for i in range(s * per, min(n, (s + 1) * per)):
                im, cap, label = items[i]
                members = {"jpg": _encode(im, "jpg")}
                if caption == "txt":
                    members["txt"] = cap.encode("utf-8")
                    members["cls"] = label.encode("utf-8")
                else:
                    members["json"] = json.dumps({"caption": cap, "label": label}).encode("utf-8")
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"sample{i:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return folder


def make_dicom_pool(root: Path, names: tuple[str, ...] = DICOM_FILES) -> Path:
    """root/dicom/ with copies of pydicom's uncompressed test files (real CT, MR, RGB, RT dose)."""
    from pydicom.data import get_testdata_file

    folder = Path(root) / "dicom"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(get_testdata_file(name), folder / name)
    return folder


def png_bomb_bytes(side: int = 30000) -> bytes:
    """A tiny PNG whose header claims side x side pixels: more than PIL's decompression-bomb limit."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def make_bad_pool(root: Path) -> tuple[Path, dict[int, str]]:
    """root/bad/pool.csv mixing good rows with one row per bad-input kind.

    Returns (manifest, expected) where expected maps the 1-based data row number of every bad row to the
    reject reason it must get; all other rows are valid pairs.
    """
    folder = Path(root) / "bad"
    good = write_images(folder / "images", 4, fmt="png")
    jpg = write_images(folder / "jpg", 1, fmt="jpg", seed=1)[0][0]
    files = folder / "files"
    files.mkdir(parents=True, exist_ok=True)
    (files / "empty.png").write_bytes(b"")
    (files / "garbage.png").write_bytes(
        bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8))
    )
    data = jpg.read_bytes()
    (files / "truncated.jpg").write_bytes(data[: len(data) // 2])
    png = good[0][0].read_bytes()
    (files / "truncated.png").write_bytes(png[: len(png) // 2])
    (files / "bomb.png").write_bytes(png_bomb_bytes())
    (files / "a_folder.png").mkdir(exist_ok=True)
    (files / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"not really a dicom data set" * 4)
    rows: list[tuple[bytes, bytes, str | None]] = []  # raw path, raw caption, expected reason

    def add(path: str, caption: str | bytes, reason: str | None = None) -> None:
        cap = caption if isinstance(caption, bytes) else caption.encode("utf-8")
        rows.append((path.encode("utf-8"), cap, reason))

    for i, (p, c, _) in enumerate(good):  # one caption with multi-byte UTF-8: the file is UTF-8 with bad rows
        add(f"images/{p.name}", c + (", 5 \u00b5m, \u80ba" if i == 3 else ""))
    add("images/does_not_exist.png", "a missing image", "missing_file")
    add("files/empty.png", "a zero byte file", "zero_bytes")
    add("files/garbage.png", "random bytes", "corrupt_image")
    add("files/truncated.jpg", "half a jpeg", "truncated_image")
    add("files/truncated.png", "half a png", "truncated_image")
    add("files/bomb.png", "a decompression bomb", "decompression_bomb")
    add("files/a_folder.png", "a folder, not a file", "unreadable_file")
    add("files/bad.dcm", "DICOM magic without a data set", "bad_dicom")
    add(f"images/{good[1][0].name}", "", "empty_caption")
    add(f"images/{good[1][0].name}", "   \t ", "empty_caption")
    add(f"images/{good[2][0].name}", b"caf\xe9 au lait (latin-1, not UTF-8)", "undecodable_caption")
    add(f"images/{good[0][0].name}", good[0][1], "duplicate_pair")
    add("", "no path at all", "bad_path")
    add(str(jpg), 'an absolute path, a caption with "quotes", commas, and\na newline')
    manifest = folder / "pool.csv"
    out = io.BytesIO()
    out.write(b"filepath,title\n")
    for path, cap, _ in rows:
        out.write(_csv_field(path) + b"," + _csv_field(cap) + b"\n")
    manifest.write_bytes(out.getvalue())
    expected = {i + 1: reason for i, (_, _, reason) in enumerate(rows) if reason is not None}
    return manifest, expected


def _csv_field(value: bytes) -> bytes:
    if any(ch in value for ch in (b",", b'"', b"\n", b"\r")) or value.strip() != value:
        return b'"' + value.replace(b'"', b'""') + b'"'
    return value

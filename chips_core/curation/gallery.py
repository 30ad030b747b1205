"""Thumbnail cache for the dashboard galleries.

Decoding a full image (a DICOM series slice, a WebDataset member) for every gallery redraw is too slow, so
each pair's thumbnail is made once and kept as a small JPEG in `ws/thumbs/<size>/`, named by the pair's id.
Images are read through `chips_core.pools.records.load_image`, the same reader ingest and featurize use.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from chips_core.errors import ChipsError
from chips_core.workspace import store


class GalleryError(ChipsError):
    """A thumbnail could not be made; the message names the image."""


def thumbnail_path(ws: store.Workspace, pair_id: int, size: int) -> Path:
    """Where the thumbnail of `pair_id` at `size` px lives (the id as unsigned hex keeps names portable)."""
    return ws.root / "thumbs" / str(int(size)) / f"{int(pair_id) & 0xFFFFFFFFFFFFFFFF:016x}.jpg"


def thumbnail(ws: store.Workspace, pair_id: int, filepath: str, size: int = 160) -> Path:
    """The cached thumbnail of one pair, made (atomically) on first use; longest side `size` px."""
    if size < 8 or size > 2048:
        raise ValueError(f"thumbnail size must be within 8..2048 px, got {size}")
    path = thumbnail_path(ws, pair_id, size)
    if path.exists():
        return path
    from chips_core.pools.records import load_image

    try:
        img = load_image(filepath)
    except Exception as exc:  # any reader failure becomes one message naming the file
        raise GalleryError(f"cannot read image {filepath!r} of pair {pair_id}: {exc}") from exc
    img = img.convert("RGB")
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    store.atomic_write_bytes(path, buf.getvalue())
    return path


def thumbnails(
    ws: store.Workspace, pairs: Iterable[tuple[int, str]], size: int = 160
) -> dict[int, Path | str]:
    """Thumbnails of many pairs: pair_id -> path, or -> the error message when that image is unreadable."""
    out: dict[int, Path | str] = {}
    for pair_id, filepath in pairs:
        try:
            out[int(pair_id)] = thumbnail(ws, pair_id, filepath, size)
        except GalleryError as exc:
            out[int(pair_id)] = str(exc)
    return out

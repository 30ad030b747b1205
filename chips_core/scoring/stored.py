"""Stored alignments: the expensive part of a ranking, kept with its scoring cache so that it is read, not
recomputed, the next time (a dashboard server's first page, another process, a later day).

A CHIPS (or TRAK-style) ranking is a Newton solve plus a projection of the whole sketch (torch, up to a
second on 10⁵ pairs on a busy machine), then numpy weights, the agreement, the guard and a sort (tens of
milliseconds). The solve's result, the alignment Â of every pair with what the solve reports (λ, λ*, d/k,
the curvature ratio and, when computed, the ranking stability), depends only on the cache and on the
solve's settings (k, α, λ, damping, normalisation), not on the weights, the agreement, the guard or the
ratio. `ranking.rank(..., stored=True)` reads it from here when present and writes it when it computes one,
so every parameter choice that shares the solve reuses it.

Layout: `<cache>/rankings/<hash of the solve's settings>.npz`, each holding `alignment` (float64, the
cache's row order) and `record` (JSON: the settings, the cache's identity, FORMAT and the solve's info).
A record is used only when all three match: a cache prepared again in the same folder (another identity),
other settings or an older format are ignored and overwritten. Writes are atomic; a folder that cannot be
written (a read-only shared cache) only means nothing is stored. At most MAX_STORED records per cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from chips_core.scoring.cache import ScoringCache
from chips_core.workspace.store import atomic_write_bytes

#: bump when the alignment's math changes: records of an older format are not used
FORMAT = 1
#: records kept per cache (each 8 bytes per pair): the first solves computed (the default view's first)
MAX_STORED = 16
FOLDER = "rankings"

Settings = dict[str, Any]


def newton_settings(k: int, alpha: float, lam: float | None, damping: str, normalize: bool) -> Settings:
    """The key of a Newton solve's record: every setting its alignment depends on."""
    return {"solve": "newton", "k": int(k), "alpha": float(alpha), "lam": None if lam is None else float(lam),
            "damping": damping, "normalize": bool(normalize)}  # fmt: skip


def cache_identity(cache: ScoringCache) -> str:
    """A hash of the cache's config.json and meta.json records (meta.json holds the time it finished, so a
    cache prepared again in the same folder has another identity)."""
    text = json.dumps([cache.record, cache.meta], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _path(cache: ScoringCache, settings: Settings) -> Path:
    name = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=12).hexdigest()
    return Path(cache.root) / FOLDER / f"{name}.npz"


def read(cache: ScoringCache, settings: Settings) -> tuple[np.ndarray, dict[str, Any]] | None:
    """(alignment, info) stored for the solve `settings` of this very cache, or None (none stored, or a
    record of other settings, of another cache in this folder or of an older FORMAT)."""
    path = _path(cache, settings)
    try:
        with np.load(path) as z:
            record = json.loads(str(z["record"]))
            if (
                record.get("format") != FORMAT
                or record.get("cache") != cache_identity(cache)
                or record.get("settings") != settings
            ):
                return None
            alignment = z["alignment"]
    except (
        OSError,
        EOFError,
        KeyError,
        ValueError,
        zipfile.BadZipFile,
    ):  # none, gone, or damaged: compute it
        return None
    if alignment.shape != (cache.n,) or alignment.dtype != np.float64:
        return None
    return alignment, record["info"]


def write(cache: ScoringCache, settings: Settings, alignment: np.ndarray, info: dict[str, Any]) -> bool:
    """Store the alignment and the solve's `info` (JSON values) for `settings`; False when the folder is
    not writable or already holds MAX_STORED other records."""
    path = _path(cache, settings)
    try:
        if not path.exists() and len(list(path.parent.glob("*.npz"))) >= MAX_STORED:
            return False
        record = {"format": FORMAT, "cache": cache_identity(cache), "settings": settings, "info": info}
        buf = io.BytesIO()
        np.savez(buf, alignment=np.asarray(alignment, np.float64), record=np.array(json.dumps(record)))
        atomic_write_bytes(path, buf.getvalue())
    except OSError:
        return False
    return True

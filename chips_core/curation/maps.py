"""2-D UMAP maps of a feature run's image and text embeddings, computed once and cached in the workspace.

Why: the dashboard's Map page must redraw instantly while sliders move, but UMAP takes seconds to minutes.
So each feature run gets its map once (`ws/maps/run-<run_id>/`: pair_ids.npy, image.npy, text.npy and, written
last as the completion record, meta.json) and every redraw reads those arrays.

What is mapped: the cached pre-projection features of the run — h (image tower) and t (text tower), each
L2-normalised and embedded separately with the cosine metric, giving one image map and one text map whose
points are the same pairs. No model is run.

Size: a browser draws ~20k WebGL points fluidly, not millions. Up to `full_threshold` (100,000) pairs every
pair is mapped; above it a seeded uniform sample of `max_points` (20,000) pairs is read by row (the store is
memory-mapped, so only those rows are touched), mapped, and drawn; `FeatureMap.sampled` says so. Of a map of
more than `DRAW_POINTS` pairs the dashboard draws a seeded sample plus every decided pair (`drawn_rows`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from chips_core.workspace import store

FULL_THRESHOLD = 100_000
MAX_POINTS = 20_000
DRAW_POINTS = 20_000  # the dashboard draws at most this many of a map's points (see `drawn_rows`)
_FILES = ("pair_ids", "image", "text")


class FeatureSource(Protocol):
    """The feature-store protocol of docs/ARCHITECTURE.md (only the parts used here)."""

    def pair_ids(self) -> np.ndarray: ...
    def __len__(self) -> int: ...
    def rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class FeatureMap:
    """2-D coordinates of the mapped pairs (row i of each array is pair `pair_ids[i]`)."""

    pair_ids: np.ndarray  # (n,) int64
    image_xy: np.ndarray  # (n, 2) float32
    text_xy: np.ndarray  # (n, 2) float32
    n_total: int  # pairs in the feature run
    sampled: bool  # True when only a sample of the run is mapped


def map_dir(ws: store.Workspace, run_id: int) -> Path:
    """The cache folder of the map of feature run `run_id`."""
    return ws.root / "maps" / f"run-{int(run_id)}"


def load_map(ws: store.Workspace, run_id: int) -> FeatureMap | None:
    """The cached map of a feature run, or None when it was never (completely) computed."""
    d = map_dir(ws, run_id)
    meta_path = d / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    arrays = {name: np.load(d / f"{name}.npy") for name in _FILES}
    return FeatureMap(
        arrays["pair_ids"], arrays["image"], arrays["text"], int(meta["n_total"]), bool(meta["sampled"])
    )


def _embed(x: np.ndarray, seed: int, n_neighbors: int) -> np.ndarray:
    """UMAP of the rows of x (cosine metric on L2-normalised rows) to 2-D float32."""
    import umap  # imported here: it compiles with numba on first use, which the rest of the package avoids

    x = x.astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    reducer = umap.UMAP(
        n_components=2, n_neighbors=min(n_neighbors, len(x) - 1), metric="cosine", random_state=seed, n_jobs=1
    )
    return reducer.fit_transform(x).astype(np.float32)


def compute_map(
    ws: store.Workspace,
    run_id: int,
    source: FeatureSource,
    *,
    seed: int = 0,
    max_points: int = MAX_POINTS,
    full_threshold: int = FULL_THRESHOLD,
    n_neighbors: int = 15,
    progress: Callable[..., None] | None = None,
) -> FeatureMap:
    """Compute and cache the image and text maps of feature run `run_id` (see the module docstring).

    progress(done, total, stage=text) is called before each of the two embeddings and once at the end."""
    n = len(source)
    if n < 4:
        raise ValueError(f"feature run {run_id} has {n} pairs; a map needs at least 4")
    if max_points < 4:
        raise ValueError(f"max_points must be at least 4, got {max_points}")
    ids = np.asarray(source.pair_ids(), dtype=np.int64)
    sampled = n > full_threshold
    if sampled:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(n, size=min(max_points, n), replace=False))
    else:
        idx = np.arange(n)
    h, t = source.rows(idx)
    if progress:
        progress(0, 2, stage=f"mapping {len(idx):,} image embeddings")
    image_xy = _embed(np.asarray(h), seed, n_neighbors)
    if progress:
        progress(1, 2, stage=f"mapping {len(idx):,} text embeddings")
    text_xy = _embed(np.asarray(t), seed, n_neighbors)
    fmap = FeatureMap(ids[idx], image_xy, text_xy, n, sampled)
    how = {"seed": seed, "n_neighbors": n_neighbors, "metric": "cosine"}
    save_map(ws, run_id, fmap, {**how, "features": "pre-projection h and t, L2-normalised"})
    if progress:
        progress(2, 2, stage="written")
    return fmap


def save_map(ws: store.Workspace, run_id: int, fmap: FeatureMap, how: dict[str, object]) -> None:
    """Store the map of feature run `run_id` (the arrays, then meta.json with `how` it was made, last)."""
    d = map_dir(ws, run_id)
    for name, arr in zip(_FILES, (fmap.pair_ids, fmap.image_xy, fmap.text_xy), strict=True):
        buf = io.BytesIO()
        np.save(buf, arr)
        store.atomic_write_bytes(d / f"{name}.npy", buf.getvalue())
    meta = {"run_id": int(run_id), "n_total": fmap.n_total, "n_mapped": len(fmap.pair_ids)}
    meta |= {"sampled": fmap.sampled, **how}
    store.atomic_write_bytes(d / "meta.json", json.dumps(meta, indent=1).encode())


def current_map(ws: store.Workspace, run_id: int, source: FeatureSource) -> FeatureMap | None:
    """The cached map of a feature run when it maps the run as it is now (same size), else None."""
    fmap = load_map(ws, run_id)
    return fmap if fmap is not None and fmap.n_total == len(source) else None


def drawn_rows(
    fmap: FeatureMap, keep: np.ndarray, max_points: int | None = None, seed: int = 0
) -> np.ndarray:
    """The rows of `fmap` to draw, in map order: all of them up to `max_points` (None: DRAW_POINTS); above,
    the rows of the pairs in `keep` (e.g. the decided ones: always drawn) and the first of a seeded
    permutation of the rest, `max_points` in all. The same map and seed give the same points, so the picture
    holds still while the colours change; a browser draws ~20k WebGL points with hover text at once, 100k
    not."""
    max_points = DRAW_POINTS if max_points is None else max_points
    n = len(fmap.pair_ids)
    if n <= max_points:
        return np.arange(n)
    kept = np.flatnonzero(np.isin(fmap.pair_ids, keep))[:max_points]
    order = np.random.default_rng(seed).permutation(n)
    rest = order[~np.isin(order, kept)][: max_points - len(kept)]
    return np.sort(np.concatenate([kept, rest]))


def get_map(ws: store.Workspace, run_id: int, source: FeatureSource, **kwargs: object) -> FeatureMap:
    """The cached map of a feature run, computed first when missing or when the run has changed size."""
    fmap = current_map(ws, run_id, source)
    if fmap is None:
        fmap = compute_map(ws, run_id, source, **kwargs)  # type: ignore[arg-type]
    return fmap

"""Dashboard helpers in chips_core: the UMAP map cache (maps) and the thumbnail cache (gallery)."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image

from chips_core.curation import gallery, maps
from chips_core.workspace import store

pytestmark = [pytest.mark.app, pytest.mark.unit]


class _Features:
    """A tiny in-memory feature source with the FeatureSource protocol (two clusters per modality)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        centres_h, centres_t = rng.normal(size=(2, 24)) * 4, rng.normal(size=(2, 16)) * 4
        self.group = np.arange(n) % 2
        self.h = (centres_h[self.group] + rng.normal(size=(n, 24))).astype(np.float16)
        self.t = (centres_t[self.group] + rng.normal(size=(n, 16))).astype(np.float16)
        self.ids = rng.integers(-(2**62), 2**62, size=n, dtype=np.int64)
        self.rows_read = 0

    def pair_ids(self) -> np.ndarray:
        return self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.rows_read += len(idx)
        return self.h[idx], self.t[idx]


def test_map_is_computed_once_cached_and_separates_clusters(tmp_path):
    ws = store.Workspace.init(tmp_path / "ws")
    src = _Features(60)
    assert maps.load_map(ws, 7) is None
    fmap = maps.get_map(ws, 7, src)
    assert not fmap.sampled and fmap.n_total == 60
    np.testing.assert_array_equal(fmap.pair_ids, src.ids)
    assert fmap.image_xy.shape == fmap.text_xy.shape == (60, 2)
    # the two planted clusters stay apart in both maps: every point is nearer its own cluster's centre
    for xy in (fmap.image_xy, fmap.text_xy):
        c0, c1 = xy[src.group == 0].mean(0), xy[src.group == 1].mean(0)
        own = np.where(src.group[:, None] == 0, c0, c1)
        other = np.where(src.group[:, None] == 0, c1, c0)
        assert (np.linalg.norm(xy - own, axis=1) < np.linalg.norm(xy - other, axis=1)).all()
    # a second call reads the cache: no feature row is read again, same coordinates
    read = src.rows_read
    again = maps.get_map(ws, 7, src)
    assert src.rows_read == read
    np.testing.assert_array_equal(again.image_xy, fmap.image_xy)
    assert (maps.map_dir(ws, 7) / "meta.json").exists()


def test_drawn_rows_keep_the_given_pairs_and_a_fixed_sample():
    src = _Features(500)
    fmap = maps.FeatureMap(
        src.ids, src.h[:, :2].astype(np.float32), src.t[:, :2].astype(np.float32), 500, False
    )
    np.testing.assert_array_equal(maps.drawn_rows(fmap, src.ids[:3], max_points=500), np.arange(500))
    keep = src.ids[[7, 123, 499]]
    rows = maps.drawn_rows(fmap, keep, max_points=50)
    assert len(rows) == 50 and len(set(rows.tolist())) == 50 and (np.diff(rows) > 0).all()
    assert set(keep.tolist()) <= set(fmap.pair_ids[rows].tolist())  # kept pairs are always drawn
    again = maps.drawn_rows(fmap, keep, max_points=50)
    np.testing.assert_array_equal(rows, again)  # the same points every time
    other = maps.drawn_rows(fmap, src.ids[[8]], max_points=50)
    assert len(np.intersect1d(rows, other)) >= 47  # keeping another pair moves at most a few points
    assert not np.array_equal(rows, maps.drawn_rows(fmap, keep, max_points=50, seed=1))
    assert len(maps.drawn_rows(fmap, src.ids[:80], max_points=50)) == 50  # never more than max_points


def test_large_runs_are_sampled_and_only_sampled_rows_are_read(tmp_path):
    ws = store.Workspace.init(tmp_path / "ws")
    src = _Features(80)
    fmap = maps.compute_map(ws, 1, src, full_threshold=50, max_points=30)
    assert fmap.sampled and fmap.n_total == 80 and len(fmap.pair_ids) == 30
    assert src.rows_read == 30
    assert set(fmap.pair_ids) <= set(src.ids) and len(set(fmap.pair_ids)) == 30
    # a feature run that changed size (a resumed featurize) gets a fresh map
    bigger = _Features(90, seed=1)
    assert maps.get_map(ws, 1, bigger, full_threshold=50, max_points=30).n_total == 90


def test_map_refuses_too_few_pairs(tmp_path):
    ws = store.Workspace.init(tmp_path / "ws")
    with pytest.raises(ValueError, match="feature run 3 has 3 pairs"):
        maps.compute_map(ws, 3, _Features(3))


def test_thumbnails_are_cached_small_jpegs_and_bad_images_are_named(tmp_path):
    ws = store.Workspace.init(tmp_path / "ws")
    img_path = tmp_path / "retina.png"
    Image.fromarray(skimage.data.retina()).save(img_path)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    out = gallery.thumbnails(ws, [(-5, str(img_path)), (9, str(bad))], size=96)
    thumb = out[-5]
    assert thumb == gallery.thumbnail_path(ws, -5, 96) and thumb.name == "fffffffffffffffb.jpg"
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and max(im.size) == 96
    mtime = thumb.stat().st_mtime_ns
    img_path.unlink()  # the cache answers without the source
    assert gallery.thumbnail(ws, -5, str(img_path), 96) == thumb and thumb.stat().st_mtime_ns == mtime
    assert isinstance(out[9], str) and "broken.png" in out[9] and "pair 9" in out[9]
    with pytest.raises(ValueError, match="thumbnail size"):
        gallery.thumbnail(ws, 1, str(bad), size=4)

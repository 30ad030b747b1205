"""Stored alignments (chips_core/scoring/stored.py): a stored solve gives exactly the ranking a fresh `rank`
gives, a record of other settings, of another cache or of an older format is never used, and reading one
imports no torch. Real prepared caches, no mocks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from chips_core.scoring import stored
from chips_core.scoring.cache import ScoringCache
from chips_core.scoring.params import PrepareConfig, RankParams, default_k
from chips_core.scoring.prepare import prepare
from chips_core.scoring.ranking import rank, store_rankings
from tests.unit.test_scoring import CFG, _features, _params

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Two caches of the same pool and config from two models (so their solves differ)."""
    pool, ev = _features(230, 1), _features(60, 2)
    root = tmp_path_factory.mktemp("stored")
    a = prepare(pool, ev, _params(0), CFG, root / "a")
    b = prepare(pool, ev, _params(5, theta=1.7), CFG, root / "b")
    for cache in (a, b):  # as the prepare step of a workspace (engines/pipeline.py) does
        store_rankings(cache)
    return a, b


def _same(x, y) -> None:
    """Two RankResults are the same ranking: every column bit for bit, the same info and parameters."""
    pd.testing.assert_frame_equal(x.frame, y.frame, check_exact=True)
    assert json.dumps(x.info, sort_keys=True) == json.dumps(y.info, sort_keys=True)
    assert x.params == y.params


def _records(cache) -> list:
    return sorted((cache.root / stored.FOLDER).glob("*.npz"))


def _fresh_copy(cache, tmp_path) -> ScoringCache:
    """The cache copied to another folder, opened afresh (nothing in its memo)."""
    shutil.copytree(cache.root, tmp_path / "copy")
    return ScoringCache.load(tmp_path / "copy")


def test_stored_default_solves_rank_as_fresh(caches, tmp_path):
    a, _ = caches
    assert len(_records(a)) == 3  # the default ranking (with its stability) and its α range's ends
    copy = _fresh_copy(a, tmp_path)
    for params, stability in (
        (RankParams(), True),
        (RankParams(alpha=0.0), False),
        (RankParams(alpha=1.0), False),
    ):
        _same(rank(copy, params, stability=stability, stored=True), rank(a, params, stability=stability))
    # the parameters that only weigh the solve's result share it: still the fresh ranking
    for params in (RankParams(agreement=0.0), RankParams(beta=0.9, guard_mads=1.0), RankParams(ratio=0.6)):
        _same(rank(copy, params, stored=True), rank(a, params))
    assert len(_records(copy)) == 3


def test_reading_a_stored_solve_imports_no_torch(caches):
    a, _ = caches
    code = (
        "import sys; from chips_core.scoring.cache import ScoringCache; "
        "from chips_core.scoring.ranking import rank; "
        f"r = rank(ScoringCache.load({str(a.root)!r}), stored=True); "
        "assert r.info['stability'] is not None; "
        "assert 'torch' not in sys.modules and 'scipy.linalg' not in sys.modules, 'solved again'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_new_solve_is_stored_once_and_read_back(caches, tmp_path):
    a, _ = caches
    copy = _fresh_copy(a, tmp_path)
    params = RankParams(alpha=0.35, lam=0.02, normalize=True)
    first = rank(copy, params, stored=True)
    assert len(_records(copy)) == 4
    _same(first, rank(a, params))
    written = _records(copy)
    mtimes = [p.stat().st_mtime_ns for p in written]
    _same(rank(ScoringCache.load(copy.root), params, stored=True), first)
    assert [p.stat().st_mtime_ns for p in _records(copy)] == mtimes  # read, not written again
    # without stored=True nothing is read or written
    _same(rank(copy, params.replace(alpha=0.45)), rank(a, params.replace(alpha=0.45)))
    assert len(_records(copy)) == 4


def test_a_solve_stored_without_stability_gets_it_when_asked(caches, tmp_path):
    a, _ = caches
    copy = _fresh_copy(a, tmp_path)
    params = RankParams(alpha=0.0)  # stored by store_rankings without the stability
    with_stability = rank(copy, params, stored=True)
    assert np.isfinite(with_stability.info["stability"])
    _same(with_stability, rank(a, params))
    _same(
        rank(ScoringCache.load(copy.root), params, stability=False, stored=True),
        rank(a, params, stability=False),
    )


def test_records_of_another_cache_are_not_used(caches, tmp_path):
    """The same settings stored for another model's cache (a cache prepared again in the same folder) are
    ignored: the ranking is this cache's own, and the record is replaced by its own."""
    a, b = caches
    target = _fresh_copy(b, tmp_path)
    shutil.rmtree(target.root / stored.FOLDER)
    shutil.copytree(a.root / stored.FOLDER, target.root / stored.FOLDER)  # a's records under b's data
    for params in (RankParams(), RankParams(alpha=0.0)):
        assert stored.read(target, _settings(target, params)) is None
        mine = rank(target, params, stored=True)
        _same(mine, rank(b, params))
        assert not np.array_equal(mine.frame["alignment"], rank(a, params).frame["alignment"])
    assert stored.read(target, _settings(target, RankParams())) is not None  # replaced by b's own


def _settings(cache, params: RankParams) -> dict:
    """The solve settings `rank` stores `params` under (the default k: k_max // 2)."""
    return {"solve": "newton", "k": cache.k_max // 2, "alpha": float(params.alpha), "lam": params.lam,
            "damping": params.damping, "normalize": params.normalize}  # fmt: skip


def test_records_of_other_settings_or_formats_are_not_used(caches, tmp_path, monkeypatch):
    a, _ = caches
    copy = _fresh_copy(a, tmp_path)
    default, alpha1 = _settings(copy, RankParams()), _settings(copy, RankParams(alpha=1.0))
    assert stored.read(copy, default) is not None
    # a record filed under another settings' name (as a hash collision would): refused
    shutil.copy(stored._path(copy, alpha1), stored._path(copy, default))
    assert stored.read(copy, default) is None
    _same(rank(copy, RankParams(), stored=True), rank(a, RankParams()))
    # a newer format makes every older record unusable
    monkeypatch.setattr(stored, "FORMAT", stored.FORMAT + 1)
    assert stored.read(copy, default) is None and stored.read(copy, alpha1) is None


def test_the_store_holds_at_most_max_stored_records(caches, tmp_path, monkeypatch):
    a, _ = caches
    copy = _fresh_copy(a, tmp_path)
    monkeypatch.setattr(stored, "MAX_STORED", 4)
    for alpha in (0.1, 0.2, 0.3):
        rank(copy, RankParams(alpha=alpha), stored=True)
    assert len(_records(copy)) == 4
    _same(rank(copy, RankParams(alpha=0.3), stored=True), rank(a, RankParams(alpha=0.3)))  # computed


def test_store_rankings_of_the_paper_preset(caches, tmp_path):
    a, _ = caches
    copy = _fresh_copy(a, tmp_path)
    paper = RankParams.preset("paper").replace(blocks=copy.config.blocks)  # its damping, α and weights
    out = store_rankings(copy, paper)
    assert [r.params.alpha for r in out] == [paper.alpha, 0.0, 1.0]
    assert len(_records(copy)) == 6
    _same(rank(ScoringCache.load(copy.root), paper, stored=True), rank(a, paper))


def test_prepare_of_another_config_is_another_cache(tmp_path):
    """Two caches of other configs in turn in one folder (removed in between): the second never reads the
    first's records."""
    pool, ev = _features(120, 3), _features(40, 4)
    first = prepare(pool, ev, _params(1), CFG, tmp_path / "c")
    store_rankings(first)
    kept = tmp_path / "kept"
    shutil.copytree(first.root / stored.FOLDER, kept)
    shutil.rmtree(first.root)
    second = prepare(pool, ev, _params(1), PrepareConfig(**{**CFG.__dict__, "seed": 4}), tmp_path / "c")
    shutil.copytree(kept, second.root / stored.FOLDER)
    assert stored.cache_identity(first) != stored.cache_identity(second)
    fresh = ScoringCache.load(second.root)
    _same(rank(fresh, RankParams(), stored=True), rank(second, RankParams()))


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_record_is_solved_again(caches, tmp_path, damage):
    """A record cut short (an interrupted copy of the cache) is not an error: the solve runs as if none were
    stored, and the record is written again."""
    a, _ = caches
    copy = _fresh_copy(a, tmp_path)
    for path in _records(copy):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    _same(rank(copy, stored=True), rank(a))
    settings = stored.newton_settings(default_k(copy.k_max), 0.7, None, "trace", True)  # the default's solve
    assert stored.read(copy, settings) is not None  # written again, readable

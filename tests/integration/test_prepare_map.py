"""The prepare job also computes the pool's map, so the dashboard's Map page opens at once; a map that
cannot be computed leaves the prepare (its cache, its job) done. Real `chips prepare` background jobs on a
tiny real workspace."""

from __future__ import annotations

from pathlib import Path

import pytest

from chips_core.curation import maps
from chips_core.engines.pipeline import feature_runs_for
from chips_core.features import featurize as features
from chips_core.features import models
from chips_core.pools import ingest
from chips_core.workspace import catalog, jobs, store
from tests.fixtures_build import write_manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def featurized(tmp_path: Path) -> store.Workspace:
    """A workspace with a 20-pair pool and an 8-pair eval set, featurized (no cache, no map yet)."""
    ws = store.Workspace.init(tmp_path / "ws")
    ingest.ingest(ws, "pool", write_manifest(tmp_path / "pool", 20, seed=0))
    ingest.ingest(ws, "target", write_manifest(tmp_path / "eval", 8, seed=1), kind="eval")
    loaded = models.load_model("chips-tiny-vit", device="cpu")
    for name in ("pool", "target"):
        features.featurize(ws, name, loaded, device="cpu", batch_size=32)
    return ws


def _prepare_job(ws: store.Workspace, *extra: str) -> jobs.JobInfo:
    argv = ["prepare", str(ws.root), "pool", "--eval", "target", "--k-max", "16", "--batch-size", "8"]
    job_id = jobs.launch(ws, "prepare", [*argv, "--device", "cpu", *extra])
    return jobs.wait(ws, job_id, timeout_s=600)


def _done_caches(ws: store.Workspace) -> int:
    return len(catalog.finished_caches(ws))


def test_prepare_job_leaves_the_map_stored(featurized):
    ws = featurized
    pool_run, _ = feature_runs_for(ws, "pool", "target")
    assert maps.load_map(ws, pool_run) is None
    info = _prepare_job(ws)
    log = jobs.read_log(ws, info.job_id)
    assert info.status == "done", log
    fmap = maps.current_map(ws, pool_run, features.FeatureStore(ws, pool_run))
    assert fmap is not None and fmap.n_total == 20 and fmap.image_xy.shape == (20, 2)
    assert f"map of feature run {pool_run} (pool): 20 pairs in {maps.map_dir(ws, pool_run)}" in log
    before = (maps.map_dir(ws, pool_run) / "meta.json").stat().st_mtime_ns
    again = _prepare_job(ws)  # the cache and the map exist: nothing is computed again
    assert again.status == "done" and "map of feature run" not in jobs.read_log(ws, again.job_id)
    assert (maps.map_dir(ws, pool_run) / "meta.json").stat().st_mtime_ns == before


def test_a_failed_map_does_not_fail_the_prepare(featurized):
    ws = featurized
    (ws.root / "maps").write_text("a file where the maps folder should be")  # the map cannot be written
    info = _prepare_job(ws)
    log = jobs.read_log(ws, info.job_id)
    assert info.status == "done", log
    assert _done_caches(ws) == 1
    assert "warning: the map of pool was not computed" in log and "chips map" in log


def test_no_map_skips_it(featurized):
    ws = featurized
    pool_run, _ = feature_runs_for(ws, "pool", "target")
    assert _prepare_job(ws, "--no-map").status == "done"
    assert _done_caches(ws) == 1 and maps.load_map(ws, pool_run) is None

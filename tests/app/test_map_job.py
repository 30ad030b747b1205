"""The Map page computes a missing map as a background `chips map` job (real subprocess, real DuckDB):
it shows the job's progress, offers to run a cancelled job again, a second session follows the same job,
and the map is drawn once it is done."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from chips_core.curation import maps
from chips_core.workspace import jobs, store
from tests.app.workspace_build import EVAL, POOL

pytestmark = [pytest.mark.app, pytest.mark.slow]

MAIN = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


def _map_page() -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=180)
    at.run()
    at.switch_page("views/map.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def test_missing_map_runs_as_a_job_and_is_drawn_when_done(tiny_workspace):
    shutil.rmtree(tiny_workspace / "maps")
    ws = store.Workspace(tiny_workspace)
    at = _map_page()
    assert at.title[0].value == "Map"
    assert not at.get("plotly_chart"), "no map is drawn before the job has computed it"
    [job] = jobs.list_jobs(ws)
    assert job.kind == "map" and job.args[:3] == ["map", ws.root.as_posix(), POOL]
    run_id = int(job.args[job.args.index("--run") + 1])
    assert any("Computing the map" in p.proto.text for p in at.get("progress"))

    # cancelled from the page: it says so (no new job by itself) and offers to run it again
    at.button(key=f"cancel-{job.job_id}").click().run()
    assert jobs.job_status(ws, job.job_id).status == "cancelled"
    assert any("cancelled" in e.value for e in at.error) and len(jobs.list_jobs(ws)) == 1
    at.button(key="rerun-map").click().run()
    assert not at.exception, [e.value for e in at.exception]
    job = jobs.list_jobs(ws)[0]
    assert job.active and job.args == jobs.list_jobs(ws)[1].args

    # another tab (or a reload) while it runs: it shows the same job and starts none
    other = _map_page()
    assert len(jobs.list_jobs(ws, active_only=True)) == 1 and len(jobs.list_jobs(ws)) == 2
    assert any(f"Background job {job.job_id}" in c.value for c in other.caption)

    info = jobs.wait(ws, job.job_id, timeout_s=600)
    assert info.status == "done", jobs.read_log(ws, job.job_id)
    assert (maps.map_dir(ws, run_id) / "meta.json").is_file()
    assert "computed in" in jobs.read_log(ws, job.job_id)

    at.run()  # the page now reads the cached map
    assert not at.exception, [e.value for e in at.exception]
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert spec["data"][0]["type"] == "scattergl" and len(spec["data"][0]["customdata"]) == 48
    assert len(jobs.list_jobs(ws)) == 2, "a cached map starts no job"


def test_map_page_follows_a_prepare_job_that_will_draw_the_map(tiny_workspace):
    """While a prepare job of the pool runs (it maps the pool when its cache is written), the Map page shows
    that job's progress and starts no map job of its own; the map is drawn once the prepare is done."""
    shutil.rmtree(tiny_workspace / "maps")
    ws = store.Workspace(tiny_workspace)
    job_id = jobs.launch(ws, "prepare", ["prepare", str(ws.root), POOL, "--eval", EVAL, "--device", "cpu"])
    pgid = jobs.job_status(ws, job_id).pid
    os.killpg(pgid, signal.SIGSTOP)  # held mid-way, so the page surely finds it active
    try:
        at = _map_page()
        assert not at.get("plotly_chart")
        assert any("Preparing the scores, then the map" in p.proto.text for p in at.get("progress"))
        assert [j.kind for j in jobs.list_jobs(ws)] == ["prepare"], "the page starts no map job"
    finally:
        os.killpg(pgid, signal.SIGCONT)
    info = jobs.wait(ws, job_id, timeout_s=600)
    assert info.status == "done", jobs.read_log(ws, job_id)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert len(spec["data"][0]["customdata"]) == 48
    assert [j.kind for j in jobs.list_jobs(ws)] == ["prepare"]

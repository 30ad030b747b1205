"""With no workspace given, the dashboard builds the bundled demo as a background `chips demo` job (one for
every session), shows its progress, and opens the demo when the build is done."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from chips_core import demo
from chips_core.workspace import jobs, store

pytestmark = [pytest.mark.app, pytest.mark.slow]

MAIN = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


def _session() -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=900)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def test_no_arguments_builds_the_demo_in_a_job_then_opens_it(tmp_path, monkeypatch):
    monkeypatch.delenv("CHIPS_WORKSPACE", raising=False)
    monkeypatch.setenv("CHIPS_DEMO_WS", str(tmp_path / "demo"))
    at = _session()
    assert at.title[0].value == "Preparing the demo workspace"
    assert any("Building the demo workspace" in p.proto.text for p in at.get("progress"))
    # the job is recorded in the demo folder itself, made a (claimed, empty) workspace first
    ws = store.Workspace(tmp_path / "demo")
    [job] = jobs.list_jobs(ws)
    assert job.kind == "demo" and job.args == ["demo", str(ws.root)]
    assert not demo.is_complete(ws.root)

    # a second browser session opened meanwhile follows the same build instead of starting another
    other = _session()
    assert other.title[0].value == "Preparing the demo workspace"
    assert [j.job_id for j in jobs.list_jobs(ws)] == [job.job_id]

    info = jobs.wait(ws, job.job_id, timeout_s=900)
    assert info.status == "done", jobs.read_log(ws, job.job_id)
    assert demo.is_complete(ws.root)
    assert "demo workspace ready at" in jobs.read_log(ws, job.job_id)

    at.run()  # the page now opens the built demo
    assert not at.exception, [e.value for e in at.exception]
    assert any("Demo workspace" in i.value and "CHIPS_WORKSPACE" in i.value for i in at.sidebar.info)
    assert at.selectbox(key="pool_name").value == "demo-pool"
    assert at.title[0].value == "Scores"
    assert len(jobs.list_jobs(ws)) == 1

    at.switch_page("views/map.py").run()  # the build stored the map: drawn at once, no map job
    assert not at.exception, [e.value for e in at.exception]
    assert at.get("plotly_chart") and len(jobs.list_jobs(ws)) == 1

    at.switch_page("views/browse.py").run()
    assert not at.exception, [e.value for e in at.exception]
    cards = [m.value for m in at.markdown if m.value.startswith("**#")]
    assert cards, "the galleries show ranked pairs"
    # the demo's ground truth is shown on the cards, so a planted mistake can be seen where it ranks
    assert any("planted:" in c for c in cards)

    # the Browse filters know the ground truth: only the pairs with the planted mistake chosen are shown
    truth = demo.ground_truth("pool").set_index("pair_id")["planted"]
    at.multiselect(key="browse_planted").set_value(["mismatch"]).run()
    assert not at.exception, [e.value for e in at.exception]
    top = next(t for t in at.tabs if t.label == "Top ranked")
    shown = [
        int(b.key.removeprefix("top-exc-")) for b in top.button if b.key and b.key.startswith("top-exc-")
    ]
    n_mismatch = int((truth == "mismatch").sum())
    assert 0 < len(shown) == min(n_mismatch, 12)
    assert (truth.loc[shown] == "mismatch").all()
    assert any(f"of {n_mismatch} matching" in c.value for c in top.caption)

    assert at.query_params["browse_planted"] == "mismatch"  # in the URL (app/url_state.py): a reload keeps it
    reloaded = AppTest.from_file(MAIN, default_timeout=900)
    reloaded.query_params.update(dict(at.query_params))
    reloaded.switch_page("views/browse.py").run()
    assert not reloaded.exception, [e.value for e in reloaded.exception]
    assert reloaded.multiselect(key="browse_planted").value == ["mismatch"]
    assert any(f"of {n_mismatch} matching" in c.value for c in reloaded.caption)

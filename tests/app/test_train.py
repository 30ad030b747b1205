"""Export and train page: CPT on a saved selection runs as a real background job, then its evaluation."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from chips_core.workspace import jobs, store

pytestmark = [pytest.mark.app, pytest.mark.slow]

MAIN = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _wait_last_job(ws: store.Workspace, kind: str) -> None:
    job = next(j for j in jobs.list_jobs(ws) if j.kind == kind)
    done = jobs.wait(ws, job.job_id, timeout_s=600)
    assert done.status == "done", jobs.read_log(ws, job.job_id)[-3000:]


def _export_page_with_a_selection() -> AppTest:
    """The Export page after saving the current ranking as selection "to-train"."""
    at = AppTest.from_file(MAIN, default_timeout=180)
    at.run()
    at.switch_page("views/export.py").run()
    at.text_input(key="sel_name").input("to-train")
    at.button(key="FormSubmitter:save_selection-Save selection").click().run()
    _ok(at)
    return at


def test_train_a_selection_then_evaluate_it(tiny_workspace):
    ws = store.Workspace(tiny_workspace)
    at = _export_page_with_a_selection()
    at.number_input(key="train_epochs").set_value(1)
    at.number_input(key="train_batch").set_value(8)
    at.button(key="FormSubmitter:train_form-Train").click().run()
    _ok(at)
    assert any("Started train as background job" in s.value for s in at.success)
    _wait_last_job(ws, "train")

    at.run()
    _ok(at)
    runs = next(df.value for df in at.dataframe if "cpt_run_id" in df.value.columns)
    assert runs.loc[0, "status"] == "finished" and runs.loc[0, "selection"] == "to-train"
    assert at.get("plotly_chart"), "the loss curve of the run is drawn"
    assert at.selectbox(key="cpt_run").value == runs.loc[0, "cpt_run_id"]
    at.button(key="cpt_eval").click().run()
    _ok(at)
    _wait_last_job(ws, "evaluate")
    at.run()
    _ok(at)
    # before vs after: the base model (the pool's model) and the trained one, per metric with the change
    cmp = next(df.value for df in at.dataframe if "change (Δ)" in df.value.columns)
    assert list(cmp.columns) == ["eval_set", "metric", "base", "trained", "change (Δ)"]
    assert set(cmp["eval_set"]) == {"tiny-eval"} and {"i2t_R@1", "t2i_R@1"} <= set(cmp["metric"])
    assert (
        cmp[["base", "trained"]].notna().all().all() and cmp[["base", "trained"]].stack().between(0, 1).all()
    )
    assert (cmp["change (Δ)"] - (cmp["trained"] - cmp["base"])).abs().max() < 1e-12
    charts = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("before vs after" in spec for spec in charts), "the bar chart base vs trained is drawn"
    assert not any(b.key == "cpt_eval" for b in at.button), "nothing left to evaluate"


def _launch_long_run(at: AppTest) -> None:
    at.number_input(key="train_epochs").set_value(100)
    at.number_input(key="train_batch").set_value(2)
    at.button(key="FormSubmitter:train_form-Train").click().run()
    _ok(at)


def _runs(at: AppTest):
    return next(df.value for df in at.dataframe if "cpt_run_id" in df.value.columns)


def _until(at: AppTest, ok, what: str, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < deadline, f"no {what} after {timeout_s:.0f} s"
        time.sleep(1.0)
        at.run()
        _ok(at)


def test_live_progress_newest_run_selected_and_cancelled_shown(tiny_workspace):
    """While open_clip_train runs: step/total, loss and ETA in the runs table and above the bar; the newest
    run is selected when it appears; a cancelled training job shows its run as cancelled."""
    ws = store.Workspace(tiny_workspace)
    at = _export_page_with_a_selection()
    live = re.compile(r"step \d+/\d+ · epoch [\d.]+/100 · loss [\d.]+ · ETA \d+")
    try:
        for n_run in (1, 2):
            _launch_long_run(at)
            job = next(j for j in jobs.list_jobs(ws) if j.kind == "train")

            def progressing(n_run: int = n_run) -> bool:
                runs = next((d.value for d in at.dataframe if "cpt_run_id" in d.value.columns), None)
                return runs is not None and len(runs) == n_run and bool(live.search(runs.loc[0, "progress"]))

            _until(at, progressing, "step, loss and ETA of the running run")
            assert jobs.job_status(ws, job.job_id).active, "progress shows before the run ends"
            runs = _runs(at)
            newest = int(runs.loc[0, "cpt_run_id"])
            assert runs.loc[0, "status"] == "running"
            assert at.selectbox(key="cpt_run").value == newest, "the newest run is selected"
            bars = [e for e in at.get("progress") if f"Run {newest} running: step" in e.proto.text]
            assert bars and live.search(bars[0].proto.text) and 0 <= bars[0].proto.value <= 100
            jobs.cancel(ws, job.job_id, grace_s=20)
            at.run()
            _ok(at)
            runs = _runs(at)
            assert runs.loc[0, "status"] == "cancelled", runs
            assert any(f"Run {newest} was cancelled" in w.value for w in at.warning)
    finally:  # no training left behind on a failure
        for j in jobs.list_jobs(ws, active_only=True):
            jobs.cancel(ws, j.job_id, grace_s=20)

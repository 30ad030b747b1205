"""Export and train page: CPT on a saved selection runs as a real background job, then its evaluation."""

from __future__ import annotations

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


def test_train_a_selection_then_evaluate_it(tiny_workspace):
    ws = store.Workspace(tiny_workspace)
    at = AppTest.from_file(MAIN, default_timeout=180)
    at.run()
    at.switch_page("views/export.py").run()
    at.text_input(key="sel_name").input("to-train")
    at.button(key="FormSubmitter:save_selection-Save selection").click().run()
    _ok(at)
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
    at.button(key="cpt_eval").click().run()
    _ok(at)
    _wait_last_job(ws, "evaluate")
    at.run()
    metrics = next(df.value for df in at.dataframe if "eval_set" in df.value.columns)
    assert metrics.loc[0, "eval_set"] == "tiny-eval"
    assert {"i2t_R@1", "t2i_R@1"} <= set(metrics.columns)
    assert 0.0 <= metrics.loc[0, "i2t_R@1"] <= 1.0

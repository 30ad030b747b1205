"""Training in the real dashboard (`streamlit run` + headless Debian Chromium): the runs panel shows the
run's step, loss and ETA while open_clip_train still runs (without a reload), and a cancelled run as
cancelled."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chips_core.workspace import jobs
from tests.app.workspace_build import build_tiny_workspace
from tests.browser.harness import ROOT, chromium_page, streamlit_server, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = ROOT / "test-artifacts"
LIVE = re.compile(r"Run \d+ running: step \d+/\d+ · epoch [\d.]+/100 · loss [\d.]+ · ETA \d+")


def test_train_shows_live_progress_then_cancelled(tmp_path: Path) -> None:
    ws = build_tiny_workspace(tmp_path / "tiny")
    try:
        with (
            streamlit_server(ws.root, ARTIFACTS / "browser-train-streamlit.log") as url,
            chromium_page() as page,
        ):
            page.goto(url)
            wait_idle(page)
            page.locator("[data-testid='stSidebarNav'] a").filter(has_text="Export and train").first.click()
            page.locator("h1").filter(has_text="Export and train").first.wait_for()
            wait_idle(page)
            page.get_by_label("Selection name", exact=True).fill("browser-train")
            page.get_by_role("button", name="Save selection", exact=True).click()
            page.get_by_text("Saved browser-train v1").wait_for()
            wait_idle(page)
            for label, value in (("Epochs", "100"), ("Batch size", "2")):
                box = page.get_by_label(label, exact=True)
                box.fill(value)
                box.press("Tab")
            page.get_by_role("button", name="Train", exact=True).click()
            page.get_by_text(re.compile("Started train as background job")).wait_for()
            # no reload, no click: the panel refreshes itself until the running run's progress shows
            page.get_by_text(LIVE).first.wait_for(timeout=240_000)
            (job,) = [j for j in jobs.list_jobs(ws) if j.kind == "train"]
            assert jobs.job_status(ws, job.job_id).active, "progress appeared before the run ended"
            first = page.get_by_text(LIVE).first.inner_text()
            page.wait_for_function(
                "t => ![...document.querySelectorAll('[data-testid=\"stProgress\"]')]"
                ".some(e => e.innerText.includes(t))",
                arg=first,
                timeout=60_000,
            )  # it moves on by itself
            page.screenshot(path=str(ARTIFACTS / "train-progress.png"), full_page=True)
            page.get_by_role("button", name=f"Cancel job {job.job_id} (train)").click()
            page.get_by_text(re.compile(r"Run \d+ was cancelled")).wait_for(timeout=120_000)
            page.screenshot(path=str(ARTIFACTS / "train-cancelled.png"), full_page=True)
    finally:
        for j in jobs.list_jobs(ws, active_only=True):
            jobs.cancel(ws, j.job_id, grace_s=20)
    assert jobs.job_status(ws, job.job_id).status == "cancelled"

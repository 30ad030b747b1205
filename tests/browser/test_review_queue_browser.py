"""The review queue and the detail view in the real dashboard (`streamlit run`, headless Debian Chromium):
the keyboard shortcut includes a pair, and a reload keeps the queue's position, its tab and the decision.

Screenshots go to test-artifacts/ (git-ignored); docs/screenshots/review-queue.png and detail.png are copies.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from chips_core.curation import selection
from tests.app.workspace_build import POOL, build_tiny_workspace
from tests.browser.harness import ROOT, chromium_page, streamlit_server, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = ROOT / "test-artifacts"


def _heading(page, text: str) -> None:
    page.locator("h3").filter(has_text=text).first.wait_for()
    wait_idle(page)


def test_review_queue_keyboard_include_survives_a_reload(tmp_path: Path) -> None:
    ws = build_tiny_workspace(tmp_path / "tiny")
    with (
        streamlit_server(ws.root, ARTIFACTS / "browser-review-streamlit.log") as url,
        chromium_page(height=1300) as page,
    ):
        page.goto(f"{url}/browse")
        page.locator("h1").filter(has_text="Browse").first.wait_for()
        wait_idle(page)
        page.get_by_role("tab", name="Review queue").click()
        _heading(page, "Pair 1 of 48 in the queue — rank 15")
        page.locator("[data-testid='stPlotlyChart'] .js-plotly-plot").first.wait_for()
        page.wait_for_function(
            "() => new URLSearchParams(location.search).get('browse_tab') === 'Review queue'"
        )
        page.get_by_role("tab", name="Review queue").scroll_into_view_if_needed()
        page.mouse.wheel(0, 420)  # the queue, not the page header, in the picture
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / "review-queue.png"))

        page.locator("h3").filter(has_text="in the queue").first.click()  # focus the page, not an input
        page.keyboard.press("i")  # Streamlit's shortcut of the Include button
        _heading(page, "Pair 2 of 48 in the queue — rank 16")
        page.wait_for_function("() => new URLSearchParams(location.search).get('review_pos') === '2'")
        dec = selection.current_decisions(ws, POOL)
        included = dec.loc[dec["state"] == "include", "pair_id"].tolist()
        assert len(included) == 1  # the pair at rank 15, recorded at once

        page.reload()  # same pair, same tab; the decision is in the workspace
        _heading(page, "Pair 2 of 48 in the queue — rank 16")
        page.locator(".st-key-review-back button:not([disabled])").first.wait_for()
        back = page.locator("h3").filter(has_text="Pair 1 of 48 in the queue — rank 15").first
        for _ in range(3):  # on a loaded machine the first key press can come before the page listens;
            page.locator("h3").filter(has_text="in the queue").first.click()  # a second Back is harmless:
            page.keyboard.press("b")  # Back is disabled at the queue's first pair
            try:
                back.wait_for(timeout=15_000)
                break
            except PlaywrightTimeout:
                continue
        _heading(page, "Pair 1 of 48 in the queue — rank 15")
        decision = page.locator("[data-testid='stMarkdownContainer']").filter(
            has_text=re.compile(r"^Decision:")
        )
        decision.filter(visible=True).filter(has_text="included").first.wait_for()

        page.goto(f"{url}/browse")  # the detail view: the image at source resolution, zoomable
        page.locator("h1").filter(has_text="Browse").first.wait_for()
        wait_idle(page)
        page.locator("[class*='st-key-top-why-'] button").first.click()
        page.locator("h3").filter(has_text=re.compile(r"^Pair -?\d+ — rank")).first.wait_for()
        wait_idle(page)
        page.get_by_text("shown at full resolution").first.wait_for()
        page.locator("[data-testid='stPlotlyChart'] .js-plotly-plot image").first.wait_for(state="attached")
        page.locator("h3").filter(
            has_text=re.compile(r"^Pair -?\d+ — rank")
        ).first.scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / "detail.png"))

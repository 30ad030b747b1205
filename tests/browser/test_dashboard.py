"""The real dashboard (`streamlit run`) in headless Debian Chromium: open, slide, lasso the map, export.

Screenshots go to test-artifacts/ (git-ignored); the README's docs/screenshots/ are copies of these.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from tests.app.workspace_build import build_tiny_workspace
from tests.browser.harness import ROOT, chromium_page, streamlit_server, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = ROOT / "test-artifacts"


def _metric(page, label: str) -> str:
    tile = page.locator("[data-testid='stMetric']").filter(has_text=label).first
    return tile.locator("[data-testid='stMetricValue']").inner_text().strip()


def _step_up_to(page, slider, value: float) -> None:
    """Press → on `slider` until it holds `value` (a key pressed while the app reruns can be lost)."""
    for _ in range(30):
        if float(slider.input_value()) >= value - 1e-9:
            break
        slider.press("ArrowRight")
        page.wait_for_timeout(100)


def _slider(page, label: str):
    return page.get_by_role("slider", name=label)


def _go(page, title: str) -> None:
    page.locator("[data-testid='stSidebarNav'] a").filter(has_text=title).first.click()
    page.locator("h1").filter(has_text=title).first.wait_for()
    wait_idle(page)


def _open_scores(page, url: str) -> None:
    page.goto(url)
    page.locator("h1").filter(has_text="Scores").first.wait_for()
    wait_idle(page)


def test_open_slide_lasso_export(tmp_path: Path) -> None:
    ws = build_tiny_workspace(tmp_path / "tiny")
    with streamlit_server(ws.root, ARTIFACTS / "browser-streamlit.log") as url, chromium_page() as page:
        _open_scores(page, url)
        assert _metric(page, "Selected") == "15"
        page.locator(".chips-histograms svg rect").first.wait_for()  # the score histograms (inline SVG)
        page.locator("[data-testid='stDataFrame'] canvas").first.wait_for()
        page.screenshot(path=str(ARTIFACTS / "scores.png"), full_page=True)

        ratio = _slider(page, "Selection ratio r")
        _step_up_to(page, ratio, 0.40)
        assert float(ratio.input_value()) == pytest.approx(0.40)
        page.locator("[data-testid='stMetricValue']").filter(
            has_text=re.compile(r"^\s*20\s*$")
        ).first.wait_for()
        wait_idle(page)
        assert _metric(page, "Selected") == "20"  # ceil(0.40 · 48)

        _go(page, "Map")
        plot = page.locator(".js-plotly-plot").first
        plot.wait_for()
        box = page.locator(".js-plotly-plot .nsewdrag").first.bounding_box()
        x0, y0, w, h = box["x"], box["y"], box["width"], box["height"]
        page.mouse.move(x0 + 3, y0 + 3)
        page.mouse.down()
        for fx, fy in ((0.99, 0.01), (0.99, 0.99), (0.01, 0.99), (0.01, 0.02)):
            page.mouse.move(x0 + fx * w, y0 + fy * h, steps=8)
        page.mouse.up()
        heading = page.locator("h3").filter(has_text=re.compile(r"\d+ selected pairs")).first
        heading.wait_for()
        wait_idle(page)
        assert heading.inner_text().startswith("48 selected pairs")
        page.screenshot(path=str(ARTIFACTS / "map.png"), full_page=True)

        _go(page, "Browse")
        page.locator("[data-testid='stImage'] img").first.wait_for()
        page.screenshot(path=str(ARTIFACTS / "browse.png"), full_page=True)
        page.locator("[class*='st-key-top-why-'] button").first.click()
        page.locator("h3").filter(has_text="Pair ").first.wait_for()
        wait_idle(page)
        page.locator("[data-testid='stDataFrame'] canvas").first.wait_for()
        page.screenshot(path=str(ARTIFACTS / "detail.png"), full_page=True)

        _go(page, "Export and train")
        name = page.get_by_label("Selection name", exact=True)
        name.fill("browser-pick")
        page.get_by_role("button", name="Save selection", exact=True).click()
        page.get_by_text("Saved browser-pick v1").wait_for()
        wait_idle(page)
        page.get_by_role("button", name="Save in the workspace", exact=True).click()
        page.get_by_text(re.compile(r"Wrote .*browser-pick-v1\.csv")).wait_for()
        wait_idle(page)
        with page.expect_download() as download:  # the browser download: the bytes the export wrote
            page.get_by_role("button", name="Download browser-pick-v1.csv").click()
        downloaded = Path(download.value.path()).read_bytes()
        assert downloaded == (ws.root / "exports" / "browser-pick-v1.csv").read_bytes()
        page.screenshot(path=str(ARTIFACTS / "export.png"), full_page=True)

        _go(page, "Workspace")
        page.locator("[data-testid='stDataFrame'] canvas").first.wait_for()
        page.screenshot(path=str(ARTIFACTS / "workspace.png"), full_page=True)

    out = ws.root / "exports" / "browser-pick-v1.csv"
    df = pd.read_csv(out)
    assert len(df) == 20 and {"filepath", "title"} <= set(df.columns)


def test_a_reload_keeps_the_view_in_the_url(tmp_path: Path) -> None:
    """Slide, reload: the slider keeps its value (app/url_state.py); a link to another page carries it."""
    ws = build_tiny_workspace(tmp_path / "tiny")
    with streamlit_server(ws.root, ARTIFACTS / "browser-url-streamlit.log") as url, chromium_page() as page:
        _open_scores(page, url)
        ratio = _slider(page, "Selection ratio r")
        _step_up_to(page, ratio, 0.40)
        page.locator("[data-testid='stMetricValue']").filter(
            has_text=re.compile(r"^\s*20\s*$")
        ).first.wait_for()
        wait_idle(page)
        page.wait_for_function(
            "() => Math.abs(parseFloat(new URLSearchParams(location.search).get('ratio')) - 0.4) < 1e-9"
        )
        shared = page.url
        assert "method=chips" in shared

        page.reload()
        page.locator("h1").filter(has_text="Scores").first.wait_for()
        wait_idle(page)
        assert float(_slider(page, "Selection ratio r").input_value()) == pytest.approx(0.40)
        assert _metric(page, "Selected") == "20"

        query = shared.split("?", 1)[1]
        page.goto(f"{url}/export?{query}")  # the same view, opened on another page
        page.locator("h1").filter(has_text="Export and train").first.wait_for()
        wait_idle(page)
        page.get_by_text(re.compile(r"best-ranked 40% of the pool")).first.wait_for()
        assert "k None" not in page.locator("[data-testid='stMain']").inner_text()

"""The Browse page's caption search and decision filter in the real dashboard (`streamlit run`, headless
Debian Chromium): the grid shows only the matching pairs, and a reload keeps the search and the filter."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chips_core.curation import selection
from chips_core.workspace import catalog
from tests.app.workspace_build import POOL, build_tiny_workspace
from tests.browser.harness import ROOT, chromium_page, streamlit_server, wait_idle

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = ROOT / "test-artifacts"


def _grid_ids(page, key: str) -> list[int]:
    """The pair ids of the cards in gallery `key`, from their exclude buttons' element keys."""
    classes = page.locator(f"[class*='st-key-{key}-exc-']").evaluate_all("els => els.map(e => e.className)")
    found = [re.search(rf"st-key-{key}-exc-(-?\d+)", c) for c in classes]
    return list(dict.fromkeys(int(m.group(1)) for m in found if m))  # a key marks nested elements


def _wait_grid(page, key: str, n: int) -> list[int]:
    """The grid's ids once it shows `n` cards (the app reruns after each input)."""
    for _ in range(120):
        wait_idle(page)
        ids = _grid_ids(page, key)
        if len(ids) == n:
            return ids
        page.wait_for_timeout(500)
    raise AssertionError(f"gallery {key} shows {len(_grid_ids(page, key))} cards, not {n}")


def test_search_a_caption_and_filter_on_the_decision(tmp_path: Path) -> None:
    ws = build_tiny_workspace(tmp_path / "tiny")
    pairs = catalog.pairs_frame(ws, selection.resolve_pool(ws, POOL)).set_index("pair_id")
    low = pairs["caption"].str.lower()
    hits = set(pairs.index[low.str.contains("axial") & low.str.contains("chest")])
    assert 0 < len(hits) < 12
    with (
        streamlit_server(ws.root, ARTIFACTS / "browser-search-streamlit.log") as url,
        chromium_page() as page,
    ):
        page.goto(url)
        page.locator("h1").filter(has_text="Scores").first.wait_for()
        wait_idle(page)
        page.locator("[data-testid='stSidebarNav'] a").filter(has_text="Browse").first.click()
        page.locator("h1").filter(has_text="Browse").first.wait_for()
        wait_idle(page)
        first = _wait_grid(page, "top", 12)[0]
        card = page.locator(f".st-key-top-why-{first}").first
        page.locator("[data-testid='stImage'] img").first.wait_for()
        wait_idle(page)
        card.locator("button").first.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "browse-cards.png"))
        assert "Details" in card.inner_text()

        box = page.locator(".st-key-browse_text input")
        box.fill("Axial CHEST")
        box.press("Enter")
        shown = _wait_grid(page, "top", len(hits))
        assert set(shown) == hits  # only the matching pairs
        page.get_by_text(re.compile(rf"of {len(hits)} matching pairs")).first.wait_for()

        page.locator(f".st-key-top-exc-{shown[0]} button").first.click()  # exclude one
        page.get_by_text("exclude: 1 pair(s) recorded").first.wait_for()
        wait_idle(page)
        page.get_by_text("Filters: decision, label, component ranges").click()
        option = page.get_by_role("option", name="Excluded")
        for _ in range(10):  # a click during a rerun can be lost: open the box until its options show
            wait_idle(page)
            page.locator(".st-key-browse_decision input").first.click()
            try:
                option.wait_for(timeout=5_000)
                break
            except Exception:
                page.keyboard.press("Escape")
        option.click()
        page.keyboard.press("Escape")
        assert _wait_grid(page, "top", 1) == [shown[0]]
        page.screenshot(path=str(ARTIFACTS / "browse-search.png"), full_page=True)

        page.wait_for_function(  # the search and the filter are in the URL (app/url_state.py) ...
            "() => { const q = new URLSearchParams(location.search);"
            " return q.get('browse_text') === 'Axial CHEST' && q.get('browse_decision') === 'exclude'; }"
        )
        page.reload()  # ... so a reload shows the same pairs
        page.locator("h1").filter(has_text="Browse").first.wait_for()
        assert _wait_grid(page, "top", 1) == [shown[0]]
        assert page.locator(".st-key-browse_text input").input_value() == "Axial CHEST"
    dec = selection.current_decisions(ws, POOL).set_index("pair_id")
    assert dec.loc[shown[0], "state"] == "exclude"

"""The Browse page's caption search, filters, Bottom paging and labelled decision buttons under AppTest, on
the tiny real workspace; what each gallery shows is checked against the pairs and ranking computed apart."""

from __future__ import annotations

import pandas as pd
import pytest

from chips_core.curation import selection
from chips_core.scoring.params import RankParams
from chips_core.scoring.ranking import rank
from chips_core.workspace import catalog, store
from tests.app.test_pages import _app, _ok, _only_cache
from tests.app.workspace_build import POOL

pytestmark = pytest.mark.app


def _shown(at, tab: str, key: str) -> list[int]:
    """The pair ids of a tab's cards, in grid order (from their exclude buttons' keys)."""
    t = next(t for t in at.tabs if t.label == tab)
    prefix = f"{key}-exc-"
    return [int(b.key.removeprefix(prefix)) for b in t.button if b.key and b.key.startswith(prefix)]


def _pairs(ws_root) -> pd.DataFrame:
    ws = store.Workspace(ws_root)
    return catalog.pairs_frame(ws, selection.resolve_pool(ws, POOL)).set_index("pair_id")


def _ranking(at, ws_root) -> pd.DataFrame:
    """The page's default ranking, computed by the library apart from the page, best first."""
    frame = rank(_only_cache(ws_root), RankParams(k=at.session_state["k"])).frame
    return frame.sort_values("rank").reset_index(drop=True)


def test_caption_search_and_decision_filter(tiny_workspace):
    at = _app("browse")
    pairs = _pairs(tiny_workspace)
    ranking = _ranking(at, tiny_workspace)
    at.number_input(key="browse_top_start").set_value(13).run()
    at.text_input(key="browse_text").input("AXIAL chest").run()  # the planted mis-captions, any case
    _ok(at)
    hits = pairs[pairs["caption"].str.lower().str.contains("axial") & pairs["caption"].str.contains("chest")]
    assert 0 < len(hits) < 12
    expect = ranking[ranking["pair_id"].isin(hits.index)]["pair_id"].tolist()
    assert at.number_input(key="browse_top_start").value == 1  # a new search starts at its first page
    assert _shown(at, "Top ranked", "top") == expect  # only the matches, best first
    assert _shown(at, "Bottom ranked", "bottom") == expect[::-1]
    assert sorted(_shown(at, "Random", "random")) == sorted(expect)
    assert any(f"of {len(expect)} matching" in c.value for c in at.caption)

    # exclude one match on the page, then filter on the decision state
    pid = expect[0]
    at.button(key=f"top-exc-{pid}").click().run()
    _ok(at)
    at.multiselect(key="browse_decision").set_value(["exclude"]).run()
    _ok(at)
    assert _shown(at, "Top ranked", "top") == [pid]
    at.multiselect(key="browse_decision").set_value(["none"]).run()
    _ok(at)
    assert _shown(at, "Top ranked", "top") == expect[1:]

    # label and a component range, with the search cleared: the filters alone
    at.text_input(key="browse_text").input("").run()
    at.multiselect(key="browse_decision").set_value([]).run()
    label = sorted(set(pairs["label"].dropna()))[0]
    at.multiselect(key="browse_label").set_value([label]).run()
    at.number_input(key="browse_min_learnability").set_value(float(ranking["learnability"].median())).run()
    _ok(at)
    lo = float(at.number_input(key="browse_min_learnability").value)
    match = ranking[ranking["pair_id"].map(pairs["label"]).eq(label) & (ranking["learnability"] >= lo)]
    assert _shown(at, "Top ranked", "top") == match["pair_id"].head(12).tolist()


def test_bottom_tab_pages_like_the_top_tab(tiny_workspace):
    at = _app("browse")
    ranking = _ranking(at, tiny_workspace)
    ids = ranking["pair_id"].tolist()
    assert _shown(at, "Top ranked", "top") == ids[:12]
    assert _shown(at, "Bottom ranked", "bottom") == ids[::-1][:12]
    at.number_input(key="browse_bottom_start").set_value(13).run()
    _ok(at)
    assert _shown(at, "Bottom ranked", "bottom") == ids[::-1][12:24]
    at.number_input(key="browse_top_start").set_value(41).run()  # the last page is short
    _ok(at)
    assert _shown(at, "Top ranked", "top") == ids[40:]
    assert any(f"Showing 13–24 of {len(ids)}" in c.value for c in at.caption)


def test_decision_buttons_have_labels_and_help(tiny_workspace):
    at = _app("browse")
    top = next(t for t in at.tabs if t.label == "Top ranked")
    for part, label in (("inc", "Include"), ("exc", "Exclude"), ("why", "Details")):
        buttons = [b for b in top.button if b.key and b.key.startswith(f"top-{part}-")]
        assert len(buttons) == 12
        assert all(b.label == label and b.help for b in buttons), (label, buttons[0].label)

"""The view in the URL (app/url_state.py) and the Export page's browser download, under AppTest."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.testing.v1 import AppTest

from app import context, url_state
from chips_core.curation import export, selection
from chips_core.workspace import catalog, store
from tests.app.test_browse_search import _pairs, _ranking, _shown
from tests.app.workspace_build import POOL

pytestmark = pytest.mark.app

MAIN = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


def _open(query: dict[str, str] | None = None, page: str | None = None) -> AppTest:
    """A fresh session (a browser opening a link): `query` in the URL, `page` its path."""
    at = AppTest.from_file(MAIN, default_timeout=180)
    at.query_params.update(query or {})
    if page:
        at.switch_page(f"views/{page}.py")
    at.run()
    _ok(at)
    return at


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _view(at: AppTest) -> dict:
    """The session values of every field kept in the URL."""
    return {key: at.session_state[key] for key in url_state.FIELDS if key in at.session_state}


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_fields_round_trip_exactly():
    for key, value in {
        "alpha": 0.15000000000000002,
        "ratio": 0.07,
        "lam_factor": 0.0178,
        "beta": 1 / 3,
        "guard_mads": 2.75,
        "agreement": 0.35,
        "clipscore_weight": 0.45,
        "k": 64,
        "blocks": ["text", "visual"],
        "guard_on": False,
        "normalize": True,
        "detail_pair": -(2**63),
        "method": "dot",
        "pool_name": "my pool, v2",
    }.items():
        assert url_state.parse(key, url_state.to_text(key, value)) == value, key
    for key, text in {
        "alpha": "1.5",
        "ratio": "nan",
        "beta": "inf",
        "lam_factor": "2.5",
        "agreement": "1.2",
        "clipscore_weight": "-0.05",
        "k": "0",
        "blocks": "visual,visual",
        "guard_on": "1",
        "method": "tracin",  # not offered by the dashboard (it needs checkpoint caches)
        "preset": "fast",
        "detail_pair": str(2**63),
        "pool_name": " ",
    }.items():
        with pytest.raises(ValueError):
            url_state.parse(key, text)
    assert set(context.PERSISTENT_KEYS) <= set(url_state.FIELDS)


def test_browse_fields_round_trip_and_refuse_hand_edited_values():
    for key, value in {
        "browse_text": "  Axial, CHEST & co ",
        "browse_decision": ["none", "include"],
        "browse_label": ["CT, chest", 'say "x"', "é"],  # free text: commas and quotes survive
        "browse_planted": ["mismatch", "none"],
        "browse_min_score": -0.1 + 0.2,
        "browse_max_alignment": 1e-300,
        "browse_per_page": 24,
        "browse_top_start": 25,
    }.items():
        assert url_state.parse(key, url_state.to_text(key, value)) == value, key
    for key, text in [
        ("browse_decision", "include,maybe"),
        ("browse_decision", "include,include"),
        ("browse_decision", ""),
        ("browse_label", "retina"),  # not JSON
        ("browse_label", '{"a": 1}'),
        ("browse_label", "[1, 2]"),
        ("browse_label", '["a", "a"]'),
        ("browse_planted", "mistake"),
        ("browse_min_score", "nan"),
        ("browse_max_relevance", "-inf"),
        ("browse_min_agreement", "low"),
        ("browse_per_page", "13"),
        ("browse_per_page", "12.5"),
        ("browse_top_start", "0"),
        ("browse_bottom_start", "2.5"),
    ]:
        with pytest.raises(ValueError):
            url_state.parse(key, text)


def test_query_params_seed_the_scores_widgets_and_widgets_write_them(tiny_workspace):
    at = _open({"method": "dot", "ratio": "0.2"})
    assert at.title[0].value == "Scores"
    assert at.selectbox(key="method").value == "dot"
    assert at.slider(key="ratio").value == 0.2
    assert _metric(at, "Selected") == str(math.ceil(0.2 * 48))
    assert at.query_params["method"] == "dot" and at.query_params["ratio"] == "0.2"
    assert at.query_params["k"] == str(at.session_state["k"])  # every field is in the URL
    assert at.query_params["pool_name"] == POOL

    at.slider(key="alpha").set_value(0.35).run()
    _ok(at)
    assert at.query_params["alpha"] == repr(0.35)
    at.selectbox(key="method").set_value("chips").run()
    at.select_slider(key="lam_factor").set_value(17.8).run()
    at.checkbox(key="use_relevance").uncheck().run()
    at.multiselect(key="blocks").unselect("text").run()
    _ok(at)
    assert at.query_params["method"] == "chips" and at.query_params["use_relevance"] == "false"
    assert at.query_params["blocks"] == "visual" and at.query_params["lam_factor"] == "17.8"

    reloaded = _open(dict(at.query_params))  # a reload: a new session from the same URL
    assert _view(reloaded) == _view(at)
    assert reloaded.query_params == at.query_params
    assert _metric(reloaded, "Selected") == _metric(at, "Selected")


def test_invalid_url_values_are_ignored(tiny_workspace):
    bad = {
        "method": "bogus",
        "ratio": "7",
        "alpha": "nan",
        "k": "4096",  # more than this cache's k_max: the default k instead
        "lam_factor": "2.5",
        "blocks": "visual,nope",
        "guard_on": "maybe",
        "preset": "",
        "pool_name": "no such pool",
        "detail_pair": "x",
    }
    at = _open(bad)
    default = _open()
    assert _view(at) == _view(default)
    assert at.query_params == default.query_params  # the URL now shows the valid view
    assert at.query_params["method"] == "chips"


def test_the_pair_and_the_map_choices_come_from_the_url(tiny_workspace):
    ws = store.Workspace(tiny_workspace)
    pool_id = int(context.pools(ws, "pool").set_index("name").loc[POOL, "pool_id"])
    pid = int(catalog.pairs_frame(ws, pool_id)["pair_id"].iloc[3])
    at = _open({"detail_pair": str(pid)}, page="browse")
    assert any(f"Pair {pid}" in s.value for s in at.subheader)
    at.button(key="detail_close").click().run()
    _ok(at)
    assert "detail_pair" not in at.query_params

    at = _open({"map_space": "text", "map_colour": "decision"}, page="map")
    assert at.radio(key="map_space").value == "text" and at.selectbox(key="map_colour").value == "decision"
    at = _open({"map_colour": "planted (demo ground truth)"}, page="map")  # no demo here: ignored
    assert at.selectbox(key="map_colour").value == "score"
    assert at.query_params["map_colour"] == "score"


def test_export_page_names_the_k_used_and_downloads_the_exported_bytes(tiny_workspace, monkeypatch):
    deferred = []
    add = MediaFileManager.add_deferred

    def spy(self, data_callable, *args, **kwargs):
        deferred.append((kwargs.get("file_name"), data_callable))
        return add(self, data_callable, *args, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add_deferred", spy)
    at = _open({"ratio": "0.5"}, page="export")  # a link straight to Export: the Scores page never ran
    assert at.title[0].value == "Export and train"
    text = " ".join(c.value for c in at.caption) + " ".join(m.value for e in at.expander for m in e.markdown)
    k = at.session_state["k"]
    assert "k None" not in text and f"k {k}," in text  # in the parameters for ML engineers
    at.text_input(key="sel_name").input("linked")
    at.button(key="FormSubmitter:save_selection-Save selection").click().run()
    _ok(at)
    assert "Saved linked v1: 24 pairs" in at.success[0].value
    ws = store.Workspace(tiny_workspace)
    sid = int(selection.list_selections(ws)["selection_id"].max())
    assert selection.get_selection(ws, sid).params["k"] == k

    for fmt in export.FORMATS:
        deferred.clear()
        at.selectbox(key="export_fmt").set_value(fmt).run()
        _ok(at)
        default = export.default_path(ws, selection.get_selection(ws, sid), fmt)
        assert any(str(default) in c.value for c in at.caption)  # the workspace path, in full
        assert at.text_input(key=f"export_out_{sid}_{fmt}").value == str(default)
        (name, make) = deferred[-1]
        assert name == default.name
        data = make()  # what the browser receives on a click
        at.button(key="export_go").click().run()
        _ok(at)
        assert default.read_bytes() == data
    df = pd.read_csv(default.with_name("linked-v1.csv"))
    assert len(df) == 24


def _browse_view(at: AppTest) -> dict:
    """What the Browse page shows: its search and filter widgets, page size, positions and galleries."""
    return {
        "text": at.text_input(key="browse_text").value,
        "decision": at.multiselect(key="browse_decision").value,
        "label": at.multiselect(key="browse_label").value,
        "min_score": at.number_input(key="browse_min_score").value,
        "per_page": at.select_slider(key="browse_per_page").value,
        "top_start": at.number_input(key="browse_top_start").value,
        "bottom_start": at.number_input(key="browse_bottom_start").value,
        "top": _shown(at, "Top ranked", "top"),
        "bottom": _shown(at, "Bottom ranked", "bottom"),
    }


def _browse_params(at: AppTest) -> dict[str, str]:
    """The URL's Browse parameters that app/url_state.py keeps (the tab binds itself)."""
    return {k: v for k, v in at.query_params.items() if k.startswith("browse_") and k != "browse_tab"}


def test_a_link_restores_the_browse_search_filters_and_pages(tiny_workspace):
    default = _open(page="browse")
    assert _browse_params(default) == {}  # an empty search, no filter and the first pages add nothing
    pairs = _pairs(tiny_workspace)
    ranking = _ranking(default, tiny_workspace)
    text = ranking["pair_id"].map(pairs["caption"]).str.lower().str.contains("photograph")
    labelled = ranking["pair_id"].map(pairs["label"]).isin(["retina", "other"])
    low = float(ranking.loc[text & labelled, "score"].quantile(0.2))
    match = ranking[text & labelled & (ranking["score"] >= low)]["pair_id"].tolist()
    assert 12 < len(match) < text.sum()  # the filters narrow the search, and it spans pages
    link = {
        "browse_text": "Photograph",
        "browse_label": json.dumps(["retina", "other"]),
        "browse_decision": "none",  # nothing is decided yet: every pair
        "browse_min_score": repr(low),
        "browse_per_page": "8",
        "browse_top_start": "3",
        "browse_bottom_start": "9",
    }
    at = _open(link, page="browse")
    assert (
        _browse_view(at)
        == {
            "text": "Photograph",
            "decision": ["none"],
            "label": ["retina", "other"],
            "min_score": low,
            "per_page": 8,
            "top_start": 3,
            "bottom_start": 9,
            "top": match[2:10],  # the third to tenth best of the matches: the page the link was on
            "bottom": match[::-1][8:16],
        }
    )
    assert any(f"Showing 3–10 of {len(match)} matching pairs." == c.value for c in at.caption)
    assert _browse_params(at) == link  # the first look at the filters keeps the link's pages

    at.switch_page("views/scores.py").run()  # the search and pages survive a visit to another page
    _ok(at)
    assert _browse_params(at) == link
    at.switch_page("views/browse.py").run()
    _ok(at)
    assert _browse_view(at)["top"] == match[2:10]


def test_browse_changes_go_into_the_url_and_a_reload_shows_them(tiny_workspace):
    at = _open(page="browse")
    at.text_input(key="browse_text").input("fundus photograph").run()
    at.number_input(key="browse_top_start").set_value(4).run()
    at.multiselect(key="browse_label").set_value(["retina"]).run()  # a new filter: back to the first page
    _ok(at)
    assert _browse_params(at) == {"browse_text": "fundus photograph", "browse_label": '["retina"]'}
    at.multiselect(key="browse_decision").set_value(["none", "exclude"]).run()
    at.number_input(key="browse_max_learnability").set_value(0.25).run()
    at.select_slider(key="browse_per_page").set_value(16).run()
    at.number_input(key="browse_top_start").set_value(2).run()
    at.number_input(key="browse_bottom_start").set_value(5).run()
    _ok(at)
    assert _browse_params(at) == {
        "browse_text": "fundus photograph",
        "browse_label": '["retina"]',
        "browse_decision": "none,exclude",
        "browse_max_learnability": "0.25",
        "browse_per_page": "16",
        "browse_top_start": "2",
        "browse_bottom_start": "5",
    }
    reloaded = _open(dict(at.query_params), page="browse")  # a reload: a new session from the same URL
    assert _browse_view(reloaded) == _browse_view(at)
    assert reloaded.query_params == at.query_params

    at.text_input(key="browse_text").input("").run()  # cleared: out of the URL, and back to the first pages
    _ok(at)
    assert "browse_text" not in at.query_params and "browse_top_start" not in at.query_params
    assert at.query_params["browse_label"] == '["retina"]'


def test_hand_edited_browse_values_are_ignored(tiny_workspace):
    bad = {
        "browse_decision": "maybe",
        "browse_label": '["no such label"]',  # valid JSON, but not a label of this pool
        "browse_planted": "mismatch",  # a demo filter: this pool has no ground truth
        "browse_min_score": "nan",
        "browse_max_alignment": "abc",
        "browse_per_page": "13",
        "browse_top_start": "0",
        "browse_bottom_start": "-3",
    }
    at = _open(bad, page="browse")
    default = _open(page="browse")
    assert _browse_view(at) == _browse_view(default)
    assert _view(at) == _view(default)
    assert _browse_params(at) == {}  # the URL now shows the valid view

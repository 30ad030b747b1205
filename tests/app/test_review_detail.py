"""The detail view's source-resolution image with DICOM window/level, and the Browse page's review queue,
under AppTest on the tiny real workspace (and on pydicom's real CT / MR test files)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut
from streamlit.testing.v1 import AppTest

from app.details import WHY
from chips_core.curation import selection
from chips_core.workspace import store
from tests.app.workspace_build import POOL

pytestmark = pytest.mark.app

MAIN = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _figure_image(at: AppTest, key: str) -> np.ndarray:
    """The pixels of the image inside the plotly figure with element key `key`."""
    chart = next(c for c in at.get("plotly_chart") if key in c.proto.id)
    source = json.loads(chart.proto.spec)["data"][0]["source"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))))


def _viewer_app(path: str) -> AppTest:
    def app(path: str) -> None:
        from app import image_view

        image_view.source_image(path, key="t")

    at = AppTest.from_function(app, args=(path,), default_timeout=60)
    at.run()
    _ok(at)
    return at


def test_detail_view_shows_the_image_at_source_resolution(tiny_workspace):
    at = AppTest.from_file(MAIN, default_timeout=180)
    at.switch_page("views/browse.py").run()
    why = next(b for b in at.button if b.key and b.key.startswith("top-why-"))
    pid = int(why.key.removeprefix("top-why-"))
    why.click().run()
    _ok(at)
    path = next(c.value.strip("`") for c in at.caption if c.value.startswith("`") and c.value.endswith("`"))
    shown = _figure_image(at, f"detail-{pid}-figure")
    source = np.asarray(Image.open(path).convert("RGB"))
    assert shown.shape == source.shape == (64, 64, 3)  # the 64-px source, not a thumbnail
    assert np.array_equal(shown, source)
    assert any("Source 64 × 64 px, shown at full resolution" in c.value for c in at.caption)
    assert not any("Window at ingest" in m.value for m in at.markdown)  # not a DICOM image


def test_dicom_window_level_is_shown_and_can_be_changed():
    ct = get_testdata_file("CT_small.dcm")
    at = _viewer_app(ct)
    note = next(m.value for m in at.markdown if "Window at ingest" in m.value)
    ds = pydicom.dcmread(ct)
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    c, w = (hu.min() + hu.max()) / 2 + 0.5, hu.max() - hu.min() + 1
    assert f"centre {c:g} HU, width {w:g} HU" in note and "full range" in note
    assert any("Source 128 × 128 px" in x.value for x in at.caption)

    at.selectbox(key="t-window").set_value("Lung").run()
    _ok(at)
    assert any("Shown with centre -600 HU, width 1500 HU" in x.value for x in at.caption)
    lung = np.clip(np.rint(((hu - (-600 - 0.5)) / (1500 - 1) + 0.5) * 255), 0, 255)  # DICOM linear window
    assert np.array_equal(_figure_image(at, "t-figure")[..., 0], lung.astype(np.uint8))

    at.selectbox(key="t-window").set_value("Custom").run()
    at.number_input(key="t-center").set_value(0.0).run()
    at.number_input(key="t-width").set_value(101.0).run()
    _ok(at)
    custom = np.clip(np.rint(((hu + 0.5) / 100 + 0.5) * 255), 0, 255)
    assert np.array_equal(_figure_image(at, "t-figure")[..., 0], custom.astype(np.uint8))

    mr = _viewer_app(get_testdata_file("MR_small.dcm"))
    note = next(m.value for m in mr.markdown if "Window at ingest" in m.value)
    assert "centre 600, width 1600, from the file's tags" in note
    assert "Lung" not in mr.selectbox(key="t-window").options  # CT presets only for CT


def test_review_queue_walks_the_cut_off_and_include_advances(tiny_workspace):
    at = AppTest.from_file(MAIN, default_timeout=180)
    at.run()
    ranking = next(df.value for df in at.dataframe if {"rank", "caption"} <= set(df.value.columns))
    by_rank = ranking.set_index("rank")["pair_id"]
    cutoff = int(ranking.loc[ranking["selected"], "rank"].max())
    assert cutoff == 15  # ceil(0.3 · 48)
    at.switch_page("views/browse.py").run()
    _ok(at)
    assert not any("in the queue" in s.value for s in at.subheader)  # runs only when its tab is open
    at.session_state["browse_tab"] = "Review queue"  # the tab, as a click on it (bound to the URL)
    at.run()
    _ok(at)
    assert any("Pair 1 of 48 in the queue — rank 15" in s.value for s in at.subheader)
    assert any("1 rank above the cut-off: selected" in m.value for m in at.markdown)
    comps = next(t.value for t in at.table if "meaning" in t.value.columns)  # a static table: text wraps
    assert comps["meaning"].to_dict() == WHY  # every meaning in full
    assert at.button(key="review-include").proto.shortcut.upper() == "I"  # Streamlit's own shortcut

    at.button(key="review-include").click().run()
    _ok(at)
    dec = selection.current_decisions(store.Workspace(tiny_workspace), POOL).set_index("pair_id")
    assert dec.loc[int(by_rank[15]), "state"] == "include"  # recorded at once
    assert any("Pair 2 of 48 in the queue — rank 16" in s.value for s in at.subheader)
    assert any("1 rank below the cut-off: left out" in m.value for m in at.markdown)
    assert at.query_params["review_pos"] == "2"

    at.button(key="review-exclude").click().run()  # rank 16 excluded, on to rank 14
    assert any("rank 14" in s.value for s in at.subheader)
    at.button(key="review-back").click().run()  # back to the pair shown before
    assert any("Pair 2 of 48 in the queue — rank 16" in s.value for s in at.subheader)
    assert any("excluded" in m.value for m in at.markdown)

    at.checkbox(key="review_skip").check().run()  # skip decided: from rank 16, Next passes nothing yet
    at.button(key="review-back").click().run()  # the trail leads back to rank 15
    assert any("rank 15" in s.value for s in at.subheader)
    at.button(key="review-next").click().run()  # rank 16 is decided: skipped
    assert any("Pair 3 of 48 in the queue — rank 14" in s.value for s in at.subheader)
    assert at.query_params["review_pos"] == "3" and at.query_params["review_skip"] == "true"

    fresh = AppTest.from_file(MAIN, default_timeout=180)  # a reload: a new session from the same URL
    fresh.query_params.update({"review_pos": "3", "review_skip": "true", "browse_tab": "Review queue"})
    fresh.switch_page("views/browse.py").run()
    _ok(fresh)
    assert any("Pair 3 of 48 in the queue — rank 14" in s.value for s in fresh.subheader)
    assert fresh.checkbox(key="review_skip").value

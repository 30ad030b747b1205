"""Every dashboard page under streamlit.testing.v1.AppTest, on a tiny real workspace (no mocks)."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.proto.PlotlyChart_pb2 import PlotlyChart
from streamlit.testing.v1 import AppTest

from app.details import WHY
from chips_core.curation import gallery, selection
from chips_core.scoring.cache import ScoringCache
from chips_core.scoring.params import RankParams
from chips_core.scoring.ranking import eval_contributions
from chips_core.workspace import jobs, store
from tests.app.workspace_build import EVAL, POOL

pytestmark = pytest.mark.app

MAIN = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


def _app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=180)
    at.run()
    if page:
        at.switch_page(f"views/{page}.py").run()
    _ok(at)
    return at


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _ranking(at: AppTest) -> pd.DataFrame:
    return next(df.value for df in at.dataframe if {"rank", "caption"} <= set(df.value.columns))


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_scores_sliders_rerank_without_a_model(tiny_workspace):
    from chips_core.scoring.ranking import rank

    at = _app()
    assert at.title[0].value == "Scores"
    before = _ranking(at)["pair_id"].tolist()
    cache = _only_cache(tiny_workspace)
    k = at.session_state["k"]
    C = (0.3 * cache.phi_pos[:k, :k] + 0.7 * cache.phi_neg[:k, :k]) / k
    assert _metric(at, "λ") == format(0.1 * np.trace(C), ".3g")  # the default λ: 0.1 · tr C̃
    assert _metric(at, "Selected") == "15"  # ceil(0.3 · 48)
    assert "visual, text" in at.caption[0].value  # the cache's parameter blocks are named

    at.selectbox(key="preset").set_value("paper").run()  # the literal preset: λ* with d(λ*) = k/4
    _ok(at)
    assert _metric(at, "d(λ)/k") == "0.250"
    assert at.session_state["blocks"] == ["visual", "text", "temperature"]
    assert not at.session_state["guard_on"]
    assert any("No scoring cache" in w.value for w in at.warning)  # this workspace has no such cache yet
    at.selectbox(key="preset").set_value("default").run()
    assert not any("No scoring cache" in w.value for w in at.warning)
    assert _ranking(at)["pair_id"].tolist() == before

    assert at.session_state["agreement"] == 0.75  # the default preset's
    at.slider(key="agreement").set_value(0.0).run()  # the agreement weight re-ranks: the library's order
    _ok(at)
    ranked = rank(cache, RankParams(k=k, agreement=0.0)).frame.sort_values("rank")
    assert _ranking(at)["pair_id"].tolist() == ranked["pair_id"].astype(str).tolist() != before
    assert at.session_state["clipscore_weight"] == 0.25  # the default preset's
    at.slider(key="clipscore_weight").set_value(0.2).run()  # the CLIPScore weight re-ranks likewise
    _ok(at)
    ranked = rank(cache, RankParams(k=k, agreement=0.0, clipscore_weight=0.2)).frame.sort_values("rank")
    assert _ranking(at)["pair_id"].tolist() == ranked["pair_id"].astype(str).tolist() != before
    at.selectbox(key="preset").set_value("paper").run()
    assert at.session_state["agreement"] == 0.0  # the paper's literal score has no agreement weight
    assert at.session_state["clipscore_weight"] == 0.0  # nor a CLIPScore weight
    at.selectbox(key="preset").set_value("default").run()
    assert _ranking(at)["pair_id"].tolist() == before

    at.slider(key="alpha").set_value(0.0).run()
    _ok(at)
    after_alpha = _ranking(at)["pair_id"].tolist()
    assert after_alpha != before and sorted(after_alpha) == sorted(before)

    at.select_slider(key="lam_factor").set_value(100.0).run()
    assert float(_metric(at, "d(λ)/k")) < 0.25  # more regularisation, fewer effective directions

    at.slider(key="ratio").set_value(0.5).run()
    assert _metric(at, "Selected") == "24"
    assert int(_ranking(at)["selected"].sum()) == 24

    at.selectbox(key="method").set_value("clipscore").run()
    _ok(at)
    ranking = _ranking(at)
    assert (np.diff(ranking["score"].to_numpy()) <= 0).all()  # best first


def _only_cache(ws_root: Path) -> ScoringCache:
    with store.Workspace(ws_root).connect(read_only=True) as con:
        row = con.execute("SELECT dir FROM scoring_caches WHERE status = 'done'").fetchone()
    return ScoringCache.load(row[0])


def test_browse_decisions_persist_across_sessions(tiny_workspace):
    at = _app("browse")
    assert at.title[0].value == "Browse"
    bottom = [b for b in at.button if b.key and b.key.startswith("bottom-exc-")]
    assert bottom, "the bottom gallery shows exclude buttons"
    pid = int(bottom[0].key.removeprefix("bottom-exc-"))  # ids can be negative: "bottom-exc--42"
    bottom[0].click().run()
    _ok(at)
    ws = store.Workspace(tiny_workspace)
    dec = selection.current_decisions(ws, POOL).set_index("pair_id")
    assert dec.loc[pid, "state"] == "exclude"

    fresh = _app("browse")  # a new session (a browser reload) sees the decision from the workspace
    assert fresh.button(key=f"bottom-exc-{pid}").disabled
    scores = _app()
    ranking = _ranking(scores).set_index("pair_id")
    assert pid not in ranking.index or ranking.loc[pid, "decision"] == "exclude"


def test_browse_detail_view_explains_and_keeps_a_note(tiny_workspace):
    at = _app("browse")
    why = next(b for b in at.button if b.key and b.key.startswith("top-why-"))
    pid = int(why.key.removeprefix("top-why-"))
    why.click().run()
    _ok(at)
    assert any(f"Pair {pid}" in s.value for s in at.subheader)
    comps = _components(at)
    assert list(comps.index) == ["alignment", "learnability", "relevance", "agreement", "score"]
    assert comps["meaning"].to_dict() == WHY  # each meaning whole, in a table whose text wraps
    # plain words in the table; the formulas only in the engineers' expander
    assert not any(sym in text for text in comps["meaning"] for sym in ("Â", "w_L", "σ", "Φ", "M⁻¹"))
    formulas = next(e for e in at.expander if e.label == "For ML engineers: the formulas")
    assert "w_L = (1 − p_corr)" in formulas.markdown[0].value
    _check_eval_contributions(at, tiny_workspace, pid, float(comps.loc["alignment", "value"]))
    at.session_state["lam_factor"] = 100.0  # the Scores page's λ reaches the detail view's solve
    at.run()
    _ok(at)
    comps = _components(at)
    _check_eval_contributions(at, tiny_workspace, pid, float(comps.loc["alignment", "value"]))
    at.text_area(key=f"note-{pid}").input("caption names the wrong eye")
    at.button(key="FormSubmitter:detail_note-Save note").click().run()
    _ok(at)
    dec = selection.current_decisions(store.Workspace(tiny_workspace), POOL).set_index("pair_id")
    assert dec.loc[pid, "note"] == "caption names the wrong eye"


def _components(at: AppTest) -> pd.DataFrame:
    """The detail view's table of a pair's components and their meaning."""
    return next(t.value for t in at.table if "meaning" in t.value.columns)


def _check_eval_contributions(at: AppTest, ws_root: Path, pid: int, alignment: float) -> None:
    """The detail view lists the eval pairs the pair helps/hurts most, as the library computes them."""
    shown = next(df.value for df in at.dataframe if "contribution" in df.value.columns)
    ws = store.Workspace(ws_root)
    with ws.connect(read_only=True) as con:
        cache_dir = con.execute("SELECT dir FROM scoring_caches WHERE status = 'done'").fetchone()[0]
        evals = con.execute(
            "SELECT pair_id, caption FROM pairs JOIN pools USING (pool_id) WHERE pools.name = ?", [EVAL]
        ).df()
    cache, alpha, k = ScoringCache.load(cache_dir), float(at.session_state["alpha"]), at.session_state["k"]
    lam = (
        eval_contributions(cache, pid, RankParams(alpha=alpha, k=k)).attrs["lam_base"]
        * at.session_state["lam_factor"]
    )
    full = eval_contributions(cache, pid, RankParams(alpha=alpha, lam=lam, k=k), top=None)
    assert full["contribution"].sum() == pytest.approx(alignment, rel=1e-2, abs=1e-6)  # they sum to Â
    expect = full.iloc[[0, 1, 2, 3, 4, -5, -4, -3, -2, -1]]
    assert shown["eval_pair_id"].tolist() == expect["eval_pair_id"].tolist()
    assert np.allclose(shown["contribution"], expect["contribution"])
    captions = evals.set_index("pair_id")["caption"]
    assert shown["caption"].tolist() == captions.loc[shown["eval_pair_id"]].tolist()
    texts = " ".join(m.value for m in at.markdown)
    assert "Helps most" in texts and "Hurts most" in texts
    helps = shown[shown["contribution"] > 0]
    assert len(helps) and all(c in texts for c in helps["caption"])
    listed = pd.concat([helps.head(5), shown[shown["contribution"] < 0].tail(5)])["eval_pair_id"]
    assert all(gallery.thumbnail_path(ws, int(e), 160).exists() for e in listed)  # thumbnails drawn


def test_map_draws_webgl_points_for_every_pair(tiny_workspace):
    at = _app("map")
    assert at.title[0].value == "Map"
    chart = at.get("plotly_chart")[0]
    import json

    spec = json.loads(chart.proto.spec)
    trace = spec["data"][0]
    assert trace["type"] == "scattergl" and len(trace["customdata"]) == 48
    modes = {PlotlyChart.SelectionMode.Name(m) for m in chart.proto.selection_mode}
    assert modes == {"POINTS", "BOX", "LASSO"}  # a click, a box and a lasso all pick pairs
    # a hover names the pair: its rank and its caption (read back from the workspace's pairs table), and
    # says that a click shows its image
    captions = _captions(tiny_workspace)
    for pid, text in list(zip(trace["customdata"], trace["text"], strict=True))[:5]:
        rank_part, caption_part, hint = text.split("<br>")
        caption = captions[int(pid)]
        want = caption if len(caption) <= 80 else caption[:79] + "…"
        assert rank_part.startswith("rank ") and caption_part == html.escape(want)
        assert hint == "<i>click to see its image</i>"
    assert "click a point to see its pair" in at.info[0].value
    at.selectbox(key="map_colour").set_value("decision").run()
    _ok(at)
    at.radio(key="map_space").set_value("text").run()
    _ok(at)
    assert at.info and "Nothing selected" in at.info[0].value


def _captions(ws_root: Path) -> dict[int, str]:
    with store.Workspace(ws_root).connect(read_only=True) as con:
        return dict(con.execute("SELECT pair_id, caption FROM pairs").fetchall())


def _pick(at: AppTest, points: list[int]) -> None:
    """Pick map dots as a click (one) or a lasso (several) does: set the chart's selection state."""
    import json

    trace = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]
    at.session_state["map_chart"] = {
        "selection": {
            "points": [
                {"curve_number": 0, "point_number": i, "point_index": i, "customdata": trace["customdata"][i]}
                for i in points
            ],
            "point_indices": points,
            "box": [],
            "lasso": [],
        }
    }
    at.run()
    _ok(at)


def test_a_click_on_the_map_shows_that_pair_in_full(tiny_workspace):
    """One dot picked: its card, large, with the thumbnail, the whole caption and the scores in plain words,
    as the library ranks the pair; several picked: the bulk decisions and a grid."""
    import json

    from chips_core.scoring.ranking import rank

    at = _app("map")
    ids = [int(p) for p in json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["customdata"]]
    captions = _captions(tiny_workspace)
    i = max(range(len(ids)), key=lambda j: len(captions[ids[j]]))  # the longest caption
    pid = ids[i]
    _pick(at, [i])
    assert [s.value for s in at.subheader] == ["The pair you picked"]
    assert not any(b.key in ("map_inc", "map_exc", "map_clr") for b in at.button)
    assert at.button(key=f"map-inc-{pid}") and at.button(key=f"map-exc-{pid}")  # the card's own buttons
    assert at.get("image") and gallery.thumbnail_path(store.Workspace(tiny_workspace), pid, 160).exists()
    card = " ".join(m.value for m in at.markdown)
    assert captions[pid] in card
    row = rank(_only_cache(tiny_workspace), RankParams(k=at.session_state["k"])).frame.set_index("pair_id")
    for column, words in [("alignment", "expected help for the target set"), ("score", "overall score")]:
        assert f"- {words}: **{row.loc[pid, column]:.3g}**" in card

    at.button(key=f"map-why-{pid}").click().run()  # Details: the detail view, which lives on Browse
    _ok(at)
    assert [s.value for s in at.subheader][0].startswith(f"Pair {pid} — rank ")
    at.button(key="detail_close").click().run()
    at.switch_page("views/map.py").run()
    _pick(at, [i, (i + 1) % len(ids)])  # a lasso around two dots
    assert [s.value for s in at.subheader] == ["2 selected pairs"]
    assert at.button(key="map_inc").label == "Include all 2"


def test_map_draws_a_fixed_sample_with_every_decided_pair(tiny_workspace, monkeypatch):
    from chips_core.curation import maps

    monkeypatch.setattr(maps, "DRAW_POINTS", 20)  # the tiny pool stands in for a pool of 100k pairs
    ws = store.Workspace(tiny_workspace)
    with ws.connect(read_only=True) as con:
        sql = "SELECT pair_id FROM pairs JOIN pools USING (pool_id) WHERE name = ? ORDER BY pair_id"
        ids = [r[0] for r in con.execute(sql, [POOL]).fetchall()]
    decided = ids[-3:]
    selection.record_decisions(ws, POOL, decided[:2], "include")
    selection.record_decisions(ws, POOL, decided[2:], "exclude")
    at = _app("map")
    import json

    drawn = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["customdata"]
    assert len(drawn) == len(set(drawn)) == 20 and set(map(str, decided)) <= set(drawn)
    assert any("it shows 20 of these 48 dots" in c.value for c in at.caption)
    at.selectbox(key="map_colour").set_value("decision").run()
    _ok(at)
    again = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]
    assert again["customdata"] == drawn  # the same dots, coloured by decision
    colours = dict(zip(again["customdata"], again["marker"]["color"], strict=True))
    assert [colours[str(p)] for p in decided] == ["#2e7d32", "#2e7d32", "#c62828"]


def test_export_saves_versions_diffs_and_writes_the_file(tiny_workspace):
    at = _app("export")
    at.text_input(key="sel_name").input("first")
    at.button(key="FormSubmitter:save_selection-Save selection").click().run()
    _ok(at)
    assert "Saved first v1" in at.success[0].value
    at.switch_page("views/scores.py").run()
    at.slider(key="ratio").set_value(0.5).run()
    at.switch_page("views/export.py").run()
    at.text_input(key="sel_name").input("first")
    at.button(key="FormSubmitter:save_selection-Save selection").click().run()
    assert "Saved first v2: 24 pairs" in at.success[0].value
    ws = store.Workspace(tiny_workspace)
    sels = selection.list_selections(ws)
    assert sorted(sels["version"]) == [1, 2]
    at.selectbox(key="diff_a").set_value(int(sels["selection_id"].max())).run()
    at.selectbox(key="diff_b").set_value(int(sels["selection_id"].min())).run()
    assert any("15 in both, 9 only in the first, 0 only in the second" in m.value for m in at.markdown)

    at.selectbox(key="export_fmt").set_value("csv").run()
    out = tiny_workspace / "exports" / "first-v2.csv"
    assert at.text_input(key=f"export_out_{sels['selection_id'].max()}_csv").value == str(out)
    at.button(key="export_go").click().run()
    _ok(at)
    df = pd.read_csv(out)
    assert len(df) == 24 and {"filepath", "title"} <= set(df.columns)
    assert all(Path(p).is_file() for p in df["filepath"])
    assert at.get("download_button")


def test_workspace_page_creates_a_workspace_and_ingests_in_a_background_job(tiny_workspace, tmp_path):
    at = _app("workspace")
    assert at.title[0].value == "Workspace"
    new = tmp_path / "fresh-ws"
    at.text_input(key="ws_new_path").input(str(new)).run()
    at.button(key="ws_create").click().run()
    _ok(at)
    assert (new / "chips.duckdb").exists() and at.session_state["ws_path"] == str(new.resolve())
    assert any("No pool yet" in i.value for i in at.info)

    from tests.fixtures_build import make_csv_pool

    manifest = make_csv_pool(tmp_path / "src", n=6)
    at.text_input(key="ing_name").input("uploaded")
    at.text_input(key="ing_source").input(str(manifest))
    at.button(key="FormSubmitter:ingest_form-Ingest").click().run()
    _ok(at)
    assert "background job" in at.success[0].value
    ws = store.Workspace(new)
    job = jobs.list_jobs(ws)[0]
    assert jobs.wait(ws, job.job_id, timeout_s=120).status == "done", jobs.read_log(ws, job.job_id)
    at.run()
    pools = next(df.value for df in at.dataframe if "rejected" in df.value.columns)
    assert pools.loc[0, "name"] == "uploaded" and pools.loc[0, "pairs"] > 0
    listed = next(df.value for df in at.dataframe if "what it does" in df.value.columns)
    assert listed.loc[0, "what it does"] == "adding pairs to the workspace"  # the job in plain words
    assert "encoding utf-8 (detected)" in jobs.read_log(ws, job.job_id)  # the form sent --encoding auto


def test_workspace_page_prepares_the_parameter_blocks_chosen(tiny_workspace):
    at = _app("workspace")
    at.multiselect(key="prep_blocks").select("temperature")
    at.button(key="FormSubmitter:prepare_form-Prepare").click().run()
    _ok(at)
    ws = store.Workspace(tiny_workspace)
    job = jobs.list_jobs(ws)[0]
    assert jobs.wait(ws, job.job_id, timeout_s=300).status == "done", jobs.read_log(ws, job.job_id)
    with ws.connect(read_only=True) as con:
        rows = con.execute("SELECT config->>'blocks' FROM scoring_caches WHERE status = 'done'").fetchall()
    assert ("visual,text,temperature",) in rows


def test_browse_marks_pairs_the_guard_held_out(tiny_workspace):
    """Guarded pairs rank last; the Bottom tab shows each of them with its 'held out' badge."""
    from chips_core.scoring.ranking import rank

    at = _app("browse")
    at.session_state["guard_mads"] = 0.5  # a strict guard, so that this tiny pool has guarded pairs
    at.run()
    _ok(at)
    frame = rank(_only_cache(tiny_workspace), RankParams(k=at.session_state["k"], guard_mads=0.5)).frame
    bottom = frame.sort_values("rank").tail(12)
    n_guarded = int(bottom["guarded"].sum())
    assert n_guarded > 0
    bottom_tab = next(t for t in at.tabs if t.label == "Bottom ranked")
    assert sum("held out" in m.value for m in bottom_tab.markdown) == n_guarded


def test_score_histograms_say_what_they_show(tiny_workspace):
    """Each histogram on Scores has a plain-language title and named axes (component, number of pairs), and
    its bars count every pair of the ranking once: the library's bins, selected and not (inline SVG)."""
    import re

    from chips_core.scoring.ranking import rank

    at = _app()
    _ok(at)
    drawn = next(m.value for m in at.markdown if 'class="chips-histograms"' in m.value)
    assert not at.get("plotly_chart")  # no chart library for them
    figures = re.findall(r'<figure class="chips-hist" data-column="([a-z]+)" data-counts="([0-9,;]+)"', drawn)
    assert [c for c, _ in figures] == ["alignment", "learnability", "relevance", "agreement", "score"]
    titles = re.findall(r"<figcaption[^>]*>([^<]+)</figcaption>", drawn)
    assert titles[0] == "expected help for the target set" and "overall score" in titles[4]
    assert "how well the caption fits the image" in titles[3]
    assert re.findall(
        r'text-anchor="middle">([a-z]+)</text><text transform="[^"]+" text-anchor="middle">pairs<', drawn
    ) == [c for c, _ in figures]  # x axis: the component; y axis: pairs
    result = rank(_only_cache(tiny_workspace), RankParams(k=at.session_state["k"]))
    hists = selection.histograms(result.frame, [c for c, _ in figures])
    for column, counts in figures:
        sel, other = (np.array(part.split(","), int) for part in counts.split(";"))
        assert sel.sum() + other.sum() == len(_ranking(at)) == len(result.frame)
        assert np.array_equal(sel, hists[column].selected) and np.array_equal(
            other, hists[column].not_selected
        )
        assert sel.sum() == int(result.frame["selected"].sum())
    labels = re.findall(r'role="img" aria-label="([^"]+)"', drawn)  # a screen reader's summary per chart
    n, n_sel = len(result.frame), int(result.frame["selected"].sum())
    assert all(f"histogram of {n:,} pairs, {n_sel:,} of them selected" in label for label in labels)
    assert len(labels) == 5 and labels[0].startswith("expected help for the target set: ")
    assert drawn.count("<rect") == sum(
        int((h.selected > 0).sum() + (h.not_selected > 0).sum()) for h in hists.values()
    )  # one bar segment per non-empty (bin, selected or not)


def test_scores_controls_speak_plain_words(tiny_workspace):
    """The Scores page's controls and their tooltips are in plain words; the formulas live only in the
    expander for ML engineers."""
    at = _app()
    _ok(at)
    formula = ("Φ", "M =", "M̃", "w_L", "w_R", "Â", "d(λ*)")
    controls = [*at.slider, *at.select_slider, *at.selectbox, *at.checkbox, *at.toggle]
    for w in controls:
        text = f"{w.label} {w.help or ''}"
        assert not any(sym in text for sym in formula), text
    for w in [*at.slider, *at.select_slider]:
        assert w.help, w.label  # every slider says what it does
    ml = next(e for e in at.expander if "for ML engineers" in e.label)
    assert any("M = (1 − α)Φ_pos + αΦ_neg + λI" in m.value for m in ml.markdown)
    # the figures: plain words in the tiles; λ and d(λ)/k only in the expander
    in_ml = {m.label for m in ml.metric}
    assert {"λ", "d(λ)/k"} <= in_ml
    tiles = [m for m in at.metric if m.label not in in_ml]
    assert [m.label for m in tiles] == ["Selected", "Expected to help", "Ranking stability"]
    for m in tiles:
        assert m.help and not any(j in f"{m.label} {m.help}" for j in JARGON + FORMULA), m.label
    method = next(w for w in at.selectbox if w.label == "Method")
    assert "recommended" in method.help and "prefer it when you only want clean captions" in method.help


# ML jargon and formula symbols that belong only in the "For ML engineers" expanders
JARGON = ("λ", "Φ", "Â", "w_L", "w_R", "M̃", "JL", "sketch", "logit_scale", "UMAP", "InfoNCE", "k_max")
JARGON += ("AdamW",)
FORMULA = ("Â", "M̃", "λ*", "g̃", "d(λ", "Spearman")  # and formula pieces
WIDGETS = ("button", "checkbox", "multiselect", "number_input", "radio", "select_slider", "selectbox")
WIDGETS += ("slider", "text_area", "text_input", "toggle")


def _words(node) -> list[str]:
    """Every widget's label, help and shown options, and every caption, under an element-tree node."""
    out = [f"{w.label} {getattr(w, 'help', None) or ''}" for kind in WIDGETS for w in node.get(kind)]
    out += [" ".join(map(str, w.options)) for kind in ("radio", "selectbox") for w in node.get(kind)]
    return out + [c.value for c in node.get("caption")]


def _plain_outside_ml(at: AppTest) -> list[str]:
    """The page's words outside the ML engineers' expanders; asserts none of them carries jargon."""
    ml = {t for e in at.expander if "For ML engineers" in e.label for t in _words(e)}
    outside = [t for t in _words(at.main) if t not in ml]
    for text in outside:
        assert not any(j in text for j in JARGON), text
    return outside


def _ml_text(at: AppTest, label: str) -> str:
    e = next(e for e in at.expander if e.label == f"For ML engineers: {label}")
    return " ".join(m.value for m in e.markdown) + " " + " ".join(_words(e))


def _shown_outside_ml(at: AppTest) -> list[str]:
    """Every text the page shows outside the ML engineers' expanders: widgets, captions, markdown, metric
    tiles and table cells."""

    def shown(node) -> list[str]:
        out = _words(node) + [m.value for m in node.get("markdown")]
        out += [f"{m.label} {m.proto.help}" for m in node.get("metric")]
        return out + [str(v) for t in node.get("table") for v in t.value.to_numpy().ravel()]

    ml = {t for e in at.expander if "For ML engineers" in e.label for t in shown(e)}
    return [t for t in shown(at.main) if t not in ml]


def test_browse_and_detail_view_speak_plain_words(tiny_workspace):
    """The Browse page's cards name the components in plain short words, and the detail view shows no
    formula outside its engineers' expander (where the per-eval-pair split's formula is)."""
    import re

    at = _app("browse")
    cards = [c.value for c in at.caption if c.value.startswith("helps ")]
    assert cards and all(" · learnable " in c and " · fits " in c for c in cards)
    for text in _shown_outside_ml(at):
        assert not re.search(r"\b(align|learn|relev|agree)\b", text), text  # no cut-off names
    why = next(b for b in at.button if b.key and b.key.startswith("top-why-"))
    why.click().run()
    _ok(at)
    for text in _shown_outside_ml(at):
        assert not any(f in text for f in FORMULA + JARGON), text
    assert any("of its expected help)" in m.value for m in at.markdown)  # an eval pair's share, in words
    assert "Â = g̃·M̃⁻¹ũ" in _ml_text(at, "the formulas")


def test_workspace_page_speaks_plain_words(tiny_workspace):
    at = _app("workspace")
    words = " ".join(_plain_outside_ml(at))
    assert [t.label for t in at.tabs] == ["1. Add a pool or eval set", "2. Featurize", "3. Prepare scoring"]
    assert "the model looks at every image and caption once" in words  # what featurize does for them
    assert "every control on the Scores page answers at once and the Map page opens at once" in words
    for label in ("Model", "Trained weights (optional)", "Device", "Pool", "Eval set", "Name"):
        assert any(w.label == label and w.help for kind in WIDGETS for w in at.get(kind)), label
    ml = _ml_text(at, "how the estimate is computed")
    assert "k_max (sketch rows)" in ml and "InfoNCE batch size" in ml and "Φ_pos" in ml


def test_map_page_speaks_plain_words(tiny_workspace):
    at = _app("map")
    words = " ".join(_plain_outside_ml(at))
    assert "Each dot is one pair" in words and "look alike sit close together" in words
    assert at.radio(key="map_space").label == "Place pairs by"
    assert at.radio(key="map_space").options == ["what the images look like", "what the captions say"]
    colour = at.selectbox(key="map_colour")
    assert colour.label == "Colour by" and "yellow high, dark purple low" in colour.help
    assert "expected help for the target set" in colour.options
    assert any("yellow is high, dark purple low" in c.value for c in at.caption)  # what the colours mean
    colour.set_value("decision").run()
    _ok(at)
    assert any("no decision (the score decides)" in c.value for c in at.caption)  # the legend's words
    assert "UMAP (cosine metric" in _ml_text(at, "how the map is made")


def test_export_and_train_speak_plain_words(tiny_workspace):
    at = _app("export")
    at.button(key="FormSubmitter:save_selection-Save selection").click().run()  # the train form needs one
    _ok(at)
    words = " ".join(_plain_outside_ml(at))
    assert "the selection ratio: the share of pairs kept for training, 15 of 48 pairs" in words
    assert "k None" not in words
    ml = _ml_text(at, "the ranking parameters saved with it")
    assert f"k {at.session_state['k']}," in ml and "λ" in ml
    assert "AdamW" in _ml_text(at, "the training recipe")
    for key in ("export_fmt", "train_sel", "diff_a", "diff_b"):
        assert at.selectbox(key=key).help, key
    for key in ("train_epochs", "train_lr", "train_batch"):
        assert at.number_input(key=key).help, key
    assert any(s.value.startswith("Train the model on a selection") for s in at.subheader)

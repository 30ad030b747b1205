"""Map: UMAP of the pool's image and text embeddings (WebGL); a click → that pair, a lasso → those pairs
with bulk decisions.

The map is cached per feature run in the workspace (chips_core.curation.maps); the prepare job computes it
once the scoring cache is written. When it is missing, the page follows a running prepare of the pool, else
runs `chips map` as a background job, shows its progress, and draws the map once the job is done. Of a map
of more than maps.DRAW_POINTS pairs it draws every decided pair and a fixed sample of the others.
"""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app import context, jobs_view, url_state, widgets
from chips_core.curation import maps
from chips_core.features.featurize import FeatureStore

GREEN, RED, GREY = ("#2e7d32", "green"), ("#c62828", "red"), ("#b0bec5", "gray")  # (plotly, st markdown)
HOVER_HINT = "click to see its image"

ws = context.workspace()
ctx = context.scoring_context(ws)
st.title("Map")
fmap = maps.current_map(ws, ctx.pool_run_id, FeatureStore(ws, ctx.pool_run_id))
if fmap is None:
    st.caption(
        f"The map of **{ctx.pool_name}** is drawn once (normally when scoring is prepared) and kept in the "
        "workspace; from then on it opens at once."
    )
    preparing = jobs_view.active_job(ws, "prepare", ctx.pool_name)
    if preparing is not None:  # a prepare job computes the pool's map once its cache is written
        jobs_view.job_progress(ws, preparing, "Preparing the scores, then the map")
        st.stop()
    argv = ["map", ctx.ws_root, ctx.pool_name, "--run", str(ctx.pool_run_id)]
    jobs_view.background_step(ws, "map", argv, "Computing the map")
table = widgets.ranking_frame(context.current_rank(ctx)).set_index("pair_id")
dec = widgets.decisions(ctx)
drawn = maps.drawn_rows(fmap, dec.index.to_numpy(np.int64))  # every decided pair, a fixed sample of the rest
ids = fmap.pair_ids[drawn]

st.caption(
    f"Each dot is one pair of **{ctx.pool_name}** "
    + (
        f"(a random sample of {len(fmap.pair_ids):,} of its {fmap.n_total:,} pairs)"
        if fmap.sampled
        else f"({fmap.n_total:,} pairs)"
    )
    + ": pairs whose images (or captions) look alike sit close together, so a cluster is often one kind of "
    "image. Click a dot to see its pair (image, caption, scores), or draw a loop around dots (lasso) to see "
    "those pairs and include or exclude them together."
    + (
        f" So that the map answers at once, it shows {len(drawn):,} of these {len(fmap.pair_ids):,} dots: "
        "every pair you decided and a fixed random choice of the others; a click or a lasso picks among the "
        "dots shown."
        if len(drawn) < len(fmap.pair_ids)
        else ""
    )
)
with st.expander("For ML engineers: how the map is made"):
    st.markdown(
        f"UMAP (cosine metric, {'seeded sample, ' if fmap.sampled else ''}feature run {ctx.pool_run_id}) of "
        "the cached pre-projection features h (image tower) and t (text tower), each L2-normalised and "
        "embedded separately: one map per tower, the same pairs (`chips map`, chips_core/curation/maps.py)."
    )

state = dec["state"].reindex(ids) if len(dec) else None
c1, c2 = st.columns([1, 1])
space = c1.radio(
    "Place pairs by",
    ["image", "text"],
    horizontal=True,
    key="map_space",
    format_func={"image": "what the images look like", "text": "what the captions say"}.get,
    help="Image: pairs with similar-looking images sit together. Text: pairs with similar captions do.",
)
planted = context.demo_planted(ctx)
colours = ["score", "alignment", "learnability", "relevance", "agreement", "selected", "decision"]
colours += ["planted (demo ground truth)"] if planted is not None else []
if st.session_state.get("map_colour") not in colours:  # e.g. a link from the demo to another workspace
    st.session_state.pop("map_colour", None)
COLOUR_LABELS = {  # what a colour means, in plain words
    **{c: words for c, (_, words) in widgets.SCORE_WORDS.items()},
    "selected": "selected by the current ranking",
    "decision": "your include / exclude decisions",
    "planted (demo ground truth)": "planted mistakes (demo ground truth)",
}
colour = c2.selectbox(
    "Colour by",
    colours,
    key="map_colour",
    format_func=COLOUR_LABELS.get,
    help="What a dot's colour shows: a score (yellow high, dark purple low), whether the pair is selected, "
    "your decision, or (in the demo) the deliberately wrong pairs.",
)

rows = table.reindex(ids)
xy = (fmap.image_xy if space == "image" else fmap.text_xy)[drawn]
marker: dict = {"size": 5, "opacity": 0.8}
if colour in widgets.COMPONENTS:
    marker.update(
        color=rows[colour].to_numpy(np.float64),
        colorscale="Viridis",
        showscale=True,
        colorbar={"title": COLOUR_LABELS[colour].replace(" ", "<br>", 2)},
    )
    st.caption(f"Colour: {COLOUR_LABELS[colour]}; yellow is high, dark purple low.")
else:
    legend: dict[str, str] = {}
    if colour == "selected":
        labels = np.where(rows["selected"].fillna(False).to_numpy(bool), "selected", "not selected")
        palette = {"selected": GREEN, "not selected": GREY}
    elif colour == "decision":
        labels = state.fillna("none").to_numpy() if state is not None else np.full(len(rows), "none")
        palette = {"include": GREEN, "exclude": RED, "none": GREY}
        legend = {"include": "included", "exclude": "excluded", "none": "no decision (the score decides)"}
    else:  # the demo's planted mistakes: does the ranking push them down?
        labels = planted.reindex(ids).fillna("none").to_numpy()
        palette = {"mismatch": RED, "off_domain": ("#f9a825", "orange"), "none": GREY}
        legend = {"mismatch": "caption does not match the image", "off_domain": "outside the target domain",
                  "none": "no planted mistake"}  # fmt: skip
    marker.update(color=[palette[str(v)][0] for v in labels])
    st.caption(" · ".join(f":{c}[●] {legend.get(name, name)}" for name, (_, c) in palette.items()))
captions = context.pool_pairs(ctx)["caption"].reindex(ids).fillna("").astype(str)
short = captions.where(captions.str.len() <= 80, captions.str.slice(0, 79) + "…")
# what a hover shows: the rank, the caption (escaped: captions are data, not markup) and that a click shows
# the image (a hover label cannot hold one, and a thumbnail per dot would not fit in the page)
hover = (
    rows["rank"].astype("Int64").astype(str).radd("rank ").to_numpy()
    + "<br>"
    + short.map(html.escape).to_numpy()
    + "<br><i>"
    + HOVER_HINT
    + "</i>"
)
fig = go.Figure(
    go.Scattergl(
        x=xy[:, 0],
        y=xy[:, 1],
        mode="markers",
        marker=marker,
        customdata=ids.astype(str),
        text=hover,
        hovertemplate="%{text}<extra></extra>",
    )
)
fig.update_layout(
    height=560,
    margin=dict(l=10, r=10, t=10, b=10),
    dragmode="lasso",
    xaxis=dict(visible=False),
    yaxis=dict(visible=False),
)
event = st.plotly_chart(
    fig, key="map_chart", on_select="rerun", selection_mode=("points", "box", "lasso")
)  # a click picks one dot, a lasso (or box) several

points = event["selection"]["points"] if event else []  # item access: the documented PlotlyState shape
picked = [int(p["customdata"]) for p in points if "customdata" in p]
if not picked:
    url_state.write()  # before st.stop, which drops later writes to the URL
    st.info(
        "Nothing selected yet: click a point to see its pair, or drag a lasso around several (box select is "
        "in the chart's toolbar)."
    )
    st.stop()
if len(picked) == 1:  # a click: the pair itself, large, with its whole caption and its scores in plain words
    st.subheader("The pair you picked")
    widgets.gallery_grid(ctx, table.loc[picked].reset_index(), key="map", n_cols=2, full=True, elsewhere=True)
else:
    st.subheader(f"{len(picked):,} selected pairs")
    b1, b2, b3, _ = st.columns([1, 1, 1, 3])
    if b1.button(
        f"Include all {len(picked)}", key="map_inc", help="Always keep these pairs in a saved selection."
    ):
        widgets.decide(ctx, picked, "include")
    if b2.button(
        f"Exclude all {len(picked)}", key="map_exc", help="Never keep these pairs in a saved selection."
    ):
        widgets.decide(ctx, picked, "exclude")
    if b3.button("Clear decisions", key="map_clr", help="Let the score decide again for these pairs."):
        widgets.decide(ctx, picked, "clear")
    chosen = table.loc[picked].reset_index().sort_values("rank")
    st.caption("Best ranked first; the grid shows at most 24.")
    widgets.gallery_grid(ctx, chosen.head(24), key="map", elsewhere=True)

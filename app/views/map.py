"""Map: UMAP of the pool's image and text embeddings (WebGL); lasso → those pairs, bulk decisions.

The map is cached per feature run in the workspace (chips_core.curation.maps); when it is missing, the page
runs `chips map` as a background job, shows its progress, and draws the map once the job is done.
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

ws = context.workspace()
ctx = context.scoring_context(ws)
st.title("Map")
fmap = maps.current_map(ws, ctx.pool_run_id, FeatureStore(ws, ctx.pool_run_id))
if fmap is None:
    st.caption(
        f"The UMAP map of **{ctx.pool_name}** (feature run {ctx.pool_run_id}) is computed once per feature "
        "run and kept in the workspace; from then on it opens at once."
    )
    preparing = jobs_view.active_job(ws, "prepare", ctx.pool_name)
    if preparing is not None:  # a prepare job computes the pool's map once its cache is written
        jobs_view.job_progress(ws, preparing, "Preparing the scores, then the map")
        st.stop()
    argv = ["map", ctx.ws_root, ctx.pool_name, "--run", str(ctx.pool_run_id)]
    jobs_view.background_step(ws, "map", argv, "Computing the map")
table = widgets.ranking_frame(context.current_rank(ctx)).set_index("pair_id")

st.caption(
    f"UMAP of the cached image and text features of **{ctx.pool_name}** "
    + (
        f"(a seeded sample of {len(fmap.pair_ids):,} of {fmap.n_total:,} pairs). "
        if fmap.sampled
        else f"({fmap.n_total:,} pairs). "
    )
    + "Box- or lasso-select points to see those pairs and include or exclude them together."
)

dec = widgets.decisions(ctx)
state = dec["state"].reindex(fmap.pair_ids) if len(dec) else None
c1, c2 = st.columns([1, 1])
space = c1.radio("Embedding", ["image", "text"], horizontal=True, key="map_space")
planted = context.demo_planted(ctx)
colours = ["score", "alignment", "learnability", "relevance", "selected", "decision"]
colours += ["planted (demo ground truth)"] if planted is not None else []
if st.session_state.get("map_colour") not in colours:  # e.g. a link from the demo to another workspace
    st.session_state.pop("map_colour", None)
colour = c2.selectbox("Colour by", colours, key="map_colour")

rows = table.reindex(fmap.pair_ids)
xy = fmap.image_xy if space == "image" else fmap.text_xy
marker: dict = {"size": 5, "opacity": 0.8}
if colour in widgets.COMPONENTS:
    marker.update(
        color=rows[colour].to_numpy(np.float64),
        colorscale="Viridis",
        showscale=True,
        colorbar={"title": colour},
    )
else:
    if colour == "selected":
        labels = np.where(rows["selected"].fillna(False).to_numpy(bool), "selected", "not selected")
        palette = {"selected": GREEN, "not selected": GREY}
    elif colour == "decision":
        labels = state.fillna("none").to_numpy() if state is not None else np.full(len(rows), "none")
        palette = {"include": GREEN, "exclude": RED, "none": GREY}
    else:  # the demo's planted mistakes: does the ranking push them down?
        labels = planted.reindex(fmap.pair_ids).fillna("none").to_numpy()
        palette = {"mismatch": RED, "off_domain": ("#f9a825", "orange"), "none": GREY}
    marker.update(color=[palette[str(v)][0] for v in labels])
    st.caption(" · ".join(f":{c}[●] {name}" for name, (_, c) in palette.items()))
captions = context.pool_pairs(ctx)["caption"].reindex(fmap.pair_ids).fillna("").astype(str)
short = captions.where(captions.str.len() <= 80, captions.str.slice(0, 79) + "…")
hover = (  # what a hover shows: the rank and the caption (escaped: captions are data, not markup)
    rows["rank"].astype("Int64").astype(str).radd("rank ").to_numpy()
    + "<br>"
    + short.map(html.escape).to_numpy()
)
fig = go.Figure(
    go.Scattergl(
        x=xy[:, 0],
        y=xy[:, 1],
        mode="markers",
        marker=marker,
        customdata=fmap.pair_ids.astype(str),
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
event = st.plotly_chart(fig, key="map_chart", on_select="rerun", selection_mode=("box", "lasso"))

picked = [int(p["customdata"]) for p in (event.selection.points if event else []) if "customdata" in p]
if not picked:
    url_state.write()  # before st.stop, which drops later writes to the URL
    st.info("Nothing selected yet: drag a lasso (or switch to box select in the chart's toolbar).")
    st.stop()

st.subheader(f"{len(picked):,} selected pairs")
b1, b2, b3, _ = st.columns([1, 1, 1, 3])
if b1.button(f"Include all {len(picked)}", key="map_inc"):
    widgets.decide(ctx, picked, "include")
if b2.button(f"Exclude all {len(picked)}", key="map_exc"):
    widgets.decide(ctx, picked, "exclude")
if b3.button("Clear decisions", key="map_clr"):
    widgets.decide(ctx, picked, "clear")
chosen = table.loc[picked].reset_index().sort_values("rank")
st.caption("Best ranked first; the grid shows at most 24.")
widgets.gallery_grid(ctx, chosen.head(24), key="map")

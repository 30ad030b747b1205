"""Browse: top-, bottom- and random-ranked galleries; a detail view says why a pair ranks where it does."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import context, details, widgets

ws = context.workspace()
ctx = context.scoring_context(ws)
table = widgets.ranking_frame(context.current_rank(ctx))

st.title("Browse")
st.caption(
    f"{len(table):,} pairs of **{ctx.pool_name}** ranked by {st.session_state['method']} "
    "(parameters from the Scores page). Include or exclude a pair by hand; decisions are saved in the "
    "workspace and applied when a selection is saved."
)

if st.session_state.get("detail_pair") is not None:
    details.pair_detail(ctx, table, int(st.session_state["detail_pair"]))
    st.divider()

per_page = st.columns([1, 3])[0].select_slider(
    "Pairs per page", options=[8, 12, 16, 24, 32], value=12, key="browse_per_page"
)
top, bottom, rand = st.tabs(["Top ranked", "Bottom ranked", "Random"])
with top:
    start = st.columns([1, 3])[0].number_input(
        "Start at rank", 1, max(len(table), 1), 1, step=per_page, key="browse_top_start"
    )
    widgets.gallery_grid(ctx, table.iloc[start - 1 : start - 1 + per_page], key="top")
with bottom:
    widgets.gallery_grid(ctx, table.iloc[::-1].head(per_page), key="bottom")
with rand:
    if st.button("Shuffle", key="browse_shuffle"):
        st.session_state["browse_seed"] = st.session_state.get("browse_seed", 0) + 1
    rng = np.random.default_rng(st.session_state.get("browse_seed", 0))
    idx = np.sort(rng.choice(len(table), size=min(per_page, len(table)), replace=False))
    widgets.gallery_grid(ctx, table.iloc[idx], key="random")

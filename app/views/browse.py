"""Browse: top-, bottom- and random-ranked galleries of the pairs that match a caption search and filters;
a detail view says why a pair ranks where it does."""

from __future__ import annotations

import streamlit as st

from app import context, details, review, widgets

ws = context.workspace()
ctx = context.scoring_context(ws)
result = context.current_rank(ctx)
table = widgets.ranking_frame(result)

st.title("Browse")
widgets.changes_by_others(ctx)
st.caption(
    f"{len(table):,} pairs of **{ctx.pool_name}** ranked by {st.session_state['method']} "
    "(parameters from the Scores page). Include or exclude a pair by hand; decisions are saved in the "
    "workspace and applied when a selection is saved."
)

if st.session_state.get("detail_pair") is not None:
    details.pair_detail(ctx, table, int(st.session_state["detail_pair"]))
    st.divider()

filters = widgets.search_filters(ctx, list(table.columns))
seen = st.session_state.get("browse_filters_seen")
if seen != repr(filters):  # a changed search: back to the first page (the first look keeps the URL's page)
    st.session_state["browse_filters_seen"] = repr(filters)
    if seen is not None:
        st.session_state["browse_top_start"] = st.session_state["browse_bottom_start"] = 1
st.session_state.setdefault("browse_per_page", context.PER_PAGE_DEFAULT)
per_page = st.columns([1, 3])[0].select_slider(
    "Pairs per page", options=context.PER_PAGE, key="browse_per_page"
)


def ranked_tab(order: str, key: str, label: str) -> None:
    """A paged gallery of the matching pairs in `order` ('rank': best first, '-rank': worst first)."""
    start = st.columns([1, 3])[0].number_input(
        label, min_value=1, step=per_page, key=f"browse_{key}_start",
        help="Position among the matching pairs (all pairs when no search or filter is set).",
    )  # fmt: skip
    rows, total = widgets.search_results(ctx, result, filters, order, per_page, int(start) - 1)
    if rows.empty:
        st.info(f"No pairs here: {total:,} match the search and filters." if total else "No pair matches.")
        return
    st.caption(f"Showing {int(start):,}–{int(start) + len(rows) - 1:,} of {total:,} matching pairs.")
    widgets.gallery_grid(ctx, rows, key=key)


top, bottom, rand, queue = st.tabs(
    ["Top ranked", "Bottom ranked", "Random", "Review queue"], key="browse_tab", bind="query-params"
)
with top:
    ranked_tab("rank", "top", "Start at position (best first)")
with bottom:
    ranked_tab("-rank", "bottom", "Start at position (worst first)")
with rand:
    if st.button("Shuffle", key="browse_shuffle"):
        st.session_state["browse_seed"] = st.session_state.get("browse_seed", 0) + 1
    rows, total = widgets.search_results(
        ctx, result, filters, "random", per_page, 0, seed=st.session_state.get("browse_seed", 0)
    )
    st.caption(f"{len(rows):,} random pairs of {total:,} matching.")
    widgets.gallery_grid(ctx, rows, key="random")
with queue:
    if queue.open:  # the tabs track the open one (bound to the URL): the queue only runs when shown
        review.review_queue(ctx, table)

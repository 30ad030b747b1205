"""The detail view of one pair: why it ranks where it does, its decision history, and its note."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import context, widgets
from chips_core import gallery, selection, store

WHY = {
    "alignment": "Â: how much one training step on this pair lowers the eval loss, through the "
    "curvature-aware (sketched Newton) solve. Positive helps, negative hurts.",
    "learnability": "w_L = (1 − p_corr)(1 + σ(−margin)): high when the model does not yet match this pair.",
    "relevance": "w_R: closeness of image and caption to the eval set's mean embeddings (0.27…0.73, soft).",
    "score": "alignment × learnability × relevance; pairs are ranked by it.",
}


def pair_detail(ctx: context.ScoringContext, table: pd.DataFrame, pair_id: int) -> None:
    """Show one pair in full: image, caption, components and their meaning, eval pairs it helps, decisions."""
    ws = store.Workspace(ctx.ws_root)
    pairs = context.pool_pairs(ctx)
    if pair_id not in pairs.index:
        st.session_state.pop("detail_pair", None)
        return
    meta = pairs.loc[pair_id]
    row = table.loc[table["pair_id"] == pair_id].iloc[0]
    with st.container(border=True):
        head, close = st.columns([6, 1])
        head.subheader(f"Pair {pair_id} — rank {int(row['rank']):,} of {len(table):,}")
        if close.button("Close", key="detail_close"):
            st.session_state.pop("detail_pair", None)
            st.rerun()
        left, right = st.columns([1, 2])
        thumb = gallery.thumbnails(ws, [(pair_id, meta["filepath"])], size=384)[pair_id]
        if isinstance(thumb, str):
            left.warning(thumb)
        else:
            left.image(str(thumb), width="stretch")
        left.caption(f"`{meta['filepath']}`")
        with right:
            st.markdown(f"**Caption:** {meta['caption']}")
            if isinstance(meta.get("label"), str) and meta["label"]:
                st.markdown(f"**Label:** {meta['label']}")
            st.markdown("**Why it ranks here**")
            st.dataframe(
                pd.DataFrame(
                    {"value": [float(row[c]) for c in WHY], "meaning": list(WHY.values())}, index=list(WHY)
                ),
                key="detail_components",
            )
            _decision_controls(ctx, pair_id)


def _decision_controls(ctx: context.ScoringContext, pair_id: int) -> None:
    ws = store.Workspace(ctx.ws_root)
    dec = widgets.decisions(ctx)
    state = dec.loc[pair_id, "state"] if pair_id in dec.index else None
    note = dec.loc[pair_id, "note"] if pair_id in dec.index else None
    st.markdown(f"**Decision:** {state or 'none (the score decides)'}")
    c1, c2, c3 = st.columns(3)
    for col, action in zip((c1, c2, c3), ("include", "exclude", "clear"), strict=True):
        if col.button(
            action.capitalize(),
            key=f"detail-{action}",
            disabled=(state == action) or (action == "clear" and state is None),
            width="stretch",
        ):
            widgets.decide(ctx, [pair_id], action)
            st.rerun()
    with st.form("detail_note", border=False):
        text = st.text_area("Note", value=note if isinstance(note, str) else "", key=f"note-{pair_id}")
        if st.form_submit_button("Save note") and text.strip():
            widgets.decide(ctx, [pair_id], "note", note=text.strip())
            st.rerun()
    history = selection.decision_history(ws, ctx.pool_id, pair_id)
    if len(history):
        with st.expander(f"History ({len(history)})"):
            st.dataframe(history[["created_at", "action", "note", "author"]], hide_index=True)

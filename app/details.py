"""The detail view of one pair: why it ranks where it does, its decision history, and its note."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from app import context, image_view, widgets
from chips_core.curation import gallery, selection
from chips_core.scoring import ranking as scoring
from chips_core.scoring.cache import PrepareError
from chips_core.workspace import catalog, store

WHY = {  # what each component means, in plain words (the formulas are in FORMULAS)
    "alignment": "How much training on this pair is expected to help the target set (above 0 helps, below "
    "0 hurts).",
    "learnability": "How much the model can still learn from this pair (high when it does not match the "
    "image and caption yet).",
    "relevance": "How close the image and caption are to the target domain.",
    "agreement": "How well the caption fits its image compared with pairs just as close to the target set, "
    "as the share of the pool that fits worse (low: a likely caption mistake).",
    "score": "The expected help (with the two weights above), the agreement and the plain CLIPScore, "
    "combined as the two weight sliders say: the ranking sorts pairs by it.",
}
FORMULAS = {  # for ML engineers (METHOD.md)
    "alignment": "Â = g̃ᵢ·M̃⁻¹ũ, the sketched Newton direction with M = (1−α)Φ_pos + αΦ_neg + λI "
    "(unit-norm g̃, ũ in the default preset)",
    "learnability": "w_L = (1 − p_corr)(1 + σ(−margin))",
    "relevance": "w_R: soft closeness of image and caption embeddings to the eval set's means (0.27…0.73)",
    "agreement": "P(CLIPScore − its least-squares fit on (1, cos_x, cos_y)), the pool percentile",
    "score": "P(s)^(1−δ) · P(CLIPScore)^δ, s = P(Â · w_L · w_R)^(1−γ) · agreement^γ, γ and δ the agreement "
    "and CLIPScore weights (both 0: Â · w_L · w_R); the guard holds CLIPScore outliers back",
}


def pair_detail(ctx: context.ScoringContext, table: pd.DataFrame, pair_id: int) -> None:
    """Show one pair in full: image, caption, components and their meaning, eval pairs it helps, decisions."""
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
        left, right = st.columns([1, 1])
        with left:
            image_view.source_image(meta["filepath"], key=f"detail-{pair_id}")
            st.caption(f"`{meta['filepath']}`")
        with right:
            st.markdown(f"**Caption:** {meta['caption']}")
            if isinstance(meta.get("label"), str) and meta["label"]:
                st.markdown(f"**Label:** {meta['label']}")
            st.markdown("**Why it ranks here**")
            components_table(row)
            ml = st.expander("For ML engineers: the formulas")
            ml.markdown("\n".join(f"- **{c}**: {f}" for c, f in FORMULAS.items()))
            _decision_controls(ctx, pair_id)
        _eval_pair_contributions(ctx, pair_id, ml)


def components_table(row: pd.Series) -> None:
    """A pair's components with what each means, as a static table: its text wraps, so every meaning is
    read in full (a data grid's cells cut long text off)."""
    shown = [c for c in WHY if c in row.index]  # a score run stored before `agreement` lacks it
    frame = pd.DataFrame(
        {"value": [float(row[c]) for c in shown], "meaning": [WHY[c] for c in shown]}, index=shown
    )
    st.table(frame.style.format({"value": "{:.3g}"}))


def _contribution_params(ctx: context.ScoringContext) -> Any:
    """The RankParams of the Scores page's ranking: its Newton solve for chips / trak, else CHIPS's at the
    page's α, k, damping and normalisation."""
    return context.current_rank(ctx).params


def _eval_pair_contributions(
    ctx: context.ScoringContext, pair_id: int, ml: DeltaGenerator, top: int = 5
) -> None:
    """The eval pairs this pair helps and hurts most: its expected help split into one term per eval pair
    (they add up to it); how the split is computed goes into the engineers' expander `ml`."""
    ws = store.Workspace(ctx.ws_root)
    cache = context.load_cache(ctx.cache_dir)
    try:
        frame = scoring.eval_contributions(cache, pair_id, _contribution_params(ctx), top=top)
    except (PrepareError, KeyError) as exc:
        st.info(f"Eval-pair contributions are not available: {exc}")
        return
    n = catalog.count_pairs(ws, ctx.eval_id)
    eval_pairs = context.pairs_table(ctx.ws_root, ctx.eval_id, n)
    a = dict(frame.attrs)
    frame = frame.join(eval_pairs[["filepath", "caption"]], on="eval_pair_id")
    st.markdown("**Eval pairs this pair helps and hurts most**")
    st.caption(
        f"How much training on this pair is expected to help each of the {cache.n_eval} pairs of the target "
        f"set (positive: helps, negative: hurts); together they make up its expected help, "
        f"{a['alignment']:.4g}."
    )
    ml.markdown(
        f"**Per eval pair:** Â = g̃·M̃⁻¹ũ with ũ the mean of the {cache.n_eval} eval pairs' gradients, so Â "
        f"splits into one term per eval pair, g̃_e·M̃⁻¹g̃ / {cache.n_eval}; the terms sum to "
        f"Â = {a['alignment']:.4g} (CHIPS solve at α = {a['alpha']:g}, λ = {a['lam']:.3g}, k = {a['k']}). "
        "The share is a term over Â."
    )
    helps = frame[frame["contribution"] > 0].head(top)
    hurts = frame[frame["contribution"] < 0].iloc[::-1].head(top)
    for col, title, rows in zip(st.columns(2), ("Helps most", "Hurts most"), (helps, hurts), strict=True):
        with col:
            st.markdown(f"*{title}*")
            if rows.empty:
                st.caption("none")
            _eval_pair_rows(ws, rows)
    st.dataframe(
        frame[["eval_pair_id", "contribution", "share", "caption"]],
        hide_index=True,
        key="detail_eval_contrib",
    )


def _eval_pair_rows(ws: store.Workspace, rows: pd.DataFrame) -> None:
    thumbs = gallery.thumbnails(
        ws, [(int(r.eval_pair_id), str(r.filepath)) for r in rows.itertuples() if isinstance(r.filepath, str)]
    )
    for r in rows.itertuples():
        pic, text = st.columns([1, 3])
        thumb = thumbs.get(int(r.eval_pair_id), f"eval pair {r.eval_pair_id} is not in the workspace")
        if isinstance(thumb, str):
            pic.warning(thumb)
        else:
            pic.image(str(thumb), width="stretch")
        caption = r.caption if isinstance(r.caption, str) else ""
        text.markdown(f"{r.contribution:+.3g} ({r.share:.0%} of its expected help) — {caption}")


def _decision_line(dec: pd.DataFrame, pair_id: int) -> str:
    """The decision in force, with who made it and when."""
    if pair_id not in dec.index:
        return "**Decision:** none (the score decides)"
    row = dec.loc[pair_id]
    state = row["state"] if isinstance(row["state"], str) else None
    who = row["author"] if isinstance(row["author"], str) else "unknown"
    when = f"{pd.Timestamp(row['decided_at']):%Y-%m-%d %H:%M}" if pd.notna(row["decided_at"]) else "?"
    return f"**Decision:** {state or 'none (the score decides)'} · by {who}, {when}"


@st.fragment
def _decision_controls(ctx: context.ScoringContext, pair_id: int) -> None:
    """The pair's decision, buttons to change it, its note and history: a fragment, so a click reruns these
    controls only (the decision is recorded by the button's callback, before they are drawn again)."""
    widgets.refresh_if_others_changed()
    ws = store.Workspace(ctx.ws_root)
    dec = widgets.decisions(ctx)
    state = dec.loc[pair_id, "state"] if pair_id in dec.index else None
    note = dec.loc[pair_id, "note"] if pair_id in dec.index else None
    refused = widgets.decision_refusal(ctx)  # a viewer's attempt is refused by chips_core, and shown
    st.markdown(_decision_line(dec, pair_id))
    c1, c2, c3 = st.columns(3)
    for col, action in zip((c1, c2, c3), ("include", "exclude", "clear"), strict=True):
        col.button(
            action.capitalize(),
            key=f"detail-{action}",
            disabled=(state == action) or (action == "clear" and state is None),
            width="stretch",
            help=refused,
            on_click=widgets.decide_now,
            args=(ctx, pair_id, action),
        )
    with st.form("detail_note", border=False):
        text = st.text_area("Note", value=note if isinstance(note, str) else "", key=f"note-{pair_id}")
        if st.form_submit_button("Save note", help=refused) and text.strip():
            widgets.decide(ctx, [pair_id], "note", note=text.strip())  # the history below shows it
    history = selection.decision_history(ws, ctx.pool_id, pair_id)
    if len(history):
        with st.expander(f"History ({len(history)})"):
            cols = [c for c in ("created_at", "action", "note", "author", "email") if c in history.columns]
            st.dataframe(history[cols], hide_index=True)

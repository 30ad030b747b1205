"""The Browse page's review queue: one pair at a time, the pairs nearest the selection cut-off first, with
Include / Exclude / Skip / Back buttons and keyboard shortcuts (Streamlit's own `shortcut=` on st.button).

The queue's order is `chips_core.curation.review.queue`; the position (1-based, `review_pos`) and the
"skip decided pairs" choice live in the URL (app/url_state.py), so a reload shows the same pair. The queue
is a fragment: a decision reruns only it, so the next pair shows at once.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import pandas as pd
import streamlit as st

from app import context, details, image_view, url_state, widgets
from chips_core.curation import review

SHORTCUTS = {"include": "I", "exclude": "X", "next": "N", "back": "B"}


def _where(above: bool, distance: int) -> str:
    """The pair's place relative to the cut-off, in words (1 rank = next to it)."""
    ranks = f"{distance:,} rank{'s' if distance > 1 else ''}"
    if above:
        last = " (the last pair the ratio selects)" if distance == 1 else ""
        return f"{ranks} above the cut-off: selected{last}."
    first = " (the first pair the ratio leaves out)" if distance == 1 else ""
    return f"{ranks} below the cut-off: left out{first}."


def _advance(ids: Sequence[int], pos: int, skip: Collection[int]) -> None:
    """Move to the next pair after queue position `pos` (0-based), remembering `pos` for Back."""
    nxt = review.step(ids, pos, 1, skip)
    st.session_state.setdefault("review_trail", []).append(pos)
    st.session_state["review_pos"] = (len(ids) if nxt is None else nxt) + 1


def _back(pos: int) -> None:
    """Back to the pair shown before (else the previous one in the queue)."""
    trail = st.session_state.get("review_trail") or [max(pos - 1, 0)]
    st.session_state["review_pos"] = trail.pop() + 1
    st.session_state["review_trail"] = trail


def _restart() -> None:
    st.session_state["review_pos"] = 1
    st.session_state["review_trail"] = []


def _decide(
    ctx: context.ScoringContext, pid: int, action: str, ids: Sequence[int], pos: int, skip: set
) -> None:
    if widgets.decide(ctx, [pid], action):  # a refused decision (a viewer) stays on this pair
        _advance(ids, pos, skip)


@st.fragment
def review_queue(ctx: context.ScoringContext, table: pd.DataFrame) -> None:
    """One pair of the queue near the cut-off: image, caption, components, place, decision buttons."""
    widgets.refresh_if_others_changed()
    cutoff = review.cutoff_rank(table)
    q = review.queue(table, cutoff)
    if q.empty:
        st.info("No ranked pairs.")
        return
    st.caption(
        f"The selection ratio keeps the top **{cutoff:,}** of {len(table):,} pairs. The queue shows the "
        "pairs nearest that cut-off first, alternating just inside and just outside, so the close calls "
        "get a person's look. Keys: **I** include, **X** exclude, **N** next, **B** back. The search and "
        "filters above do not apply here."
    )
    skip_decided = st.checkbox(
        "Skip pairs already decided",
        key="review_skip",
        help="Next, Include and Exclude pass over pairs that are already included or excluded.",
    )
    dec = widgets.decisions(ctx)
    states = {int(p): s for p, s in dec["state"].items() if isinstance(s, str)} if len(dec) else {}
    skip = set(states) if skip_decided else set()
    ids = q["pair_id"].tolist()
    pos = min(max(int(st.session_state.get("review_pos", 1)), 1), len(q) + 1) - 1  # 0-based; len = done
    st.session_state["review_pos"] = pos + 1
    if pos == len(q):
        st.success("End of the queue: every pair has been shown.")
        st.button("Back", key="review_back", on_click=_back, args=(pos,), shortcut=SHORTCUTS["back"])
        st.button("Start again", key="review_restart", on_click=_restart)
        url_state.write()
        return
    item = q.iloc[pos]
    pid = int(item["pair_id"])
    row = table.loc[table["pair_id"] == pid].iloc[0]
    meta = context.pool_pairs(ctx).loc[pid]
    state = states.get(pid)
    st.subheader(f"Pair {pos + 1:,} of {len(q):,} in the queue — rank {int(item['rank']):,}")
    st.markdown(f"**{_where(bool(item['above']), int(item['distance']))}**")
    left, right = st.columns([1, 1])
    with left:
        image_view.source_image(meta["filepath"], key=f"review-{pid}")
    with right:
        badge = {"include": ":green-badge[included]", "exclude": ":red-badge[excluded]"}.get(state or "")
        st.markdown(f"**Decision:** {badge or 'none (the score decides)'}")
        if bool(row.get("guarded", False)):
            st.markdown(":violet-badge[held out: image and caption disagree]")
        st.markdown(f"**Caption:** {meta['caption']}")
        if isinstance(meta.get("label"), str) and meta["label"]:
            st.markdown(f"**Label:** {meta['label']}")
        details.components_table(row)
        refused = widgets.decision_refusal(ctx)
        b1, b2, b3, b4 = st.columns(4)
        for col, action, icon in ((b1, "include", ":material/check:"), (b2, "exclude", ":material/block:")):
            col.button(
                action.capitalize(),
                icon=icon,
                key=f"review-{action}",
                type="primary" if action == "include" else "secondary",
                width="stretch",
                shortcut=SHORTCUTS[action],
                on_click=_decide,
                args=(ctx, pid, action, ids, pos, skip),
                help=refused or f"{action.capitalize()} this pair and show the next one",
            )
        b3.button(
            "Skip",
            icon=":material/skip_next:",
            key="review-next",
            width="stretch",
            shortcut=SHORTCUTS["next"],
            on_click=_advance,
            args=(ids, pos, skip),
            help="Next pair, no decision",
        )
        b4.button(
            "Back",
            icon=":material/undo:",
            key="review-back",
            width="stretch",
            shortcut=SHORTCUTS["back"],
            on_click=_back,
            args=(pos,),
            disabled=pos == 0 and not st.session_state.get("review_trail"),
            help="The pair shown before",
        )
    url_state.write()  # a fragment rerun skips main.py's write: the position goes into the URL here

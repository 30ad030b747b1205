"""Rendering pieces shared by the pages: ranking metrics, pair cards with decision buttons, galleries."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from app import auth, context
from chips_core.curation import gallery, search, selection
from chips_core.team import audit, roles
from chips_core.workspace import catalog, store

COMPONENTS = ("alignment", "learnability", "relevance", "agreement", "score")
SCORE_WORDS = {  # each component in plain words: (short, for a card's one line; long, for a pair shown alone)
    "alignment": ("helps", "expected help for the target set"),
    "learnability": ("learnable", "how much the model can still learn"),
    "relevance": ("on target", "closeness to the target domain"),
    "agreement": ("fits", "how well the caption fits the image"),
    "score": ("score", "overall score"),
}


def ranking_frame(result: Any) -> pd.DataFrame:
    """The per-pair table of a RankResult, best first (pair_id, components, rank, selected)."""
    return selection.rank_frame(result)


def _num(value: Any, fmt: str) -> str:
    """A figure for a metric tile; '—' when the method has no such figure."""
    return "—" if value is None or not np.isfinite(value) else format(value, fmt)


def rank_metrics(info: dict[str, Any], n_total: int) -> None:
    """The headline figures of a ranking in plain words: selected share, share expected to help, stability
    (the technical figures: `rank_metrics_for_engineers`)."""
    cols = st.columns(3)
    n_sel = int(info.get("n_selected", 0))
    share = f"{n_sel / max(n_total, 1):.1%} of {n_total:,}"
    cols[0].metric(
        "Selected",
        f"{n_sel:,}",
        share,
        delta_color="off",
        delta_arrow="off",
        help="How many pairs the selection ratio keeps for training.",
    )
    frac = info.get("frac_positive")
    cols[1].metric(
        "Expected to help",
        _num(frac, ".1%"),
        help="Share of the pool's pairs expected to improve the target set when the model trains on them.",
    )
    cols[2].metric(
        "Ranking stability",
        _num(info.get("stability"), ".3f"),
        help="How much the order of the pairs holds when the fast approximation is done twice independently: "
        "1 = the same order.",
    )
    method = info.get("method")
    backwards = method in ("chips", "trak") and frac is not None and frac * n_total < n_sel
    if backwards and not st.session_state.get("rank_normalized"):
        st.warning(
            "Fewer pairs are expected to help the target set than this budget selects, and the score can "
            "order the rest backwards. Select fewer pairs, or tick “rank-normalised alignment” (Ablations)."
        )


def rank_metrics_for_engineers(info: dict[str, Any]) -> None:
    """The ranking's technical figures, for the engineers' expander: the damping λ (and the paper's λ*),
    the effective dimension d(λ)/k and what the stability measures."""
    st.metric("λ", _num(info.get("lam"), ".3g"), help=f"λ* = {_num(info.get('lam_star'), '.3g')}")
    st.metric(
        "d(λ)/k",
        _num(info.get("d_over_k"), ".3f"),
        help="Effective dimension of the sketched curvature over k; λ* gives 0.25.",
    )
    st.caption(
        "Ranking stability: Spearman of the scores from sketch rows [0, k) and [k, 2k) (needs 2k ≤ k_max)."
    )


def decisions(ctx: context.ScoringContext) -> pd.DataFrame:
    """Decisions in force in the pool, indexed by pair_id (columns state, note, author, decided_at)."""
    df = selection.current_decisions(store.Workspace(ctx.ws_root), ctx.pool_id)
    return df.set_index("pair_id")


def decision_refusal(ctx: context.ScoringContext) -> str | None:
    """Why this user may not decide, for the decision buttons' help; None when they may.

    Unlike the lead-only buttons, decision buttons stay enabled for a viewer: Streamlit drops a click on a
    disabled widget without a trace, and a viewer's attempt must reach chips_core, which refuses it with a
    clear message and records the refusal in the audit trail."""
    refused = auth.refusal(store.Workspace(ctx.ws_root), "decide")
    return refused and f"{refused} The workspace refuses a decision from you and records the attempt."


def score_run(ctx: context.ScoringContext) -> int:
    """The score run of the ranking on screen, stored (`selection.record_score_run`) the first time this
    session decides under these parameters: each decision names the ranking and parameters it was made on."""
    result = context.current_rank(ctx)
    params = {**context.rank_params(), "k": int(result.info["k"])}  # the sketch dimension the ranking used
    runs = st.session_state.setdefault("score_runs", {})
    key = repr((ctx.ws_root, ctx.pool_id, ctx.cache_id, sorted(params.items())))  # ids are per workspace
    if key not in runs:
        runs[key] = selection.record_score_run(
            store.Workspace(ctx.ws_root), ctx.pool_id, result, params["method"],
            params={**params, "eval": ctx.eval_name, "blocks": ctx.blocks}, cache_id=ctx.cache_id,
        )  # fmt: skip
    return runs[key]


def decide(ctx: context.ScoringContext, pair_ids: list[int], action: str, note: str | None = None) -> bool:
    """Record a decision for pairs as the signed-in user (append-only, in the workspace) and say so;
    False, with the reason shown, when their role may not decide."""
    ws = store.Workspace(ctx.ws_root)
    user = auth.actor()
    try:  # a user who may not decide writes nothing, not even the score run (chips_core refuses and logs)
        run = score_run(ctx) if roles.can(ws, user, "decide") else None
        ids = selection.record_decisions(
            ws, ctx.pool_id, pair_ids, action, note=note, score_run_id=run, actor=user
        )
    except (roles.AccessDenied, selection.SelectionError) as exc:
        st.error(str(exc), icon=":material/block:")
        return False
    st.toast(f"{action}: {len(ids)} pair(s) recorded")
    _note_changes_by_others(ctx)
    return True


# decision ids are taken before their rows commit, so two sessions deciding at once can commit out of order:
# each look searches this many ids back and skips the changes it already reported
LOOKBACK_IDS = 1000


def _unreported_changes(ctx: context.ScoringContext, user: Any) -> pd.DataFrame | None:
    """Changes by other users to this user's pairs that this session has not reported yet (None before its
    first look)."""
    seen = st.session_state.get(f"decisions_seen_{ctx.pool_id}")
    if seen is None:
        return None
    ws = store.Workspace(ctx.ws_root)
    changed = audit.changed_by_others(ws, ctx.pool_id, user, max(seen - LOOKBACK_IDS, 0))
    reported = st.session_state.get(f"changes_reported_{ctx.pool_id}", set())
    return changed[~changed["decision_id"].isin(reported)]


def _note_changes_by_others(ctx: context.ScoringContext) -> None:
    """After a decision: when another user changed this user's pairs since the page last looked, ask the
    next fragment run for a full page run, which shows who changed what (`changes_by_others`). One query,
    signed-in users only."""
    user = auth.actor()
    if not user.signed_in:
        return
    new = _unreported_changes(ctx, user)
    if new is not None and len(new):
        st.session_state["refresh_page"] = True


def refresh_if_others_changed() -> None:
    """At the start of a decision fragment: rerun the whole page when a decision found that another user
    changed pairs of this user's (a fragment's own rerun would not show it)."""
    if st.session_state.pop("refresh_page", False):
        st.rerun(scope="app")


def changes_by_others(ctx: context.ScoringContext) -> None:
    """Warn about the pairs this user decided that another user changed since this session last looked
    (who, what, when), until dismissed; each change is reported once (`LOOKBACK_IDS`). Nothing in
    single-user mode.

    The warning is kept in the session: a rerun that a decision button starts at once would otherwise
    hide what the run before it found."""
    user = auth.actor()
    if not user.signed_in:
        return
    ws = store.Workspace(ctx.ws_root)
    mark_key, found_key = f"decisions_seen_{ctx.pool_id}", f"changed_by_others_{ctx.pool_id}"
    reported = st.session_state.setdefault(f"changes_reported_{ctx.pool_id}", set())
    latest = audit.latest_decision_id(ws, ctx.pool_id)
    new = _unreported_changes(ctx, user)
    if new is None:  # the first look: what happened before it is not news
        before = audit.changed_by_others(ws, ctx.pool_id, user, max(latest - LOOKBACK_IDS, 0))
        reported.update(int(d) for d in before["decision_id"])
    else:
        found = st.session_state.setdefault(found_key, {})
        for r in new.itertuples():  # the newest change per pair
            reported.add(int(r.decision_id))
            found[int(r.pair_id)] = (
                f"pair {int(r.pair_id)}: you set **{r.yours}**; **{r.by}** changed it to **{r.theirs}** at "
                f"{pd.Timestamp(r.decided_at):%Y-%m-%d %H:%M:%S}"
            )
    st.session_state[mark_key] = latest
    if st.session_state.get(found_key):
        lines = "\n".join(f"- {line}" for line in st.session_state[found_key].values())
        st.warning(f"Changed by others since you last looked:\n{lines}", icon=":material/group:")
        if st.button("Dismiss", key="changes_dismiss"):
            st.session_state.pop(found_key)
            st.rerun()


def decide_now(ctx: context.ScoringContext, pid: int, action: str) -> None:
    """A decision button's callback: record it before the card's fragment reruns, and remember it for the
    card (`decided_now`), whose arguments still carry the state of the last full run; a refused decision
    changes nothing."""
    if decide(ctx, [pid], action):
        st.session_state.setdefault("decided_now", {})[pid] = None if action == "clear" else action


def _fmt(value: Any) -> str:
    return "—" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.3g}"


BROWSE_PAGE = "views/browse.py"  # the page that shows the detail view (relative to app/main.py)


@st.fragment
def pair_card(
    ctx: context.ScoringContext,
    row: pd.Series,
    pairs: pd.DataFrame,
    state: str | None,
    key: str,
    planted: str = "",
    refused: str | None = None,
    full: bool = False,
    elsewhere: bool = False,
) -> None:
    """One pair: thumbnail, caption, rank, components, its decision and buttons to change it (`refused`:
    why the user's role may not decide, as their help; see `decision_refusal`). `full`: a pair shown alone,
    with its whole caption and each component on a line of its own, in plain words. `elsewhere`: a card off
    the Browse page, whose Details button opens the detail view there.

    A fragment: a decision reruns this card only, which shows it at once; the rest of the page (counts,
    other views of the pair) catches up on the next full run."""
    refresh_if_others_changed()
    pid = int(row["pair_id"])
    state = st.session_state.get("decided_now", {}).get(pid, state)
    meta = pairs.loc[pid]
    thumb = gallery.thumbnails(store.Workspace(ctx.ws_root), [(pid, meta["filepath"])])[pid]
    if isinstance(thumb, str):
        st.warning(thumb)
    else:
        st.image(str(thumb), width="stretch")
    badge = {"include": " :green-badge[included]", "exclude": " :red-badge[excluded]"}.get(state or "", "")
    if bool(row.get("guarded", False)):
        badge += " :violet-badge[held out: image and caption disagree]"
    if planted and planted != "none":  # the demo's ground truth, to see whether the ranking catches it
        badge += f" :orange-badge[planted: {planted}]"
    caption = meta["caption"] if full else meta["caption"][:160]
    st.markdown(f"**#{int(row['rank'])}**{badge}  \n{caption}")
    shown = [c for c in COMPONENTS if c in row.index]
    if full:
        st.markdown("\n".join(f"- {SCORE_WORDS[c][1]}: **{_fmt(row[c])}**" for c in shown))
    else:
        st.caption(" · ".join(f"{SCORE_WORDS[c][0]} {_fmt(row[c])}" for c in shown))
    b1, b2 = st.columns(2, gap="small")  # labelled buttons: two to a row fit a card of a 4-column grid
    b1.button(
        "Include", icon=":material/check:", key=f"{key}-inc-{pid}", disabled=state == "include",
        width="stretch",
        help=refused or "Include: always keep this pair in a saved selection, whatever its score",
        on_click=decide_now, args=(ctx, pid, "include"),
    )  # fmt: skip
    b2.button(
        "Exclude", icon=":material/block:", key=f"{key}-exc-{pid}", disabled=state == "exclude",
        width="stretch", help=refused or "Exclude: never keep this pair in a saved selection",
        on_click=decide_now, args=(ctx, pid, "exclude"),
    )  # fmt: skip
    if st.button(
        "Details", icon=":material/help:", key=f"{key}-why-{pid}", width="stretch",
        help="Details: why this pair ranks here, the eval pairs it helps, its decision history and note",
    ):  # fmt: skip
        st.session_state["detail_pair"] = pid
        if elsewhere:  # the detail view lives on Browse
            st.switch_page(BROWSE_PAGE)
        st.rerun()  # the whole page: the detail view opens above the galleries


def gallery_grid(
    ctx: context.ScoringContext,
    rows: pd.DataFrame,
    key: str,
    n_cols: int = 4,
    full: bool = False,
    elsewhere: bool = False,
) -> None:
    """A grid of pair cards (rows: ranking rows with pair_id, rank and components; search results also
    carry filepath, caption and state, so the pool's table and decisions are not read for them); `full`:
    whole captions and components in plain words, for a pair shown alone; `elsewhere`: off the Browse page
    (`pair_card`)."""
    st.session_state.pop("decided_now", None)  # a full run: the states below are read from the workspace
    if {"filepath", "caption", "state"} <= set(rows.columns):
        pairs = rows.set_index("pair_id", drop=False)[["filepath", "caption"]]
        state = {int(p): s for p, s in zip(rows["pair_id"], rows["state"], strict=True) if isinstance(s, str)}
    else:
        pairs = context.pool_pairs(ctx)
        dec = decisions(ctx)
        state = dec["state"].to_dict() if len(dec) else {}
    planted = context.demo_planted(ctx)
    truth = planted.to_dict() if planted is not None else {}
    refused = decision_refusal(ctx)
    for start in range(0, len(rows), n_cols):
        cols = st.columns(n_cols)
        for col, (_, row) in zip(cols, rows.iloc[start : start + n_cols].iterrows(), strict=False):
            with col, st.container(border=True):
                pid = int(row["pair_id"])
                pair_card(ctx, row, pairs, state.get(pid), key, truth.get(pid, ""), refused, full, elsewhere)


DECISION_LABELS = {"include": "Included", "exclude": "Excluded", "none": "No decision"}


def search_filters(ctx: context.ScoringContext, columns: list[str]) -> dict[str, Any]:
    """The Browse page's caption search box and filters (an expander); returns `search_pairs`' keyword
    arguments: text, ranges (components with a bound typed), decision, label and, in the demo, the pairs
    with the planted mistakes chosen (None when not set)."""
    text = st.text_input(
        "Search captions",
        key="browse_text",
        placeholder="words that must all occur in the caption, e.g. chest ct",
        help="Case-insensitive; every word must occur in the caption, in any order.",
    )
    ranges: dict[str, tuple[float | None, float | None]] = {}
    with st.expander("Filters: decision, label, component ranges"):
        left, right = st.columns(2)
        decision = left.multiselect(
            "Decision",
            list(DECISION_LABELS),
            format_func=DECISION_LABELS.get,
            key="browse_decision",
            placeholder="any decision",
            help="Pairs whose decision in force is one of these ('No decision': the score decides).",
        )
        labels = catalog.pool_labels(store.Workspace(ctx.ws_root), ctx.pool_id)
        label = right.multiselect(
            "Label",
            labels,
            key="browse_label",
            placeholder="any label" if labels else "this pool has no labels",
            disabled=not labels,
            help="The label column given at ingest (--label-col).",
        )
        pair_ids = None
        truth = context.demo_planted(ctx)
        if truth is not None:  # the demo's ground truth: filter on the planted mistakes
            planted = st.multiselect(
                "Planted mistake (demo ground truth)",
                sorted(set(truth)),
                key="browse_planted",
                placeholder="any",
                help="The demo's pool has deliberate mistakes; 'none' marks the clean pairs.",
            )
            pair_ids = truth.index[truth.isin(planted)].tolist() if planted else None
        else:  # no ground truth here: a planted filter from the URL or the demo does not apply
            st.session_state.pop("browse_planted", None)
        comps = [c for c in COMPONENTS if c in columns]
        for comp, col in zip(comps, st.columns(len(comps)), strict=True):
            lo = col.number_input(f"{comp} ≥", value=None, format="%.4g", key=f"browse_min_{comp}")
            hi = col.number_input(f"{comp} ≤", value=None, format="%.4g", key=f"browse_max_{comp}")
            if lo is not None or hi is not None:
                ranges[comp] = (lo, hi)
    return {
        "text": text or None,
        "ranges": ranges,
        "decision": decision or None,
        "label": label or None,
        "pair_ids": pair_ids,
    }


def search_results(
    ctx: context.ScoringContext, ranking: Any, filters: dict[str, Any], order: str, limit: int, offset: int,
    seed: int = 0,
) -> tuple[pd.DataFrame, int]:  # fmt: skip
    """One page of the ranking's pairs that match `filters` (`search.search_pairs`, in the workspace's
    DuckDB), and their number; a refused filter is shown and matches nothing."""
    try:
        return search.search_pairs(
            store.Workspace(ctx.ws_root), ctx.pool_id, ranking, order=order, limit=limit, offset=offset,
            seed=seed, **filters,
        )  # fmt: skip
    except selection.SelectionError as exc:
        st.warning(str(exc))
        return pd.DataFrame(), 0

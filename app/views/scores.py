"""Scores: choose the method and parameters; the ranking and its distributions update without any model."""

from __future__ import annotations

import streamlit as st

from app import auth, context, histograms, jobs_view, widgets
from chips_core.curation import selection
from chips_core.scoring import params as sp
from chips_core.scoring.diagnostics import stability_warning

ws = context.workspace()
ctx = context.scoring_context(ws)
cache = context.load_cache(ctx.cache_dir)

st.title("Scores")
widgets.changes_by_others(ctx)
st.caption(
    f"Pool **{ctx.pool_name}** against eval set **{ctx.eval_name}** (scoring cache {ctx.cache_id}, parameter "
    f"blocks {ctx.blocks.replace(',', ', ')}). Moving a slider re-ranks from what was computed "
    "once when the pool was prepared: no model runs."
)
if ctx.blocks_missing:
    st.warning(
        f"No scoring cache of this pool scores the blocks **{ctx.blocks_missing.replace(',', ', ')}** yet, "
        f"so the page shows the cache with {ctx.blocks.replace(',', ', ')}. Preparing it runs as a "
        "background job (no encoder runs; the cached features are reused)."
    )
    refused = auth.refusal(ws, "manage")
    if st.button(
        "Prepare a cache with these blocks", key="prepare_blocks", disabled=bool(refused), help=refused
    ):
        jobs_view.launch(
            ws,
            "prepare",
            ["prepare", str(ws.root), ctx.pool_name, "--eval", ctx.eval_name, "--blocks", ctx.blocks_missing],
            required={"Pool": ctx.pool_name, "Eval set": ctx.eval_name},
        )

LABELS = {
    "chips": "CHIPS",
    "dot": "Dot (gradient alignment)",
    "trak": "TRAK-style (α = 0, no weights, literal damping)",
    "clipscore": "CLIPScore",
    "random": "Random",
}
DEFAULT_ALPHA = sp.default_of(sp.RankParams, "alpha")
DEFAULT_AGREEMENT = sp.default_of(sp.RankParams, "agreement")
DEFAULT_CLIPSCORE_WEIGHT = sp.default_of(sp.RankParams, "clipscore_weight")
k_max = int(cache.k_max)
k_choices = context.k_choices(k_max)  # scoring_context has checked the session's k against them


def weight_slider(label: str, key: str, help: str) -> None:
    """A 0–1 weight of the chips score (RankParams.agreement / .clipscore_weight); the baselines ignore it."""
    chips = st.session_state["method"] == "chips"
    st.slider(label, *context.RANGES[key], step=0.05, key=key, disabled=not chips, help=help)


left, right = st.columns([1, 2.4], gap="large")
with left:
    st.selectbox(
        "Method",
        context.METHODS,
        format_func=lambda m: LABELS.get(m, m),
        key="method",
        help="CHIPS (recommended): pairs expected to help the target set whose captions fit their images; "
        "use it for a selection aimed at your target. CLIPScore: how well each caption fits its image, "
        "whatever the domain; prefer it when you only want clean captions, and compare the two after "
        "training (Export and train page) before a large run. Random: the baseline any method must "
        "beat. Dot and TRAK-style: the paper's comparison methods, for comparison only. TracIn needs "
        "training checkpoints (command line).",
    )
    st.selectbox(
        "Scoring preset",
        list(sp.PRESETS),
        key="preset",
        on_change=context.apply_preset,
        format_func={"default": "Recommended (default)", "paper": "CHIPS paper, literal"}.get,
        help="Recommended: compares what a pair teaches the two projection heads with what the target set "
        "needs, by direction rather than size, weighs in how well each caption fits its image, and holds "
        "obvious caption mistakes out. The paper's literal "
        "score also counts the temperature and raw gradient sizes, which on measured pools lifted wrong "
        "captions to the top (docs/SCORING.md).",
    )
    guard_on = st.toggle(
        "Hold out caption mismatches",
        key="guard_on",
        help="Before ranking, pairs whose image and caption agree far less than is usual in this pool "
        "(CLIPScore below the median by more than the threshold, in robust standard deviations) are kept "
        "out of the selection. They stay visible, ranked last. A hand include still wins.",
    )
    st.slider(
        "Guard threshold (robust SDs below the median)",
        *context.RANGES["guard_mads"],
        step=0.25,
        key="guard_mads",
        disabled=not guard_on,
        help="How far below the usual image–caption agreement a pair must fall to be held out: smaller holds "
        "more pairs out, larger only the clearest mismatches.",
    )
    weight_slider(
        "How much image–caption agreement counts",
        "agreement",
        "How well each caption fits its image, compared with pairs just as close to the target set. "
        "0: rank by the expected help for the target set alone (the CHIPS paper). 1: by the agreement "
        f"alone. The recommended {DEFAULT_AGREEMENT:g} leans on the agreement and keeps the expected help "
        "in: a pair must have a caption that fits its image and be expected to help; after training on "
        "measured pools it gave better models than 0.5 and kept wrong captions and off-target pairs out of "
        "the top (docs/SCORING.md).",
    )
    weight_slider(
        "How much plain CLIPScore counts",
        "clipscore_weight",
        "How well each caption fits its image as the model sees it (CLIPScore), against the two above "
        "together. 0: ignore it. 1: rank by CLIPScore alone. The recommended "
        f"{DEFAULT_CLIPSCORE_WEIGHT:g} adds a little of it: after training on measured pools it gave better "
        "models than without it and still kept off-target pairs out of the top; more of it lets pairs "
        "outside the target domain with well-fitting captions in (docs/SCORING.md).",
    )
    ml = st.expander("How a pair is compared with the target (for ML engineers)")  # the figures: below
    with ml:
        st.markdown(
            "score = P(s)^(1−δ) · P(CLIPScore)^δ, s = P(Â · w_L · w_R)^(1−γ) · agreement^γ with P the "
            "percentile in the pool, γ the agreement weight, δ the CLIPScore weight (γ = δ = 0: score = Â · "
            "w_L · w_R), agreement = P(CLIPScore − its least-squares fit on the relevance cosines), "
            "Â = g̃ᵢ · M̃⁻¹ ũ (sketched Newton direction), "
            "M = (1 − α)Φ_pos + αΦ_neg + λI, λ = λ-factor × the default rule below, k = JL sketch rows "
            "(METHOD.md, docs/SCORING.md)."
        )
        st.multiselect(
            "Parameter blocks scored",
            list(sp.BLOCKS),
            key="blocks",
            help="visual / text: the two projection heads; temperature: the logit scale. open_clip clamps "
            "the logit scale at ln 100 and public CLIPs sit there, so a step along it is often not one CPT "
            "can take. Another choice uses (or prepares) a scoring cache of those blocks.",
        )
        st.checkbox(
            "Unit-norm gradients (cosine, as LESS)",
            key="normalize",
            help="Divides each pair's gradient by its size, so a pair's loss does not decide its rank.",
        )
        st.radio(
            "Default λ",
            list(sp.DAMPINGS),
            key="damping",
            horizontal=True,
            format_func={
                "trace": f"{sp.DAMPING_SCALE:g} × trace (same at every k)",
                "dimension": "d(λ*) = k/4 (paper)",
            }.get,
        )
    st.slider(
        "α — how much confusions with other pairs count",
        *context.RANGES["alpha"],
        step=0.05,
        key="alpha",
        help="How a pair's effect is judged: 0 counts only how well the model matches the pair itself, "
        "1 only how it confuses the pair with others (the paper's best: 0.6–0.8).",
    )
    st.select_slider(
        "λ — caution of the estimate (× the default)",
        options=context.LAM_FACTORS,
        key="lam_factor",
        format_func=lambda f: f"{f:g}×",
        help="Larger: a steadier estimate, closer to the plain agreement of what the pair and the target "
        "set teach; smaller: trusts the finer structure more, and lifts pairs the target set barely touches.",
    )
    st.select_slider(
        "k — precision of the fast approximation",
        options=k_choices,
        key="k",
        help=f"Larger k: closer to the exact score. Any k up to {k_max} reuses the stored sketch: nothing is "
        "recomputed.",
    )
    st.slider(
        "β — how much the caption counts for relevance (vs the image)",
        *context.RANGES["beta"],
        step=0.05,
        key="beta",
        help="Closeness to the target domain is judged on the image and the caption together: 0 looks at "
        "the image alone, 1 at the caption alone.",
    )
    st.slider(
        "Selection ratio r",
        *context.RANGES["ratio"],
        step=0.01,
        key="ratio",
        format="%.2f",
        help="The share of the pool's pairs kept for training, best ranked first (0.30: the top 30%).",
    )
    with st.expander("Ablations"):
        st.checkbox("use learnability (how much the model can still learn)", key="use_learnability")
        st.checkbox("use relevance (closeness to the target domain)", key="use_relevance")
        st.checkbox(
            "rank-normalised alignment",
            key="rank_normalized",
            help="Rank pairs by the order of their expected help rather than its size: when few pairs are "
            "expected to help, the plain product can rank the rest backwards.",
        )

# imported only now (torch, scipy: seconds on a server's first run), so the controls above are already shown
from chips_core.scoring.ranking import ALPHA_INERT_RATIO, selection_change  # noqa: E402

result = context.current_rank(ctx)
table = widgets.ranking_frame(result)
info = result.info

with left:
    if info.get("curvature_ratio") is not None and info["method"] == "chips":
        ends = [context.current_rank(ctx, compared=True, alpha=a) for a in (0.0, 1.0)]
        moved = selection_change(*ends)
        n_sel = max(int(info["n_selected"]), 1)
        if info["curvature_ratio"] < ALPHA_INERT_RATIO:
            st.info(
                f"α has little to work with here: the model is so unsure of this pool that the curvature "
                f"of the matching pairs is {info['curvature_ratio']:.1%} of that of the non-matching ones, "
                "so α mostly rescales λ.",
                icon=":material/info:",  # given, so Streamlit does not compile its emoji regex for this text
            )
        st.caption(
            f"Across its whole range (α = 0 → 1), α swaps {len(moved['entering'])} of the {n_sel:,} "
            "selected pairs."
        )
        if abs(float(st.session_state["alpha"]) - DEFAULT_ALPHA) > 1e-9:
            now = selection_change(context.current_rank(ctx, compared=True, alpha=DEFAULT_ALPHA), result)
            st.caption(
                f"Compared with α = {DEFAULT_ALPHA:g}: {len(now['entering'])} pairs enter the selection and "
                f"{len(now['leaving'])} leave it."
            )
    if info.get("n_guarded"):
        st.caption(
            f"Guard: {info['n_guarded']:,} pairs held out (CLIPScore below {info['guard_threshold']:.3f})."
        )

with right:
    widgets.rank_metrics(info, n_total=len(table))
with ml:
    widgets.rank_metrics_for_engineers(info)
with right:
    if (stability_message := stability_warning(info.get("stability"))) is not None:
        st.warning(stability_message[0].upper() + stability_message[1:] + ".")
    comps = {  # column → what it means, in plain words (the histogram's title); older score runs: 4
        c: words + (" (what the ranking sorts by)" if c == "score" else "")
        for c, (_, words) in widgets.SCORE_WORDS.items()
        if c in table.columns
    }
    # inline SVG, not plotly: a browser's first plotly chart costs about a second (app/histograms.py)
    hists = selection.histograms(result.frame, list(comps))
    st.markdown(histograms.histograms_html(hists, comps), unsafe_allow_html=True)

st.subheader("Ranking")
top = table.head(200)
top = top.join(context.pairs_of(ctx, top["pair_id"].tolist())[["caption"]], on="pair_id")
decisions = widgets.decisions(ctx)
top["decision"] = top["pair_id"].map(decisions["state"]) if len(decisions) else None
top["pair_id"] = top["pair_id"].astype(str)  # int64 ids exceed JavaScript's exact integers
st.dataframe(
    top[
        [
            "rank",
            "pair_id",
            "caption",
            "score",
            "alignment",
            "learnability",
            "relevance",
            "agreement",
            "selected",
            "decision",
        ]
    ],
    hide_index=True,
    height=360,
    key="ranking_table",
    column_config={c: st.column_config.NumberColumn(format="%.4g") for c in comps},
)
st.caption(f"The 200 best of {len(table):,} pairs. Browse shows the images; Export saves the selection.")
if len(decisions):
    counts = decisions["state"].value_counts()
    st.caption(
        f"Hand decisions in force: {counts.get('include', 0)} included, {counts.get('exclude', 0)} excluded "
        "(applied when a selection is saved)."
    )

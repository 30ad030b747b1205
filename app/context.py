"""Shared dashboard state: which workspace, pool, eval set and scoring cache the pages work on.

Everything here reads the workspace through short-lived `Workspace.connect()` calls (background jobs write
concurrently) and caches only what is immutable once written: a finished scoring cache (st.cache_resource)
and a pool's pair table (st.cache_data, keyed by the pool's row count so a growing pool is re-read).
No math: rankings come from `chips_core.scoring.ranking.rank`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from chips_core.curation.search import COMPONENTS
from chips_core.scoring.params import (
    BLOCKS,
    DEFAULT_BLOCKS,
    NEEDS_CHECKPOINTS,
    RankParams,
    default_k,
    parse_blocks,
)
from chips_core.scoring.params import METHODS as SCORING_METHODS
from chips_core.workspace import catalog, store

# Widget keys whose values must survive page switches (Streamlit drops the state of widgets not drawn).
PERSISTENT_KEYS = (
    "method",
    "alpha",
    "lam_factor",
    "k",
    "beta",
    "ratio",
    "use_learnability",
    "use_relevance",
    "rank_normalized",
    "pool_name",
    "eval_name",
    "preset",
    "blocks",
    "damping",
    "normalize",
    "guard_on",
    "guard_mads",
    "agreement",
    "clipscore_weight",
    "map_space",
    "map_colour",
    "review_skip",
    # the Browse page's search and filters (widgets.search_filters), pairs per page and gallery positions
    "browse_text",
    "browse_decision",
    "browse_label",
    "browse_planted",
    *(f"browse_{end}_{comp}" for end in ("min", "max") for comp in COMPONENTS),
    "browse_per_page",
    "browse_top_start",
    "browse_bottom_start",
)
PER_PAGE = (8, 12, 16, 24, 32)  # the Browse galleries' page sizes; 12 unless chosen
PER_PAGE_DEFAULT = 12
# the Scores page's choices: methods (TracIn needs checkpoint caches: CLI only), slider ranges, λ multiples
METHODS = [m for m in SCORING_METHODS if m not in NEEDS_CHECKPOINTS]
RANGES = {"alpha": (0.0, 1.0), "beta": (0.0, 1.0), "ratio": (0.01, 1.0), "guard_mads": (1.0, 5.0),
          "agreement": (0.0, 1.0), "clipscore_weight": (0.0, 1.0)}  # fmt: skip
LAM_FACTORS = [float(f"{10 ** (e / 4):.3g}") for e in range(-8, 9)]  # 0.01× … 100×, quarter decades
RANK_RATIO = RankParams().ratio  # the ratio the cached rankings are made at (a ratio change only reselects)
# the widgets' defaults are RankParams' (chips_core/scoring/params.py; the preset's widgets are set by
# preset_state, k by the Scores page from the cache's k_max); λ is a multiple of the default λ
_RANK_WIDGETS = ("method", "alpha", "beta", "ratio", "use_learnability", "use_relevance", "rank_normalized",
                 "guard_mads")  # fmt: skip
DEFAULTS: dict[str, Any] = {
    **{key: value for key, value in asdict(RankParams()).items() if key in _RANK_WIDGETS},
    "lam_factor": 1.0,
    "preset": "default",
}


def preset_state(name: str) -> dict[str, Any]:
    """The Scores page's widget values of a scoring preset (chips_core.scoring.params.PRESETS)."""
    p = RankParams.preset(name)
    return {
        "blocks": list(parse_blocks(p.blocks)),
        "damping": p.damping,
        "normalize": p.normalize,
        "guard_on": p.guard != "none",
        "agreement": p.agreement,
        "clipscore_weight": p.clipscore_weight,
    }


def apply_preset() -> None:
    """on_change of the preset box: load the preset's blocks, damping, normalisation, guard and weights."""
    st.session_state.update(preset_state(st.session_state["preset"]))


def keep_widget_state() -> None:
    """Re-assign persistent widget keys so Streamlit keeps them while another page is shown."""
    for key in PERSISTENT_KEYS:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]
    for key, value in {**DEFAULTS, **preset_state(st.session_state.get("preset", "default"))}.items():
        st.session_state.setdefault(key, value)


@st.cache_resource(show_spinner=False)
def _demo_path(override: str) -> str:
    """Where the demo workspace lives (keyed by env CHIPS_DEMO_WS; the bundle is hashed once per server)."""
    from chips_core import demo

    return str(demo.default_path())


def demo_workspace_path() -> str:
    """The bundled demo workspace once it is built; until then this page follows its build, a background
    `chips demo` job recorded in the demo folder (one job for every session), and stops."""
    from app import jobs_view
    from chips_core import demo

    path = _demo_path(os.environ.get("CHIPS_DEMO_WS", ""))
    if st.session_state.get("demo_ready") == path or demo.is_complete(path):
        st.session_state["demo_ready"] = path
        return path
    ws = demo.init_folder(path)
    st.title("Preparing the demo workspace")
    st.markdown(
        "First start: the bundled demo (images, captions with planted mistakes, a tiny CLIP) is ingested, "
        "featurized, prepared and mapped by the library's real pipeline, in about a minute. It opens by "
        "itself when done. To curate your own data instead, type a workspace folder in the sidebar."
    )
    jobs_view.background_step(ws, "demo", ["demo", path], "Building the demo workspace")


def workspace_choice_allowed() -> bool:
    """Whether a user may open or create another workspace folder: only in single-user mode. With sign-in,
    the team's workspace is the one the server was started with (env CHIPS_WORKSPACE), so a signed-in user
    cannot read or create other folders on the server."""
    from app import auth

    return not auth.provider_configured()


def workspace_path() -> tuple[str, bool]:
    """(path, is_demo): the sidebar's choice (single-user mode only), else env CHIPS_WORKSPACE, else the
    bundled demo (while it is being built, the build's progress is shown and the page stops)."""
    typed = st.session_state.get("ws_path") if workspace_choice_allowed() else None
    chosen = typed or os.environ.get("CHIPS_WORKSPACE", "")
    if chosen.strip():
        return str(Path(chosen.strip()).expanduser().resolve()), False
    try:
        return demo_workspace_path(), True
    except store.WorkspaceError as exc:  # a broken or missing demo bundle: say so, point to one's own data
        st.error(
            f"The bundled demo workspace cannot be built: {exc}. Type a workspace folder in the sidebar "
            "(a new one is created on the Workspace page)."
        )
        st.stop()


def workspace() -> store.Workspace:
    """The current workspace; stops the page with a clear message when the path is not a workspace."""
    path, _ = workspace_path()
    ws = store.Workspace(path)
    try:
        ws.check()
    except store.WorkspaceError as exc:
        st.error(f"{exc}. Create it on the Workspace page, or fix the path in the sidebar.")
        st.stop()
    return ws


def pools(ws: store.Workspace, kind: str) -> pd.DataFrame:
    """Pools of one kind ('pool' | 'eval') with their pair counts, oldest first."""
    df = catalog.pools_overview(ws, kind).rename(columns={"pairs": "n_pairs"})
    return df[["pool_id", "name", "source", "format", "status", "n_pairs"]]


@dataclass(frozen=True)
class ScoringContext:
    """The pool, eval set and finished scoring cache the Scores/Map/Browse/Export pages work on."""

    ws_root: str
    pool_id: int
    pool_name: str
    eval_id: int
    eval_name: str
    pool_run_id: int
    cache_id: int
    cache_dir: str
    blocks: str
    blocks_missing: str | None = None  # blocks asked for on the Scores page that no finished cache scores


def caches(ws: store.Workspace) -> pd.DataFrame:
    """Finished scoring caches with their pool and eval set names: those of the model each pool was first
    featurized with (not a later CPT checkpoint's features, e.g. TracIn's) first, then newest first."""
    return catalog.finished_caches(ws)


def scoring_context(ws: store.Workspace) -> ScoringContext:
    """The newest finished cache for the sidebar's pool and eval set; stops the page when there is none."""
    df = caches(ws)
    if df.empty:
        st.info(
            "This workspace has no finished scoring cache yet. On the Workspace page add a pool and an eval "
            "set, run featurize on both, then prepare."
        )
        st.stop()
    for key, column in (("pool_name", "pool_name"), ("eval_name", "eval_name")):
        chosen = st.session_state.get(key)
        if chosen is not None:
            df = df[df[column] == chosen]
    if df.empty:
        st.info(
            f"Pool **{st.session_state.get('pool_name')}** has no finished scoring cache against eval set "
            f"**{st.session_state.get('eval_name')}** yet: featurize both and run prepare on the Workspace "
            "page, or pick another pair in the sidebar."
        )
        st.stop()
    df = df.assign(blocks=[_cache_blocks(c) for c in df["config"]])
    wanted = ",".join(parse_blocks(st.session_state.get("blocks") or DEFAULT_BLOCKS))
    hit = df[df["blocks"] == wanted]
    r = (hit if len(hit) else df).iloc[0]
    choices = k_choices(int(load_cache(str(r["dir"])).k_max))
    if st.session_state.get("k") not in choices:  # none yet, or a k this cache lacks (another cache, a URL)
        st.session_state["k"] = default_k(choices[-1])
    return ScoringContext(
        ws.root.as_posix(),
        int(r["pool_id"]),
        str(r["pool_name"]),
        int(r["eval_id"]),
        str(r["eval_name"]),
        int(r["pool_run_id"]),
        int(r["cache_id"]),
        str(r["dir"]),
        str(r["blocks"]),
        None if len(hit) else wanted,
    )


def _cache_blocks(config_json: str) -> str:
    """The parameter blocks a cache scores (caches made before blocks existed scored all of them)."""
    import json

    return ",".join(parse_blocks(json.loads(config_json).get("blocks", ",".join(BLOCKS))))


def k_choices(k_max: int) -> list[int]:
    """The sketch dimensions the Scores page offers: powers of two from 8 up to k_max, the library's default
    k (`params.default_k`, whose ranking prepare stores with the cache) and k_max."""
    return sorted({*(k for k in (2**i for i in range(3, 20)) if k <= k_max), default_k(k_max), k_max})


@st.cache_resource(max_entries=4, show_spinner="Loading the scoring cache…")
def load_cache(cache_dir: str) -> Any:
    """The ScoringCache of a finished prepare (immutable on disk, so one copy per server is enough)."""
    from chips_core.scoring.cache import ScoringCache

    return ScoringCache.load(cache_dir)


@st.cache_data(max_entries=4, show_spinner=False)
def pairs_table(ws_root: str, pool_id: int, n_rows: int) -> pd.DataFrame:
    """pair_id, filepath, caption, label of a pool, indexed by pair_id (`n_rows` keys the cache)."""
    ws = store.Workspace(ws_root)
    df = catalog.pairs_frame(ws, pool_id)
    return df.set_index("pair_id")


def pool_pairs(ctx: ScoringContext) -> pd.DataFrame:
    """The pool's pairs (cached while the pool's row count is unchanged)."""
    ws = store.Workspace(ctx.ws_root)
    n = catalog.count_pairs(ws, ctx.pool_id)
    return pairs_table(ctx.ws_root, ctx.pool_id, n)


def pairs_of(ctx: ScoringContext, pair_ids: list[int]) -> pd.DataFrame:
    """pair_id (index), filepath, caption, label of just these pairs of the pool (a page's visible rows:
    a server's first page does not read the whole pool's table for them)."""
    df = catalog.pairs_frame(store.Workspace(ctx.ws_root), ctx.pool_id, pair_ids=[int(i) for i in pair_ids])
    return df.set_index("pair_id")


def rank_params() -> dict[str, Any]:
    """The ranking parameters chosen on the Scores page (shared by every page)."""
    s = st.session_state
    return {
        "method": s["method"],
        "alpha": float(s["alpha"]),
        "lam_factor": float(s["lam_factor"]),
        "k": s.get("k"),
        "beta": float(s["beta"]),
        "ratio": float(s["ratio"]),
        "use_learnability": bool(s["use_learnability"]),
        "use_relevance": bool(s["use_relevance"]),
        "rank_normalized": bool(s["rank_normalized"]),
        "damping": s["damping"],
        "normalize": bool(s["normalize"]),
        "guard": "mad" if s["guard_on"] else "none",
        "guard_mads": float(s["guard_mads"]),
        "agreement": float(s["agreement"]),
        "clipscore_weight": float(s["clipscore_weight"]),
        "preset": s["preset"],
    }


Key = tuple[tuple[str, Any], ...]  # RankParams as sorted (field, value) pairs: a cache key


def _key(params: RankParams) -> Key:
    return tuple(sorted(asdict(params).items()))


@st.cache_resource(max_entries=12, show_spinner=False)
def _rank_cached(cache_dir: str, params: Key, stability: bool) -> Any:
    """One ranking per (cache, parameters but the selection ratio): page switches, reruns and ratio changes
    reuse it instead of re-ranking (`stability`: whether the ranking stability is computed). The solve is
    read from the cache folder when stored there (by prepare, or by an earlier server: `stored=True`), so a
    server's first page shows the default ranking without solving or importing torch."""
    from chips_core.scoring.ranking import rank

    return rank(load_cache(cache_dir), RankParams(**dict(params)), stability=stability, stored=True)


@st.cache_resource(max_entries=8, show_spinner=False)
def _selected(cache_dir: str, params: Key, stability: bool) -> Any:
    """The ranking of `params` at their selection ratio: the ratio-free ranking with its cut-off moved
    (`chips_core.scoring.ranking.reselect`, the same table as ranking again at that ratio)."""
    from chips_core.scoring.ranking import reselect

    p = RankParams(**dict(params))
    return reselect(_rank_cached(cache_dir, _key(p.replace(ratio=RANK_RATIO)), stability), p.ratio)


def page_params(ctx: ScoringContext, **changes: Any) -> RankParams:
    """The RankParams of the Scores page's choices with `changes`, at the default λ (lam_factor aside)."""
    p = rank_params() | changes
    chips = p["method"] == "chips"
    return RankParams(
        method=p["method"],
        alpha=p["alpha"],
        k=p["k"],
        beta=p["beta"],
        ratio=p["ratio"],
        use_learnability=p["use_learnability"],
        use_relevance=p["use_relevance"],
        rank_normalized=p["rank_normalized"],
        blocks=ctx.blocks,
        damping=p["damping"],
        normalize=p["normalize"],
        guard=p["guard"] if chips else "none",
        guard_mads=p["guard_mads"],
        agreement=p["agreement"] if chips else 0.0,  # the baselines ignore both: one cached ranking each
        clipscore_weight=p["clipscore_weight"] if chips else 0.0,
    )


def current_rank(ctx: ScoringContext, compared: bool = False, **changes: Any) -> Any:
    """The RankResult for the Scores page's parameters with `changes` (λ = lam_factor × the damping rule's
    default λ; no model is run). Its `params` are the RankParams it was ranked with. `compared`: a ranking
    only compared with the one on screen, whose ranking stability is not computed."""
    params = page_params(ctx, **changes)
    lam_factor = (rank_params() | changes)["lam_factor"]
    if lam_factor != 1.0:  # λ only exists for chips / trak: λ_base is read off the default λ's ranking
        lam_base = _selected(ctx.cache_dir, _key(params), False).info.get("lam_base")
        if lam_base is not None:
            params = params.replace(lam=float(lam_base) * lam_factor)
    return _selected(ctx.cache_dir, _key(params), not compared)


@st.cache_data(show_spinner=False)
def _demo_planted() -> pd.Series:
    from chips_core import demo

    return demo.ground_truth("pool").set_index("pair_id")["planted"]


def demo_planted(ctx: ScoringContext) -> pd.Series | None:
    """In the bundled demo's pool: the planted mistake of each pair (none | mismatch | off_domain)."""
    from chips_core import demo

    if not workspace_path()[1] or ctx.pool_name != demo.POOL_NAME:
        return None
    return _demo_planted()

"""A dashboard server's first Scores page (issue 12: no page blocks for more than 2 s): it reads the default
ranking's solves stored with the scoring cache instead of solving, imports no torch, shows the library's
ranking, and stores the solves of a cache prepared before they were stored. Real workspace, AppTest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app.histograms import nice_ticks
from chips_core.scoring import stored
from chips_core.scoring.cache import ScoringCache
from chips_core.scoring.params import RankParams
from chips_core.scoring.ranking import rank
from chips_core.workspace import catalog, store
from tests.app.workspace_build import POOL

pytestmark = pytest.mark.app

ROOT = Path(__file__).resolve().parents[2]
MAIN = str(ROOT / "app" / "main.py")

# a fresh interpreter (as a server's first run): which thread first imports torch and scipy.linalg, and
# whether the Scores page had drawn its histograms by then (app.histograms imported)
FIRST_RUN = """
import json, sys, threading
first = {}
def hook(event, args):
    if event == "import" and args[0] in ("torch", "scipy.linalg") and args[0] not in first:
        first[args[0]] = [threading.current_thread().name, "app.histograms" in sys.modules]
sys.addaudithook(hook)
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[1], default_timeout=180)
at.run()
assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
table = next(df.value for df in at.dataframe if "rank" in df.value.columns)
print(json.dumps({"first": first, "ids": table["pair_id"].tolist(), "captions": table["caption"].tolist(),
                  "k": at.session_state["k"]}))
"""


def _cache(ws_root: Path) -> ScoringCache:
    with store.Workspace(ws_root).connect(read_only=True) as con:
        row = con.execute("SELECT dir FROM scoring_caches WHERE status = 'done'").fetchone()
    return ScoringCache.load(row[0])


def _settings(k: int, alpha: float) -> dict:
    """The solve settings the page's default ranking (or one of its α ends) is stored under."""
    p = RankParams()
    return {
        "solve": "newton",
        "k": k,
        "alpha": alpha,
        "lam": None,
        "damping": p.damping,
        "normalize": p.normalize,
    }


def _page_ids_are_the_library_ranking(ids: list[str], cache: ScoringCache, k: int) -> None:
    frame = rank(cache, RankParams(k=k)).frame.sort_values("rank")
    assert ids == frame["pair_id"].astype(str).head(len(ids)).tolist()


def test_first_run_reads_the_stored_ranking_without_torch(tiny_workspace):
    cache = _cache(tiny_workspace)
    for alpha in (RankParams().alpha, 0.0, 1.0):  # stored by the workspace's prepare step
        assert stored.read(cache, _settings(cache.k_max // 2, alpha)) is not None
    out = subprocess.run(
        [sys.executable, "-c", FIRST_RUN, MAIN], check=True, capture_output=True, text=True, cwd=ROOT
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # torch and scipy.linalg: not imported by the page's run, only by the warm-up thread after it (if yet)
    assert all(who == ["warm-imports", True] for who in seen["first"].values()), seen["first"]
    _page_ids_are_the_library_ranking(seen["ids"], cache, seen["k"])
    ws = store.Workspace(tiny_workspace)
    pairs = catalog.pairs_frame(ws, catalog.pool_id(ws, POOL)).set_index("pair_id")
    assert pairs.index.is_unique and len(pairs) >= len(seen["ids"])
    assert seen["captions"] == [pairs.loc[int(i), "caption"] for i in seen["ids"]]  # each row's own caption


def test_a_cache_without_stored_solves_gets_them_on_its_first_page(tiny_workspace):
    """A cache prepared before solves were stored: the first page solves (the library's ranking) and stores
    them, so the next server's first page reads them."""
    import streamlit as st

    cache = _cache(tiny_workspace)
    shutil.rmtree(cache.root / stored.FOLDER)
    st.cache_resource.clear()  # a new server: no ranking of this cache in memory (other tests ranked it)
    at = AppTest.from_file(MAIN, default_timeout=180)
    at.run()
    assert not at.exception and not at.error
    ids = next(df.value for df in at.dataframe if "rank" in df.value.columns)["pair_id"].tolist()
    _page_ids_are_the_library_ranking(ids, cache, at.session_state["k"])
    records = sorted(p.name for p in (cache.root / stored.FOLDER).glob("*.npz"))
    assert len(records) == 3  # the ranking on screen and the α range's ends of its caption
    fresh = ScoringCache.load(cache.root)
    k = at.session_state["k"]
    for alpha, stability in ((RankParams().alpha, True), (0.0, False), (1.0, False)):
        hit = stored.read(fresh, _settings(k, alpha))
        assert hit is not None
        assert (hit[1].get("stability_rows") is not None) == stability


def test_nice_ticks_are_round_and_inside_the_range():
    assert nice_ticks(0, 5000, 4) == [0, 2000, 4000]
    assert nice_ticks(-0.0055, 0.0115, 5) == [-0.005, 0.0, 0.005, 0.01]
    assert nice_ticks(0.47, 0.63, 5) == [0.5, 0.55, 0.6]
    assert nice_ticks(1.0, 1.0) == [1.0]


def test_a_histogram_counts_whole_pairs():
    """Small counts: y ticks at whole numbers of pairs only; each non-empty bin's tooltip gives its counts."""
    import re

    import numpy as np

    from app.histograms import chart_svg
    from chips_core.curation.selection import Histogram

    svg = chart_svg(
        Histogram(np.array([0.1, 0.2, 0.3]), np.array([1, 0, 0]), np.array([0, 0, 1])), "t", "score"
    )
    assert re.findall(r'text-anchor="end">([^<]+)<', svg) == ["0", "1"]
    assert re.findall(r"<title>([^<]+)</title>", svg) == [
        "0.05 to 0.15: 1 selected, 0 not selected",
        "0.25 to 0.35: 0 selected, 1 not selected",
    ]


def test_the_page_offers_and_defaults_to_the_library_default_k():
    """The k the Scores page starts at is the one `rank` and `chips score` default to (half of k_max) and
    whose solve prepare stores, also when k_max is not a power of two (prepare caps it to the pool's rank)."""
    from app import context

    assert context.k_choices(48) == [8, 16, 24, 32, 48]  # rank's default for k_max 48: 24
    assert context.k_choices(1000) == [8, 16, 32, 64, 128, 256, 500, 512, 1000]
    assert context.k_choices(64) == [8, 16, 32, 64]

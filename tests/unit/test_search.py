"""Caption search and filters (`curation.search.search_pairs`) on a real DuckDB workspace, against the same
filters computed independently in pandas from the stored score run, pairs and decisions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from chips_core.curation import selection as sel
from chips_core.curation.search import search_pairs
from chips_core.workspace.store import Workspace
from tests.pool_rows import add_pool

pytestmark = pytest.mark.unit

N = 60
WORDS = ["Chest X-ray", "axial CT of the abdomen", "MRI brain, T2", "chest CT with contrast", "Fundus photo"]
LABELS = ["xray", "ct", "mri", "ct", None]


def _workspace(tmp_path):
    """One pool of N pairs (captions and labels from WORDS/LABELS), a stored score run, some decisions."""
    ws = Workspace.init(tmp_path / "ws")
    rng = np.random.default_rng(3)
    ids = np.unique(rng.integers(-(10**12), 10**12, 4 * N))[:N]
    rng.shuffle(ids)
    pairs = pd.DataFrame(
        {
            "pair_id": ids,
            "row_index": np.arange(N),
            "filepath": [f"/img/{i}.png" for i in range(N)],
            "caption": [f"{WORDS[i % 5]} case {i}" for i in range(N)],
            "label": [LABELS[i % 5] for i in range(N)],
        }
    )
    add_pool(ws, pairs)
    score = rng.normal(size=N)
    rank = np.empty(N, np.int64)
    rank[np.argsort(-score)] = np.arange(1, N + 1)
    ranking = pd.DataFrame(
        {
            "pair_id": ids,
            "alignment": rng.normal(size=N),
            "learnability": rng.uniform(0, 2, N),
            "relevance": rng.uniform(0.27, 0.73, N),
            "score": score,
            "rank": rank,
        }
    )
    run = sel.record_score_run(ws, "pool", ranking, method="chips")
    sel.record_decisions(ws, "pool", ids[:6].tolist(), "include")
    sel.record_decisions(ws, "pool", ids[6:12].tolist(), "exclude")
    sel.record_decisions(ws, "pool", ids[[0, 6]].tolist(), "clear")  # back to no decision
    sel.record_decisions(ws, "pool", [int(ids[1])], "note", note="keeps its include")
    return ws, run, ranking, pairs


def _expected(ranking, pairs, decisions, text=None, ranges=None, decision=None, label=None, order="rank"):
    """The same search in pandas, over the whole table."""
    df = ranking.merge(pairs[["pair_id", "filepath", "caption", "label"]], on="pair_id")
    state = decisions.set_index("pair_id")["state"]
    df["state"] = df["pair_id"].map(state)
    keep = pd.Series(True, index=df.index)
    for word in (text or "").split():
        keep &= df["caption"].str.lower().str.contains(word.lower(), regex=False)
    for col, (lo, hi) in (ranges or {}).items():
        if lo is not None:
            keep &= df[col] >= lo
        if hi is not None:
            keep &= df[col] <= hi
    if decision is not None:
        wanted = [decision] if isinstance(decision, str) else decision
        st = df["state"].where(df["state"].notna(), "none")
        keep &= st.isin(wanted)
    if label is not None:
        keep &= df["label"].isin([label] if isinstance(label, str) else label)
    df = df[keep]
    key = order.removeprefix("-")
    return df.sort_values([key, "rank"], ascending=[not order.startswith("-"), True])


CASES = [
    {},
    {"text": "chest"},
    {"text": "CT chest"},  # every word, any order, any case
    {"text": "x-ray"},
    {"text": "no such caption"},
    {"ranges": {"alignment": (0.0, None)}},
    {"ranges": {"learnability": (0.5, 1.5), "relevance": (None, 0.5)}},
    {"decision": "include"},
    {"decision": "exclude"},
    {"decision": "none"},
    {"decision": ["include", "none"]},
    {"label": "ct"},
    {"label": ["mri", "xray"]},
    {"text": "ct", "decision": "none", "ranges": {"score": (-0.5, 1.0)}, "order": "-rank"},
    {"order": "-rank"},
    {"order": "-alignment", "label": "ct"},
    {"order": "relevance"},
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("stored", [True, False], ids=["score-run", "frame"])
def test_search_matches_pandas(tmp_path, case, stored):
    ws, run, ranking, pairs = _workspace(tmp_path)
    decisions = sel.current_decisions(ws, "pool")
    expect = _expected(ranking, pairs, decisions, **case)
    source = run if stored else ranking
    page, total = search_pairs(ws, "pool", source, limit=None, **case)
    assert total == len(expect)
    assert page["pair_id"].tolist() == expect["pair_id"].tolist()
    assert page["caption"].tolist() == expect["caption"].tolist()
    assert page["label"].fillna("").tolist() == expect["label"].fillna("").tolist()
    assert page["state"].fillna("none").tolist() == expect["state"].fillna("none").tolist()
    assert np.allclose(page["score"], expect["score"])
    # pages: consecutive slices of the same order, the total on each
    for offset in (0, 7, 14):
        part, n = search_pairs(ws, "pool", source, limit=7, offset=offset, **case)
        assert n == len(expect)
        assert part["pair_id"].tolist() == expect["pair_id"].tolist()[offset : offset + 7]


def test_search_pages_past_the_end_and_random_order(tmp_path):
    ws, run, ranking, _ = _workspace(tmp_path)
    page, total = search_pairs(ws, "pool", run, text="chest", limit=5, offset=1000)
    assert page.empty and total == 24  # "Chest X-ray" and "chest CT", 12 each of 60
    a, n = search_pairs(ws, "pool", run, order="random", seed=1, limit=None)
    b, _ = search_pairs(ws, "pool", run, order="random", seed=1, limit=None)
    c, _ = search_pairs(ws, "pool", run, order="random", seed=2, limit=None)
    assert n == N and a["pair_id"].tolist() == b["pair_id"].tolist()  # a fixed shuffle per seed
    assert (
        sorted(a["pair_id"]) == sorted(ranking["pair_id"]) and a["pair_id"].tolist() != c["pair_id"].tolist()
    )


def test_search_refuses_unknown_filters(tmp_path):
    ws, run, _, _ = _workspace(tmp_path)
    with pytest.raises(sel.SelectionError, match="no component"):
        search_pairs(ws, "pool", run, ranges={"rank; DROP TABLE pairs": (0, 1)})
    with pytest.raises(sel.SelectionError, match="decision state"):
        search_pairs(ws, "pool", run, decision="maybe")
    with pytest.raises(sel.SelectionError, match="order by"):
        search_pairs(ws, "pool", run, order="caption")
    # a score run stored before the agreement component existed has no such column: a clear refusal
    with pytest.raises(sel.SelectionError, match="order by"):
        search_pairs(ws, "pool", run, order="-agreement")
    with pytest.raises(sel.SelectionError, match="no component"):
        search_pairs(ws, "pool", run, ranges={"agreement": (0.5, None)})
    with pytest.raises(sel.SelectionError):
        search_pairs(ws, "pool", run + 999)
    page, total = search_pairs(ws, "pool", run, text="it's 100% _odd_", label="o'brien")  # literal text
    assert page.empty and total == 0


def test_search_within_given_pairs(tmp_path):
    """`pair_ids` (e.g. those a ground truth marks) restricts the search, combined with the other filters."""
    ws, run, ranking, pairs = _workspace(tmp_path)
    some = ranking["pair_id"].to_numpy()[::3]
    decisions = sel.current_decisions(ws, "pool")
    for source in (run, ranking):
        for case in ({}, {"text": "ct", "order": "-rank"}, {"decision": "none", "label": ["ct", "mri"]}):
            expect = _expected(ranking, pairs, decisions, **case)
            expect = expect[expect["pair_id"].isin(some)]
            page, total = search_pairs(ws, "pool", source, pair_ids=some.tolist(), limit=None, **case)
            assert total == len(expect) > 0
            assert page["pair_id"].tolist() == expect["pair_id"].tolist()
    page, total = search_pairs(ws, "pool", run, pair_ids=[], limit=None)
    assert page.empty and total == 0

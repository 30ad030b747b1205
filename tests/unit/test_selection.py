"""Decisions (append-only, latest wins), score runs, versioned selections and their diff on a real DuckDB."""

import numpy as np
import pandas as pd
import pytest

from chips_core.curation import selection as sel
from chips_core.workspace.store import Workspace
from tests.pool_rows import add_pool

pytestmark = pytest.mark.unit

N = 20


def make_ws(tmp_path, n=N, name="pool"):
    """A workspace with one pool of n pairs written straight into the schema (no images needed here)."""
    ws = Workspace.init(tmp_path / "ws")
    ids = np.arange(n, dtype=np.int64) * 7919 - 50_000
    pairs = pd.DataFrame(
        {
            "pair_id": ids,
            "row_index": np.arange(n),
            "filepath": [f"/img/{i}.png" for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)],
        }
    )
    add_pool(ws, pairs, name)
    return ws, ids


def ranking(ids, seed=0):
    """A ranking table as scoring.rank produces: best score first gets rank 1."""
    rng = np.random.default_rng(seed)
    score = rng.normal(size=len(ids))
    order = np.argsort(-score)
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(1, len(ids) + 1)
    return pd.DataFrame(
        {
            "pair_id": ids,
            "alignment": score,
            "learnability": np.ones(len(ids)),
            "relevance": np.full(len(ids), 0.5),
            "score": score,
            "rank": rank,
        }
    )


def test_latest_decision_wins_and_notes_accumulate(tmp_path):
    ws, ids = make_ws(tmp_path)
    sel.record_decision(ws, "pool", ids[0], "include", author="ana")
    sel.record_decision(ws, "pool", ids[0], "exclude", note="blurry", author="ben")
    sel.record_decision(ws, "pool", ids[1], "exclude")
    sel.record_decision(ws, "pool", ids[1], "clear")
    sel.record_decision(ws, "pool", ids[2], "note", note="check label")
    cur = sel.current_decisions(ws, "pool").set_index("pair_id")
    assert cur.loc[ids[0], "state"] == "exclude"
    assert cur.loc[ids[0], "note"] == "blurry"
    assert cur.loc[ids[0], "author"] == "ben"
    assert ids[1] not in cur.index  # cleared, no note
    assert cur.loc[ids[2], "state"] is None and cur.loc[ids[2], "note"] == "check label"
    hist = sel.decision_history(ws, "pool", ids[0])
    assert list(hist["action"]) == ["include", "exclude"]  # nothing was overwritten


def test_bad_decisions_are_refused_whole(tmp_path):
    ws, ids = make_ws(tmp_path)
    with pytest.raises(sel.SelectionError, match="not in pool"):
        sel.record_decisions(ws, "pool", [ids[0], 12345], "exclude")
    with pytest.raises(sel.SelectionError, match="unknown decision"):
        sel.record_decision(ws, "pool", ids[0], "maybe")
    with pytest.raises(sel.SelectionError, match="no pool named"):
        sel.record_decision(ws, "nope", ids[0], "include")
    with pytest.raises(sel.SelectionError, match="needs a non-empty note"):
        sel.record_decision(ws, "pool", ids[0], "note", note="  ")
    assert sel.decision_history(ws, "pool").empty


def test_selection_applies_decisions_at_fixed_budget(tmp_path):
    ws, ids = make_ws(tmp_path)
    r = ranking(ids)
    best = r.sort_values("rank")["pair_id"].to_numpy()
    worst = best[-1]
    sel.record_decision(ws, "pool", best[0], "exclude")
    sel.record_decision(ws, "pool", worst, "include")
    sid = sel.save_selection(ws, "pool", r, ratio=0.25, name="top")
    info = sel.get_selection(ws, sid)
    assert (info.name, info.version, info.n_selected) == ("top", 1, 5)  # ceil(0.25 * 20)
    m = sel.selection_members(ws, sid)
    assert best[0] not in set(m["pair_id"])
    assert worst in set(m["pair_id"])
    assert set(m.loc[m["source"] == "score", "pair_id"]) == set(best[1:5])
    assert m.loc[m["pair_id"] == worst, "source"].item() == "include"
    assert info.params["decisions"] == {"include": [int(worst)], "exclude": [int(best[0])]}
    assert set(m["caption"]) <= {f"caption {i}" for i in range(N)}


def test_versions_and_diff(tmp_path):
    ws, ids = make_ws(tmp_path)
    run = sel.record_score_run(ws, "pool", ranking(ids), method="chips", params={"alpha": 0.7})
    a = sel.save_selection(ws, "pool", run, ratio=0.3, name="s")
    top = sel.load_score_run(ws, run)["pair_id"].to_numpy()
    sel.record_decision(ws, "pool", top[0], "exclude")
    b = sel.save_selection(ws, "pool", run, ratio=0.3, name="s")
    assert sel.get_selection(ws, "s").selection_id == b
    assert sel.get_selection(ws, "s@1").selection_id == a
    assert sel.get_selection(ws, "s", version=2).version == 2
    d = sel.diff_selections(ws, "s@1", "s@2")
    assert list(d.only_a) == [top[0]]
    assert list(d.only_b) == [top[6]]
    assert len(d.both) == 5
    assert "5 in both" in d.summary()
    assert sel.get_selection(ws, a).score_run_id == run
    assert sel.get_selection(ws, a).params["score_run"]["params"]["alpha"] == 0.7
    with pytest.raises(sel.SelectionError, match="no selection"):
        sel.get_selection(ws, "s@9")


def test_more_includes_than_budget(tmp_path):
    ws, ids = make_ws(tmp_path)
    sel.record_decisions(ws, "pool", ids[:4], "include")
    sid = sel.save_selection(ws, "pool", ranking(ids), ratio=0.05, name="inc")
    m = sel.selection_members(ws, sid)
    assert sorted(m["pair_id"]) == sorted(ids[:4]) and set(m["source"]) == {"include"}


def test_bad_ratio_and_foreign_score_run(tmp_path):
    ws, ids = make_ws(tmp_path)
    with pytest.raises(sel.SelectionError, match="ratio"):
        sel.save_selection(ws, "pool", ranking(ids), ratio=0.0, name="x")
    with pytest.raises(sel.SelectionError, match="no score run"):
        sel.save_selection(ws, "pool", 999, ratio=0.5, name="x")
    with pytest.raises(sel.SelectionError, match="lacks column"):
        sel.save_selection(ws, "pool", pd.DataFrame({"pair_id": ids}), ratio=0.5, name="x")


def test_ids_are_never_reused(tmp_path):
    ws, ids = make_ws(tmp_path)
    runs = [sel.record_score_run(ws, "pool", ranking(ids, seed), method="random") for seed in range(3)]
    fresh = [ws.new_id() for _ in range(3)]
    dec = sel.record_decisions(ws, "pool", ids[:3], "exclude")
    all_ids = runs + fresh + dec
    assert len(set(all_ids)) == len(all_ids)

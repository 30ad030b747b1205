"""Curation: per-pair decisions (append-only), score runs on disk, and named, versioned selections.

Decisions are never updated or deleted: every include / exclude / clear / note is a new row, and the latest
include|exclude|clear row per pair is its current state (a `note` row only adds a note). A selection is a
frozen list of pair ids taken from one stored score run plus the decisions in force when it was saved, so
an export can always say exactly what produced it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from chips_core.team import audit, roles
from chips_core.team.identity import Actor, current_actor
from chips_core.workspace import catalog, store
from chips_core.workspace.store import Workspace, WorkspaceError, atomic_path

ACTIONS = ("include", "exclude", "clear", "note")
RANK_COLUMNS = ("pair_id", "alignment", "learnability", "relevance", "score", "rank")


class SelectionError(WorkspaceError):
    """A curation problem with a message meant for the user (unknown pool, pair, selection...)."""


@dataclass(frozen=True)
class SelectionInfo:
    """One saved selection (a row of `selections`)."""

    selection_id: int
    name: str
    version: int
    pool_id: int
    score_run_id: int | None
    ratio: float
    params: dict[str, Any]
    n_selected: int
    created_at: Any


@dataclass(frozen=True)
class SelectionDiff:
    """Pair ids only in `a`, only in `b`, and in both (each sorted)."""

    a: SelectionInfo
    b: SelectionInfo
    only_a: np.ndarray
    only_b: np.ndarray
    both: np.ndarray

    def summary(self) -> str:
        """One line for people: sizes of the three parts."""
        return (
            f"{self.a.name} v{self.a.version} vs {self.b.name} v{self.b.version}: "
            f"{len(self.both)} in both, {len(self.only_a)} only in the first, "
            f"{len(self.only_b)} only in the second"
        )


def resolve_pool(ws: Workspace, pool: str | int) -> int:
    """The pool_id of a pool given by name or id; a SelectionError names it when it does not exist."""
    ws.check()
    try:
        return catalog.pool_id(ws, int(pool) if isinstance(pool, np.integer) else pool)
    except catalog.UnknownPoolError:
        raise SelectionError(f"no pool named {pool!r} in workspace {ws.root}") from None


def record_decisions(
    ws: Workspace,
    pool: str | int,
    pair_ids: Iterable[int],
    action: str,
    note: str | None = None,
    author: str | None = None,
    score_run_id: int | None = None,
    actor: Actor | None = None,
) -> list[int]:
    """Append one decision row per pair (same action, note, author); returns the new decision ids.

    Every pair must belong to the pool: unknown ids are refused as a whole, naming a few of them, so a
    bulk lasso never half-applies. `actor` (default: the local user, or the user a background job runs
    for) must be a curator; the rows carry their subject and e-mail, and `author` defaults to their name.
    """
    if action not in ACTIONS:
        raise SelectionError(f"unknown decision {action!r}; use one of {', '.join(ACTIONS)}")
    if action == "note" and not (note and note.strip()):
        raise SelectionError("a 'note' decision needs a non-empty note")
    ids = np.unique(np.asarray(list(pair_ids), dtype=np.int64))
    if len(ids) == 0:
        return []
    pool_id = resolve_pool(ws, pool)
    actor = current_actor(actor)
    roles.require(ws, actor, "decide", pool_id=pool_id, pair_ids=ids, detail=f"{action} {len(ids)} pair(s)")
    author = author or actor.display
    with ws.connect() as con:
        missing = catalog.missing_pairs(con, pool_id, ids)
        if missing:
            shown = ", ".join(str(r) for r in missing)
            raise SelectionError(f"pair id(s) {shown} not in pool {pool!r}; no decision recorded")
        if score_run_id is not None:
            _check_score_run(con, score_run_id, pool_id)
        decision_ids = catalog.next_ids(con, len(ids))
        rows = pd.DataFrame(
            {
                "decision_id": np.asarray(decision_ids, dtype=np.int64),
                "pool_id": pool_id,
                "pair_id": ids,
                "action": action,
                "note": note,
                "author": author,
                "score_run_id": score_run_id,
                "subject": actor.subject,
                "email": actor.email,
            }
        )
        catalog.insert_decisions(con, rows)
    return decision_ids


def record_decision(
    ws: Workspace,
    pool: str | int,
    pair_id: int,
    action: str,
    note: str | None = None,
    author: str | None = None,
    score_run_id: int | None = None,
    actor: Actor | None = None,
) -> int:
    """Append one decision (include | exclude | clear | note) for one pair; returns its decision id."""
    return record_decisions(ws, pool, [pair_id], action, note, author, score_run_id, actor)[0]


def current_decisions(ws: Workspace, pool: str | int, with_cleared: bool = False) -> pd.DataFrame:
    """The decisions in force: one row per pair that has an include/exclude state or a note
    (`with_cleared`: also per pair whose latest state row is a clear, with state None).

    Columns: pair_id, state ('include' | 'exclude' | None), note (the latest non-empty note), author, email
    and decided_at of the latest row, score_run_id and decision_id of the latest state row.
    """
    pool_id = resolve_pool(ws, pool)
    df = catalog.current_decisions(ws, pool_id, with_cleared)
    for col in ("state", "note", "author", "email"):
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    return df


def decision_history(ws: Workspace, pool: str | int, pair_id: int | None = None) -> pd.DataFrame:
    """Every decision row of a pool (or of one pair), oldest first: the audit trail."""
    pool_id = resolve_pool(ws, pool)
    return catalog.decision_history(ws, pool_id, pair_id)


def _check_score_run(con: Any, score_run_id: int, pool_id: int) -> None:
    owner = catalog.score_run_pool_id(con, score_run_id)
    if owner is None:
        raise SelectionError(f"no score run {score_run_id}")
    if owner != pool_id:
        raise SelectionError(f"score run {score_run_id} belongs to another pool (pool_id {owner})")


def rank_frame(rank_result: Any) -> pd.DataFrame:
    """The per-pair table of a ranking as a DataFrame with at least RANK_COLUMNS.

    Accepts a DataFrame, a RankResult (anything with a `.frame`/`.df`/`.table` DataFrame or a
    `to_frame()`/`to_pandas()` method) or a mapping of equal-length arrays.
    """
    df = None
    if isinstance(rank_result, pd.DataFrame):
        df = rank_result
    else:
        for name in ("to_frame", "to_pandas"):
            if callable(getattr(rank_result, name, None)):
                df = getattr(rank_result, name)()
                break
        else:
            for name in ("frame", "df", "table"):
                if isinstance(getattr(rank_result, name, None), pd.DataFrame):
                    df = getattr(rank_result, name)
                    break
            else:
                if isinstance(rank_result, dict):
                    df = pd.DataFrame(rank_result)
    if df is None:
        raise SelectionError(f"cannot read a ranking from {type(rank_result).__name__}")
    missing = [c for c in ("pair_id", "score", "rank") if c not in df.columns]
    if missing:
        raise SelectionError(f"the ranking lacks column(s) {', '.join(missing)}")
    df = df.copy()
    df["pair_id"] = df["pair_id"].astype(np.int64)
    df["rank"] = df["rank"].astype(np.int64)
    if df["pair_id"].duplicated().any():
        raise SelectionError("the ranking lists a pair_id twice")
    return df.sort_values("rank", kind="stable").reset_index(drop=True)


@dataclasses.dataclass(frozen=True)
class Histogram:
    """A component's distribution, split by the selection: bin centres and the pairs per bin."""

    centers: np.ndarray
    selected: np.ndarray
    not_selected: np.ndarray


def histograms(frame: pd.DataFrame, columns: list[str], bins: int = 60) -> dict[str, Histogram]:
    """Per column of a ranking table: `bins` equal bins over its finite values, counted separately for
    the selected pairs and the others (what the Scores page draws: a few hundred numbers, not N rows)."""
    sel = frame["selected"].to_numpy(bool)
    out = {}
    for col in columns:
        values = frame[col].to_numpy(np.float64)
        finite = np.isfinite(values)
        edges = (
            np.histogram_bin_edges(values[finite], bins=bins) if finite.any() else np.linspace(0, 1, bins + 1)
        )
        counts = [np.histogram(values[mask & finite], bins=edges)[0] for mask in (sel, ~sel)]
        out[col] = Histogram((edges[:-1] + edges[1:]) / 2, *counts)
    return out


def record_score_run(
    ws: Workspace,
    pool: str | int,
    rank_result: Any,
    method: str,
    params: dict[str, Any] | None = None,
    cache_id: int | None = None,
) -> int:
    """Store a ranking as ws/scores/score-run-<id>.parquet (atomic) plus a `score_runs` row; returns its id.

    A RankResult's RankParams are stored as `rank_params` (`dataclasses.asdict`: `RankParams(**stored)`
    ranks the same cache the same way again) and its info (lam*, d(lam)/k, fraction with positive
    alignment) as `info`; `params` adds what else belongs to the run (preset, eval set, ...).
    """
    pool_id = resolve_pool(ws, pool)
    df = rank_frame(rank_result)
    info = getattr(rank_result, "info", None)
    full = dict(params or {})
    rank_params = getattr(rank_result, "params", None)
    if dataclasses.is_dataclass(rank_params) and "rank_params" not in full:
        full["rank_params"] = dataclasses.asdict(rank_params)
    if isinstance(info, dict) and "info" not in full:
        full["info"] = info
    score_run_id = ws.new_id()
    path = ws.root / "scores" / f"score-run-{score_run_id}.parquet"
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    catalog.insert_score_run(
        ws, score_run_id, cache_id, pool_id, method, json.dumps(full, default=_json_default), str(path)
    )
    return score_run_id


def load_score_run(ws: Workspace, score_run_id: int) -> pd.DataFrame:
    """The stored per-pair ranking of a score run, best first."""
    row = catalog.score_run_result_path(ws, score_run_id)
    if row is None:
        raise SelectionError(f"no score run {score_run_id} in workspace {ws.root}")
    if not row[0] or not os.path.exists(row[0]):
        raise SelectionError(f"score run {score_run_id}: result file {row[0]} is missing")
    return rank_frame(pd.read_parquet(row[0]))


def score_run_info(ws: Workspace, score_run_id: int) -> dict[str, Any]:
    """The `score_runs` row of a score run as a dict (params decoded)."""
    df = catalog.score_run_row(ws, score_run_id)
    if df.empty:
        raise SelectionError(f"no score run {score_run_id} in workspace {ws.root}")
    out = df.iloc[0].to_dict()
    out["params"] = json.loads(out["params"]) if out["params"] else {}
    return out


def choose_members(ranking: pd.DataFrame, decisions: pd.DataFrame, n_budget: int) -> pd.DataFrame:
    """Apply decisions to a ranking at a fixed budget: the pure rule behind `save_selection`.

    Included pairs are always members (source 'include'); excluded pairs never are; the remaining budget
    n_budget − |included| is filled with the best-ranked pairs that carry no decision (source 'score')
    and that the ranking's guard did not hold out (column `guarded`; a hand include overrides the guard).
    If more pairs are included than the budget, the selection holds all of them and nothing else.
    """
    state = decisions.dropna(subset=["state"]) if len(decisions) else decisions
    include = set(state.loc[state["state"] == "include", "pair_id"].astype(np.int64)) if len(state) else set()
    exclude = set(state.loc[state["state"] == "exclude", "pair_id"].astype(np.int64)) if len(state) else set()
    ranks = dict(zip(ranking["pair_id"].to_numpy(), ranking["rank"].to_numpy(), strict=True))
    inc_rows = pd.DataFrame(
        {
            "pair_id": np.asarray(sorted(include), dtype=np.int64),
            "rank": pd.array([ranks.get(p) for p in sorted(include)], dtype="Int64"),
            "source": "include",
        }
    )
    free = ~ranking["pair_id"].isin(include | exclude)
    if "guarded" in ranking.columns:
        free &= ~ranking["guarded"].fillna(False).astype(bool)
    free = ranking.loc[free, ["pair_id", "rank"]]
    take = free.head(max(n_budget - len(include), 0)).assign(source="score")
    out = pd.concat([inc_rows, take.astype({"rank": "Int64"})], ignore_index=True)
    return out.sort_values(["rank", "pair_id"], na_position="last", kind="stable").reset_index(drop=True)


def save_selection(
    ws: Workspace,
    pool: str | int,
    ranking: Any,
    ratio: float,
    name: str,
    params: dict[str, Any] | None = None,
    method: str | None = None,
    actor: Actor | None = None,
) -> int:
    """Save the top ceil(ratio·N) pairs of a ranking as selection `name` (next version); returns its id.

    `ranking` is a score_run_id or a ranking (RankResult / DataFrame), which is first stored as a score
    run (method taken from `method`, else `params['method']`, else 'chips'; its scoring cache from
    `params['cache_id']` when given, so exports can name the model). Decisions in force are
    applied (see `choose_members`) and copied into the selection's params, with the score run's params;
    the exact decision rows applied (the include / exclude / clear row in force per pair, read in the
    same snapshot as the members) are recorded (`selection_decisions`). `actor` (default: the local user)
    must be a lead; the save is written to the audit trail.
    """
    if not name or not name.strip():
        raise SelectionError("a selection needs a non-empty name")
    if not (0.0 < float(ratio) <= 1.0) or math.isnan(float(ratio)):
        raise SelectionError(f"ratio must be in (0, 1], got {ratio}")
    pool_id = resolve_pool(ws, pool)
    actor = current_actor(actor)
    roles.require(ws, actor, "select", pool_id=pool_id, detail=f"save selection {name!r}")
    params = dict(params or {})
    if isinstance(ranking, int | np.integer):
        score_run_id = int(ranking)
        with ws.connect(read_only=True) as con:
            _check_score_run(con, score_run_id, pool_id)
    else:
        cache_id = params.get("cache_id")
        score_run_id = record_score_run(
            ws,
            pool_id,
            ranking,
            method or params.get("method", "chips"),
            params,
            cache_id=None if cache_id is None else int(cache_id),
        )
    table = load_score_run(ws, score_run_id)
    decisions = current_decisions(ws, pool_id, with_cleared=True)  # one snapshot: members and applied rows
    n_budget = math.ceil(float(ratio) * len(table))
    members = choose_members(table, decisions, n_budget)
    state = decisions.dropna(subset=["state"])
    run = score_run_info(ws, score_run_id)
    stored = {
        **params,
        "score_run": {"score_run_id": score_run_id, "method": run["method"], "params": run["params"]},
        "n_ranked": len(table),
        "budget": n_budget,
        "decisions": {
            "include": [int(x) for x in state.loc[state["state"] == "include", "pair_id"]],
            "exclude": [int(x) for x in state.loc[state["state"] == "exclude", "pair_id"]],
        },
    }
    with ws.connect() as con:
        selection_id = ws.next_id(con)
        store.begin(con)
        version = catalog.next_selection_version(con, name)
        catalog.insert_selection(
            con,
            selection_id,
            name,
            version,
            pool_id,
            score_run_id,
            float(ratio),
            json.dumps(stored, default=_json_default),
            members,
        )
        applied = decisions["decision_id"].dropna().astype(np.int64).tolist()  # include, exclude, clear
        catalog.insert_selection_decisions(con, selection_id, applied)
        store.commit(con)
    audit.record(
        ws,
        actor,
        "selection",
        "save",
        pool_id=pool_id,
        object_id=selection_id,
        score_run_id=score_run_id,
        params={"name": name, "version": version, "ratio": float(ratio), "n_selected": len(members),
                "method": run["method"], "score_run_params": run["params"]},
    )  # fmt: skip
    return selection_id


def applied_decisions(ws: Workspace, selection: str | int) -> pd.DataFrame:
    """Exactly the decision rows a selection applied when it was saved (decision_id, pair_id, action, by,
    created_at), so an audit can tell whose include or exclude shaped it."""
    info = get_selection(ws, selection)
    return catalog.applied_decisions(ws, info.selection_id)


def get_selection(ws: Workspace, selection: str | int, version: int | None = None) -> SelectionInfo:
    """A selection by id, or by name (latest version unless `version`); 'name@3' also selects version 3."""
    ws.check()
    by_id, name = None, None
    if isinstance(selection, int | np.integer):
        by_id = int(selection)
    else:
        name = str(selection)
        if version is None and "@" in name:
            base, _, v = name.rpartition("@")
            if v.isdigit():
                name, version = base, int(v)
    with ws.connect(read_only=True) as con:
        df = catalog.selection_rows(con, by_id, name, version)
        if df.empty and isinstance(selection, str) and selection.isdigit():
            df = catalog.selection_rows(con, int(selection))
    if df.empty:
        what = f"{selection!r}" + (f" version {version}" if version is not None else "")
        raise SelectionError(f"no selection {what} in workspace {ws.root}")
    r = df.iloc[0]
    return SelectionInfo(
        selection_id=int(r["selection_id"]),
        name=str(r["name"]),
        version=int(r["version"]),
        pool_id=int(r["pool_id"]),
        score_run_id=None if pd.isna(r["score_run_id"]) else int(r["score_run_id"]),
        ratio=float(r["ratio"]),
        params=json.loads(r["params"]),
        n_selected=int(r["n_selected"]),
        created_at=r["created_at"],
    )


def list_selections(ws: Workspace, pool: str | int | None = None) -> pd.DataFrame:
    """All saved selections (newest first), optionally of one pool."""
    pool_id = resolve_pool(ws, pool) if pool is not None else None
    ws.check()
    return catalog.list_selections(ws, pool_id)


def selection_members(ws: Workspace, selection: str | int, with_pairs: bool = True) -> pd.DataFrame:
    """Members of a selection, best rank first: pair_id, rank, source (+ filepath, caption, label)."""
    info = get_selection(ws, selection)
    df = catalog.selection_members(ws, info.selection_id, info.pool_id, with_pairs)
    df["rank"] = df["rank"].astype("Int64")
    return df


def diff_selections(ws: Workspace, a: str | int, b: str | int) -> SelectionDiff:
    """What differs between two selections (ids, 'name' for the latest version, or 'name@version')."""
    ia, ib = get_selection(ws, a), get_selection(ws, b)
    ma = selection_members(ws, ia.selection_id, with_pairs=False)["pair_id"].to_numpy(np.int64)
    mb = selection_members(ws, ib.selection_id, with_pairs=False)["pair_id"].to_numpy(np.int64)
    return SelectionDiff(
        a=ia,
        b=ib,
        only_a=np.setdiff1d(ma, mb),
        only_b=np.setdiff1d(mb, ma),
        both=np.intersect1d(ma, mb),
    )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Sequence):
        return list(obj)
    return str(obj)

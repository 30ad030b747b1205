"""Caption search and filters over a ranking: one page of matching pairs, computed by DuckDB in the workspace.

The ranking is a stored score run (its parquet file, read by DuckDB) or a ranking in memory (a RankResult or
its frame, e.g. the dashboard's live ranking); either is joined with the pool's pairs and the decisions in
force, filtered and paged in one query (`catalog.search_ranked_pairs`), so no pool-sized table is filtered
in pandas.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from chips_core.curation.selection import SelectionError, rank_frame, resolve_pool
from chips_core.workspace import catalog
from chips_core.workspace.store import Workspace

COMPONENTS = ("alignment", "learnability", "relevance", "agreement", "score")
DECISION_STATES = ("include", "exclude", "none")
ORDERS = ("rank", "-rank", "random")


def _terms(text: str | None) -> list[str]:
    return [t for t in (text or "").split() if t]


def _states(decision: str | Iterable[str] | None) -> list[str]:
    if decision is None:
        return []
    states = [decision] if isinstance(decision, str) else list(decision)
    bad = sorted(set(states) - set(DECISION_STATES))
    if bad:
        raise SelectionError(f"unknown decision state(s) {', '.join(bad)}; use {', '.join(DECISION_STATES)}")
    return states


def search_pairs(
    ws: Workspace,
    pool: str | int,
    ranking: int | Any,
    text: str | None = None,
    ranges: Mapping[str, tuple[float | None, float | None]] | None = None,
    decision: str | Iterable[str] | None = None,
    label: str | Iterable[str] | None = None,
    pair_ids: Iterable[int] | None = None,
    order: str = "rank",
    limit: int | None = 24,
    offset: int = 0,
    seed: int = 0,
) -> tuple[pd.DataFrame, int]:
    """(page, total): the pairs of a ranking that match every filter given, `limit` of them from `offset`
    (columns: the ranking's, filepath, caption, label, state), and how many match in all.

    `ranking`: a score run id (its stored parquet file) or a ranking (RankResult / frame). `text`: each
    whitespace-separated word occurs in the caption, case-insensitive. `ranges`: component → (low, high),
    inclusive, None for an open end; only components the ranking has. `decision`: 'include' | 'exclude' |
    'none' (no decision in force), or several. `label`: one label or several. `pair_ids`: only these
    pairs (e.g. those a ground truth marks). `order`: 'rank' (best first),
    '-rank' (worst first), a component with or without '-', or 'random' (a fixed shuffle per `seed`).
    """
    pool_id = resolve_pool(ws, pool)
    if isinstance(ranking, int | np.integer) and not isinstance(ranking, bool):
        score_run_id = int(ranking)
        if catalog.score_run_pool_id(ws, score_run_id) != pool_id:
            raise SelectionError(f"score run {score_run_id} is not a score run of pool {pool}")
        row = catalog.score_run_result_path(ws, score_run_id)
        if row is None or not row[0] or not os.path.exists(row[0]):
            raise SelectionError(f"score run {score_run_id}: its result file is missing")
        source: Any = row[0]
        columns = set(pq.read_schema(row[0]).names)
    else:
        frame = getattr(ranking, "frame", ranking)  # a RankResult's frame as it is (the query sorts)
        source = frame if isinstance(frame, pd.DataFrame) and {"pair_id", "rank"} <= set(frame) else None
        source = rank_frame(ranking) if source is None else source
        columns = set(source.columns)
    for name in ranges or {}:
        if name not in columns or name not in COMPONENTS:
            raise SelectionError(
                f"the ranking has no component {name!r}; it has {', '.join(sorted(columns))}"
            )
    key = order.removeprefix("-")
    if order != "random" and (key not in (*COMPONENTS, "rank") or key not in columns):
        raise SelectionError(
            f"cannot order by {order!r}; use rank, -rank, random or a component of this ranking "
            f"({', '.join(c for c in COMPONENTS if c in columns)})"
        )
    labels = [label] if isinstance(label, str) else list(label or [])
    return catalog.search_ranked_pairs(
        ws,
        pool_id,
        source,
        terms=_terms(text),
        ranges=dict(ranges or {}),
        states=_states(decision),
        labels=labels,
        within=None if pair_ids is None else np.fromiter((int(i) for i in pair_ids), dtype=np.int64),
        order=order,
        seed=seed,
        limit=limit,
        offset=max(int(offset), 0),
    )

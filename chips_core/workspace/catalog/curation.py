"""Decisions (append-only), versioned selections and their members, exports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from chips_core.workspace.catalog._db import Con, Db, first, reading, writing

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "current_decisions",
    "decision_history",
    "insert_decisions",
    "insert_export",
    "insert_selection",
    "list_selections",
    "missing_pairs",
    "next_ids",
    "next_selection_version",
    "pool_labels",
    "search_ranked_pairs",
    "selection_members",
    "selection_n_selected",
    "selection_rows",
]


def missing_pairs(con: Con, pool_id: int, pair_ids: np.ndarray, limit: int = 5) -> list[int]:
    """Up to `limit` of `pair_ids` (sorted) that are not pairs of pool `pool_id`."""
    import pandas as pd

    con.register("_ids", pd.DataFrame({"pair_id": pair_ids}))
    try:
        rows = con.execute(
            "SELECT i.pair_id FROM _ids i ANTI JOIN pairs p ON p.pool_id = ? AND p.pair_id = i.pair_id "
            f"ORDER BY 1 LIMIT {int(limit)}",
            [int(pool_id)],
        ).fetchall()
    finally:
        con.unregister("_ids")
    return [int(r[0]) for r in rows]


def next_ids(con: Con, n: int) -> list[int]:
    """`n` fresh ids of the workspace sequence, for rows inserted on the same connection."""
    return [int(r[0]) for r in con.execute("SELECT nextval('id_seq') FROM range(?)", [int(n)]).fetchall()]


def insert_decisions(con: Con, rows: pd.DataFrame) -> None:
    """Append decision rows (columns decision_id, pool_id, pair_id, action, note, author, score_run_id,
    subject, email)."""
    con.register("_rows", rows)
    try:
        con.execute(
            "INSERT INTO decisions (decision_id, pool_id, pair_id, action, note, author, score_run_id, "
            "subject, email) SELECT decision_id, pool_id, pair_id, action, note, author, score_run_id, "
            "subject, email FROM _rows"
        )
    finally:
        con.unregister("_rows")


# the state in force per pair of pool `?`: its latest include / exclude / clear row
_STATE_CTE = """
            d AS (SELECT * FROM decisions WHERE pool_id = ?),
            state AS (
                SELECT pair_id, arg_max(action, decision_id) AS action,
                       arg_max_null(score_run_id, decision_id) AS score_run_id,
                       max(decision_id) AS decision_id
                FROM d WHERE action IN ('include', 'exclude', 'clear') GROUP BY pair_id)"""


def current_decisions(db: Db, pool_id: int, with_cleared: bool = False) -> pd.DataFrame:
    """The decisions in force of a pool: pair_id, state ('include' | 'exclude' | NULL), note (latest
    non-empty), author, email and decided_at of the latest row, score_run_id and decision_id of the latest
    state row; one row per pair with a state or a note (`with_cleared`: also per pair whose latest state
    row is a clear)."""
    shown = "s.action IS NOT NULL" if with_cleared else "s.action IN ('include', 'exclude')"
    with reading(db) as con:
        return con.execute(
            f"""
            WITH {_STATE_CTE},
            notes AS (
                SELECT pair_id, arg_max(note, decision_id) AS note
                FROM d WHERE note IS NOT NULL AND trim(note) <> '' GROUP BY pair_id),
            latest AS (
                SELECT pair_id, arg_max_null(author, decision_id) AS author,
                       arg_max_null(email, decision_id) AS email,
                       arg_max(created_at, decision_id) AS decided_at
                FROM d GROUP BY pair_id)
            SELECT l.pair_id,
                   CASE WHEN s.action IN ('include', 'exclude') THEN s.action END AS state,
                   n.note, l.author, l.email, l.decided_at, s.score_run_id, s.decision_id
            FROM latest l LEFT JOIN state s USING (pair_id) LEFT JOIN notes n USING (pair_id)
            WHERE {shown} OR n.note IS NOT NULL
            ORDER BY l.pair_id
            """,
            [int(pool_id)],
        ).df()


def pool_labels(db: Db, pool_id: int) -> list[str]:
    """The distinct non-empty labels of a pool's pairs, sorted."""
    with reading(db) as con:
        rows = con.execute(
            "SELECT DISTINCT label FROM pairs WHERE pool_id = ? AND label IS NOT NULL AND label <> '' "
            "ORDER BY 1",
            [int(pool_id)],
        ).fetchall()
    return [str(r[0]) for r in rows]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def search_ranked_pairs(
    db: Db,
    pool_id: int,
    ranking: str | Path | pd.DataFrame,
    *,
    terms: Sequence[str] = (),
    ranges: Mapping[str, tuple[float | None, float | None]] | None = None,
    states: Sequence[str] = (),
    labels: Sequence[str] = (),
    within: np.ndarray | None = None,
    order: str = "rank",
    seed: int = 0,
    limit: int | None = None,
    offset: int = 0,
) -> tuple[pd.DataFrame, int]:
    """One page of a ranking joined with the pool's pairs and the decisions in force, and the number of
    matching pairs.

    `ranking`: a score run's parquet file (read by `read_parquet`) or a ranking frame (pair_id, rank and
    component columns). Filters, all combined with AND: `terms` each occur in the caption (case-insensitive,
    literal); `ranges` maps a ranking column to (low, high), either end None for open (both inclusive);
    `states` ⊆ {'include', 'exclude', 'none'}; `labels`: the pair's label is one of them; `within`: the
    pair_id is one of these (int64). `order`: a ranking
    column, '-' in front for descending, or 'random' (a fixed shuffle per `seed`); ties by rank. Columns: the
    ranking's, then filepath, caption, label, state (NULL without a decision).
    """
    import pandas as pd

    frame = ranking if isinstance(ranking, pd.DataFrame) else None
    with reading(db) as con:
        if frame is not None:
            con.register("_ranking", frame)
            source, columns = "_ranking", [str(c) for c in frame.columns]
        else:
            source = f"read_parquet({_sql_path(Path(ranking))})"
            columns = [str(r[0]) for r in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()]
        if within is not None:
            con.register("_within", pd.DataFrame({"pair_id": np.asarray(within, dtype=np.int64)}))
        try:
            where, args = ["TRUE"], [int(pool_id), int(pool_id)]
            for term in terms:
                where.append("contains(lower(p.caption), lower(?))")
                args.append(str(term))
            for col, (lo, hi) in (ranges or {}).items():
                if col not in columns:
                    raise KeyError(f"the ranking has no column {col!r}")
                if lo is not None:
                    where.append(f"r.{_quote(col)} >= ?")
                    args.append(float(lo))
                if hi is not None:
                    where.append(f"r.{_quote(col)} <= ?")
                    args.append(float(hi))
            if states:
                known = [s for s in states if s in ("include", "exclude")]
                either = [f"s.action IN {_str_list(known)}"] if known else []
                if "none" in states:
                    either.append("s.action IS NULL OR s.action = 'clear'")
                where.append("(" + " OR ".join(either or ["FALSE"]) + ")")
            if labels:
                where.append(f"p.label IN {_str_list(list(labels))}")
            if within is not None:
                where.append("r.pair_id IN (SELECT pair_id FROM _within)")
            key = order.removeprefix("-")
            if order == "random":
                by = f"hash(r.pair_id, {int(seed)}), r.rank"
            elif key in columns:
                by = f"r.{_quote(key)} {'DESC' if order.startswith('-') else 'ASC'} NULLS LAST, r.rank"
            else:
                raise KeyError(f"cannot order by {order!r}")
            page = "" if limit is None else f" LIMIT {int(limit)} OFFSET {int(offset)}"
            sql = f"""
                WITH {_STATE_CTE},
                hits AS (
                    SELECT r.*, p.filepath, p.caption, p.label,
                           CASE WHEN s.action IN ('include', 'exclude') THEN s.action END AS state
                    FROM {source} r JOIN pairs p ON p.pool_id = ? AND p.pair_id = r.pair_id
                    LEFT JOIN state s ON s.pair_id = r.pair_id
                    WHERE {" AND ".join(where)})
                SELECT *, count(*) OVER () AS _total FROM hits r ORDER BY {by}, r.pair_id{page}
            """
            out = con.execute(sql, args).df()
            total = int(out["_total"].iloc[0]) if len(out) else _count(con, sql, args, page)
        finally:
            if frame is not None:
                con.unregister("_ranking")
            if within is not None:
                con.unregister("_within")
    return out.drop(columns="_total"), total


def _count(con: Con, sql: str, args: list, page: str) -> int:
    """The number of matches when the page is empty (an offset past the end)."""
    if not page:
        return 0
    return int(first(con.execute(f"SELECT count(*) FROM ({sql.replace(page, '')})", args))[0])


def _str_list(values: list[str]) -> str:
    """An SQL list of string literals."""
    return "(" + ",".join("'" + str(v).replace("'", "''") + "'" for v in values) + ")" if values else "(NULL)"


def _sql_path(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def decision_history(db: Db, pool_id: int, pair_id: int | None = None) -> pd.DataFrame:
    """Every decision row of a pool (or of one pair), oldest first."""
    sql = "SELECT * FROM decisions WHERE pool_id = ?"
    params: list = [int(pool_id)]
    if pair_id is not None:
        sql += " AND pair_id = ?"
        params.append(int(pair_id))
    with reading(db) as con:
        return con.execute(sql + " ORDER BY decision_id", params).df()


def next_selection_version(con: Con, name: str) -> int:
    """The version the next selection named `name` gets (1 for a new name)."""
    return int(
        first(con.execute("SELECT coalesce(max(version), 0) + 1 FROM selections WHERE name = ?", [name]))[0]
    )


def insert_selection(
    con: Con,
    selection_id: int,
    name: str,
    version: int,
    pool_id: int,
    score_run_id: int | None,
    ratio: float,
    params: str,
    members: pd.DataFrame,
) -> None:
    """Add a `selections` row (`params`: JSON text) and its members (columns pair_id, rank, source)."""
    con.execute(
        "INSERT INTO selections (selection_id, name, version, pool_id, score_run_id, ratio, params, "
        "n_selected) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [selection_id, name, version, pool_id, score_run_id, ratio, params, len(members)],
    )
    con.register("_m", members.assign(selection_id=selection_id))
    try:
        con.execute(
            "INSERT INTO selection_members (selection_id, pair_id, rank, source) "
            "SELECT selection_id, pair_id, rank, source FROM _m"
        )
    finally:
        con.unregister("_m")


def selection_rows(
    db: Db, selection_id: int | None = None, name: str | None = None, version: int | None = None
) -> pd.DataFrame:
    """The `selections` row with id `selection_id`, or named `name` (version `version`, else the latest);
    an empty frame when there is none."""
    if selection_id is not None:
        sql, args = "SELECT * FROM selections WHERE selection_id = ?", [int(selection_id)]
    elif version is None:
        sql, args = "SELECT * FROM selections WHERE name = ? ORDER BY version DESC LIMIT 1", [name]
    else:
        sql, args = "SELECT * FROM selections WHERE name = ? AND version = ?", [name, int(version)]
    with reading(db) as con:
        return con.execute(sql, args).df()


def list_selections(db: Db, pool_id: int | None = None) -> pd.DataFrame:
    """Saved selections, newest first (of pool `pool_id` when given)."""
    sql = (
        "SELECT selection_id, name, version, pool_id, score_run_id, ratio, n_selected, created_at "
        "FROM selections"
    )
    args: list = []
    if pool_id is not None:
        sql += " WHERE pool_id = ?"
        args.append(int(pool_id))
    with reading(db) as con:
        return con.execute(sql + " ORDER BY selection_id DESC", args).df()


def selection_members(db: Db, selection_id: int, pool_id: int, with_pairs: bool = True) -> pd.DataFrame:
    """pair_id, rank, source (+ filepath, caption, label of the pool's pair) of a selection's members,
    best rank first."""
    cols = ", p.filepath, p.caption, p.label" if with_pairs else ""
    with reading(db) as con:
        return con.execute(
            f"SELECT m.pair_id, m.rank, m.source{cols} FROM selection_members m "
            "LEFT JOIN pairs p ON p.pool_id = ? AND p.pair_id = m.pair_id "
            "WHERE m.selection_id = ? ORDER BY m.rank NULLS LAST, m.pair_id",
            [int(pool_id), int(selection_id)],
        ).df()


def selection_n_selected(db: Db, selection_id: int) -> int:
    """The number of members of a selection."""
    with reading(db) as con:
        sql = "SELECT n_selected FROM selections WHERE selection_id = ?"
        return int(first(con.execute(sql, [int(selection_id)]))[0])


def insert_export(db: Db, export_id: int, selection_id: int, fmt: str, path: str, manifest: str) -> None:
    """Add an `exports` row (`manifest`: JSON text)."""
    with writing(db) as con:
        con.execute(
            "INSERT INTO exports (export_id, selection_id, format, path, manifest) VALUES (?, ?, ?, ?, ?)",
            [export_id, selection_id, fmt, path, manifest],
        )

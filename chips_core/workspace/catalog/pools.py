"""Pools, their pairs and rejects; a pool's dependents and their cascade removal."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from chips_core.workspace.catalog._db import Con, Db, first, in_list, reading, writing
from chips_core.workspace.store import Workspace, WorkspaceError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

__all__ = [
    "PoolRecord",
    "UnknownPoolError",
    "count_pairs",
    "count_rejects",
    "delete_pool_rows",
    "duplicate_pairs",
    "find_pool_id",
    "insert_pairs",
    "insert_pool",
    "insert_rejects",
    "pairs_frame",
    "pool_dependents",
    "pool_id",
    "pool_names",
    "pool_options",
    "pool_record",
    "pool_row",
    "pools_overview",
    "reject_counts",
    "rejects_overview",
    "set_pool_options",
    "set_pool_status",
]


class UnknownPoolError(WorkspaceError):
    """No pool of that name (or id) in the workspace."""


@dataclass(frozen=True)
class PoolRecord:
    """A `pools` row with its number of pairs."""

    pool_id: int
    name: str
    kind: str
    source: str
    format: str
    options: str | None
    status: str
    n_pairs: int


def pool_names(db: Db) -> list[tuple[str, str]]:
    """(name, kind) of every pool and eval set, by name."""
    with reading(db) as con:
        return [(r[0], r[1]) for r in con.execute("SELECT name, kind FROM pools ORDER BY name").fetchall()]


def find_pool_id(db: Db, name: str) -> int | None:
    """The pool_id of pool `name`, or None."""
    with reading(db) as con:
        row = first(con.execute("SELECT pool_id FROM pools WHERE name = ?", [str(name)]))
    return None if row is None else int(row[0])


def pool_id(db: Db, pool: str | int) -> int:
    """The pool_id of a pool given by name (or by id, when an int names no pool); UnknownPoolError names
    it, and the pools there are, when there is no such pool."""
    with reading(db) as con:
        found = find_pool_id(con, str(pool))
        if found is None and isinstance(pool, int):
            row = first(con.execute("SELECT pool_id FROM pools WHERE pool_id = ?", [int(pool)]))
            found = None if row is None else int(row[0])
        if found is None:
            names = ", ".join(n for n, _ in pool_names(con)) or "none"
    if found is None:
        where = f" in workspace {db.root}" if isinstance(db, Workspace) else ""
        raise UnknownPoolError(f"no pool named {pool!r}{where} (pools: {names})")
    return found


def pool_record(db: Db, name: str) -> PoolRecord | None:
    """Pool `name`'s row and pair count, or None."""
    with reading(db) as con:
        row = first(
            con.execute(
                "SELECT pool_id, name, kind, source, format, options, status, "
                "(SELECT count(*) FROM pairs x WHERE x.pool_id = p.pool_id) FROM pools p WHERE name = ?",
                [name],
            )
        )
    return None if row is None else PoolRecord(int(row[0]), *row[1:7], int(row[7]))


def pool_row(db: Db, pool_id: int) -> tuple[str, str, str, str] | None:
    """(name, source, format, status) of pool `pool_id`, or None."""
    with reading(db) as con:
        row = first(
            con.execute("SELECT name, source, format, status FROM pools WHERE pool_id = ?", [int(pool_id)])
        )
    return None if row is None else tuple(row)


def insert_pool(
    con: Con, pool_id: int, name: str, kind: str, source: str, fmt: str, options: str, status: str
) -> None:
    """Add a `pools` row (`options`: JSON text)."""
    con.execute(
        "INSERT INTO pools (pool_id, name, kind, source, format, options, status) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [pool_id, name, kind, source, fmt, options, status],
    )


def pool_options(db: Db, pool_id: int) -> tuple[str | None] | None:
    """(options JSON,) of pool `pool_id`, or None when there is no such pool."""
    with reading(db) as con:
        row = first(con.execute("SELECT options FROM pools WHERE pool_id = ?", [int(pool_id)]))
    return None if row is None else (row[0],)


def set_pool_options(db: Db, pool_id: int, options: str) -> None:
    """Replace a pool's options (JSON text)."""
    with writing(db) as con:
        con.execute("UPDATE pools SET options = ? WHERE pool_id = ?", [options, int(pool_id)])


def set_pool_status(db: Db, pool_id: int, status: str) -> None:
    """Set a pool's status (ingesting | interrupted | ready | failed)."""
    with writing(db) as con:
        con.execute("UPDATE pools SET status = ? WHERE pool_id = ?", [status, int(pool_id)])


def pools_overview(db: Db, kind: str | None = None) -> pd.DataFrame:
    """One row per pool (of `kind` when given), oldest first: pool_id, name, kind, format, status, pairs,
    rejects, source, encoding (detected), error (of a failed ingest), created_at."""
    where, args = ("WHERE p.kind = ? ", [kind]) if kind is not None else ("", [])
    with reading(db) as con:
        return con.execute(
            "SELECT p.pool_id, p.name, p.kind, p.format, p.status, "
            "(SELECT count(*) FROM pairs x WHERE x.pool_id = p.pool_id) AS pairs, "
            "(SELECT count(*) FROM rejects r WHERE r.pool_id = p.pool_id) AS rejects, p.source, "
            "json_extract_string(p.options, '$.encoding_detected') AS encoding, "
            "json_extract_string(p.options, '$.error') AS error, p.created_at "
            f"FROM pools p {where}ORDER BY p.pool_id",
            args,
        ).df()


def rejects_overview(db: Db) -> pd.DataFrame:
    """pool, reason, n: rejected inputs per pool and reason, most frequent first."""
    with reading(db) as con:
        return con.execute(
            "SELECT p.name AS pool, r.reason, count(*) AS n FROM rejects r JOIN pools p USING (pool_id) "
            "GROUP BY ALL ORDER BY n DESC"
        ).df()


def count_pairs(db: Db, pool_id: int) -> int:
    """The number of pairs of pool `pool_id`."""
    with reading(db) as con:
        return int(first(con.execute("SELECT count(*) FROM pairs WHERE pool_id = ?", [int(pool_id)]))[0])


def count_rejects(db: Db, pool_id: int) -> int:
    """The number of rejected inputs of pool `pool_id`."""
    with reading(db) as con:
        return int(first(con.execute("SELECT count(*) FROM rejects WHERE pool_id = ?", [int(pool_id)]))[0])


def reject_counts(db: Db, pool_id: int) -> dict[str, int]:
    """Rejected inputs of pool `pool_id` per reason."""
    with reading(db) as con:
        rows = con.execute(
            "SELECT reason, count(*) FROM rejects WHERE pool_id = ? GROUP BY reason", [int(pool_id)]
        ).fetchall()
    return {str(k): int(v) for k, v in rows}


def pairs_frame(
    db: Db, pool_id: int, ordered: bool = False, with_ids: bool = True, pair_ids: list[int] | None = None
) -> pd.DataFrame:
    """pair_id, filepath, caption, label of a pool's pairs (`ordered`: in ingest order; without
    `with_ids`: no pair_id column; `pair_ids`: only those pairs, e.g. the rows a page shows)."""
    cols = "pair_id, filepath, caption, label" if with_ids else "filepath, caption, label"
    only = f" AND pair_id IN {in_list(pair_ids)}" if pair_ids is not None else ""
    order = " ORDER BY row_index" if ordered else ""
    with reading(db) as con:
        return con.execute(f"SELECT {cols} FROM pairs WHERE pool_id = ?{only}{order}", [int(pool_id)]).df()


def duplicate_pairs(con: Con, pool_id: int, pair_ids: pa.Table) -> list[tuple[int, int, str]]:
    """(pair_id, row_index, filepath) of the pool's stored pairs whose id is in `pair_ids` (a table with
    an int64 pair_id column)."""
    con.register("chunk_ids", pair_ids)
    try:
        return con.execute(
            "SELECT p.pair_id, p.row_index, p.filepath FROM pairs p JOIN chunk_ids c USING (pair_id) "
            "WHERE p.pool_id = ?",
            [int(pool_id)],
        ).fetchall()
    finally:
        con.unregister("chunk_ids")


def insert_pairs(con: Con, table: pa.Table) -> None:
    """Append rows to `pairs` (a table with its columns, in order)."""
    con.register("chunk_pairs", table)
    try:
        con.execute("INSERT INTO pairs SELECT * FROM chunk_pairs")
    finally:
        con.unregister("chunk_pairs")


def insert_rejects(con: Con, rows: pa.Table | list[tuple[int, str, str, str | None]]) -> None:
    """Record rejects (pool_id, source_ref, reason, detail); one already recorded for the same
    (pool_id, source_ref) is kept. `rows`: a table with those columns, or tuples."""
    if not isinstance(rows, list | tuple):
        con.register("chunk_rejects", rows)
        try:
            con.execute(
                "INSERT OR IGNORE INTO rejects (pool_id, source_ref, reason, detail) "
                "SELECT pool_id, source_ref, reason, detail FROM chunk_rejects"
            )
        finally:
            con.unregister("chunk_rejects")
        return
    for row in rows:
        con.execute(
            "INSERT INTO rejects (pool_id, source_ref, reason, detail) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            list(row),
        )


def _ids(con: Con, sql: str, args: list) -> list[int]:
    return [int(r[0]) for r in con.execute(sql, args).fetchall()]


def pool_dependents(ws: Workspace, con: Con, pool_id: int) -> dict:
    """Everything derived from pool `pool_id`, read on `con` (inside the caller's transaction): ids of
    feature_runs, caches, score_runs, selection_ids, exports, cpt_runs; selections ('name@version');
    counts of decisions and eval_results; files (feature run folders, maps, caches, score files,
    exports and their manifests)."""
    d: dict = {}
    d["feature_runs"] = _ids(con, "SELECT run_id FROM feature_runs WHERE pool_id = ? ORDER BY 1", [pool_id])
    runs = in_list(d["feature_runs"])
    d["caches"] = _ids(
        con,
        f"SELECT cache_id FROM scoring_caches WHERE pool_run_id IN {runs} OR eval_run_id IN {runs} "
        "ORDER BY 1",
        [],
    )
    d["score_runs"] = _ids(
        con,
        f"SELECT score_run_id FROM score_runs WHERE pool_id = ? OR cache_id IN {in_list(d['caches'])} "
        "ORDER BY 1",
        [pool_id],
    )
    rows = con.execute(
        "SELECT selection_id, name, version FROM selections WHERE pool_id = ? "
        f"OR score_run_id IN {in_list(d['score_runs'])} ORDER BY 1",
        [pool_id],
    ).fetchall()
    d["selection_ids"] = [int(r[0]) for r in rows]
    d["selections"] = [f"{r[1]}@{r[2]}" for r in rows]
    sels = in_list(d["selection_ids"])
    d["exports"] = _ids(con, f"SELECT export_id FROM exports WHERE selection_id IN {sels} ORDER BY 1", [])
    d["cpt_runs"] = _ids(con, f"SELECT cpt_run_id FROM cpt_runs WHERE selection_id IN {sels} ORDER BY 1", [])
    d["decisions"] = int(first(con.execute("SELECT count(*) FROM decisions WHERE pool_id = ?", [pool_id]))[0])
    d["eval_results"] = int(
        first(con.execute("SELECT count(*) FROM eval_results WHERE eval_pool_id = ?", [pool_id]))[0]
    )
    files = [r[0] for r in con.execute(f"SELECT dir FROM feature_runs WHERE run_id IN {runs}").fetchall()]
    files += [str(ws.root / "maps" / f"run-{r}") for r in d["feature_runs"]]
    files += [
        r[0]
        for r in con.execute(
            f"SELECT dir FROM scoring_caches WHERE cache_id IN {in_list(d['caches'])}"
        ).fetchall()
    ]
    files += [
        r[0]
        for r in con.execute(
            f"SELECT result_path FROM score_runs WHERE score_run_id IN {in_list(d['score_runs'])}"
        ).fetchall()
    ]
    for (path,) in con.execute(
        f"SELECT path FROM exports WHERE export_id IN {in_list(d['exports'])}"
    ).fetchall():
        if path:
            p = Path(path)
            files += [str(p), f"{p}.manifest.json", str(p.with_name(f"{p.stem}_images"))]
    d["files"] = [f for f in files if f]
    return d


def delete_pool_rows(
    con: Con,
    pool_id: int,
    feature_runs: list[int],
    caches: list[int],
    score_runs: list[int],
    selection_ids: list[int],
) -> None:
    """Delete the pool's rows and its dependents' (inside the caller's transaction); CPT runs of its
    selections stay, with no selection."""
    runs, cach, scores, sels = (
        in_list(feature_runs),
        in_list(caches),
        in_list(score_runs),
        in_list(selection_ids),
    )
    con.execute(f"UPDATE cpt_runs SET selection_id = NULL WHERE selection_id IN {sels}")
    for sql in (
        f"DELETE FROM exports WHERE selection_id IN {sels}",
        f"DELETE FROM selection_members WHERE selection_id IN {sels}",
        f"DELETE FROM selections WHERE selection_id IN {sels}",
        f"DELETE FROM score_runs WHERE score_run_id IN {scores}",
        f"DELETE FROM scoring_caches WHERE cache_id IN {cach}",
        f"DELETE FROM feature_shards WHERE run_id IN {runs}",
        f"DELETE FROM feature_runs WHERE run_id IN {runs}",
    ):
        con.execute(sql)
    for table, col in (("decisions", "pool_id"), ("eval_results", "eval_pool_id"), ("rejects", "pool_id"),
                       ("pairs", "pool_id"), ("pools", "pool_id")):  # fmt: skip
        con.execute(f"DELETE FROM {table} WHERE {col} = ?", [pool_id])

"""Removing a pool (or eval set) and what was derived from it: `chips rm WS NAME [--force]`.

What depends on a pool: its feature runs (and their map caches), the scoring caches built from those runs
(as the pool or as the eval set), the score runs of the pool or of those caches, the selections of those
score runs and of the pool, their exports, the pool's decisions and the evaluation results measured on it.
Without `force` a pool with any of these is refused, and the refusal lists them; a pool with nothing
derived (a failed or empty ingest, a pool never featurized) is removed at once. With `force` everything
listed is removed too, in one transaction, then its files under the workspace folder. Never removed: files
outside the workspace (an export written with `--out` elsewhere is left where it is and reported) and CPT
runs (trained checkpoints): a CPT run of a removed selection is kept with its selection detached.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from chips_core.pools.records import PoolError
from chips_core.workspace.store import Workspace


@dataclass
class Dependents:
    """Everything derived from one pool (ids, and the files that belong to them)."""

    pool_id: int
    name: str
    feature_runs: list[int] = field(default_factory=list)
    caches: list[int] = field(default_factory=list)
    score_runs: list[int] = field(default_factory=list)
    selections: list[str] = field(default_factory=list)  # 'name@version (id N)'
    selection_ids: list[int] = field(default_factory=list)
    exports: list[int] = field(default_factory=list)
    decisions: int = 0
    eval_results: int = 0
    cpt_runs: list[int] = field(default_factory=list)  # kept, their selection detached
    files: list[str] = field(default_factory=list)  # paths written by the workspace for these records

    def empty(self) -> bool:
        return not (
            self.feature_runs or self.caches or self.score_runs or self.selection_ids or self.exports
        ) and not (self.decisions or self.eval_results)

    def describe(self) -> str:
        """One line: what depends on the pool."""
        parts = []
        for label, ids in (
            ("feature runs", self.feature_runs),
            ("scoring caches", self.caches),
            ("score runs", self.score_runs),
            ("exports", self.exports),
        ):
            if ids:
                parts.append(
                    f"{len(ids)} {label} ({', '.join(map(str, ids[:10]))}{', ...' if len(ids) > 10 else ''})"
                )
            if label == "score runs" and self.selections:
                parts.append(f"{len(self.selections)} selections ({', '.join(self.selections[:10])})")
        if self.decisions:
            parts.append(f"{self.decisions} decisions")
        if self.eval_results:
            parts.append(f"{self.eval_results} evaluation results")
        return "; ".join(parts) if parts else "nothing"


@dataclass
class Removed:
    """What `remove_pool` did."""

    dependents: Dependents
    n_pairs: int
    n_rejects: int
    files_removed: list[str]
    files_left: list[str]  # outside the workspace, or could not be removed (with why)

    def format(self) -> str:
        d = self.dependents
        lines = [f"removed pool {d.name!r} (id {d.pool_id}): {self.n_pairs} pairs, {self.n_rejects} rejects"]
        if not d.empty():
            lines.append(f"  and what depended on it: {d.describe()}")
        if d.cpt_runs:
            lines.append(f"  kept CPT runs {', '.join(map(str, d.cpt_runs))} (their selection is detached)")
        if self.files_removed:
            lines.append(f"  {len(self.files_removed)} files / folders removed under the workspace")
        for f in self.files_left:
            lines.append(f"  left in place: {f}")
        return "\n".join(lines)


def _ids(con: duckdb.DuckDBPyConnection, sql: str, args: list) -> list[int]:
    return [int(r[0]) for r in con.execute(sql, args).fetchall()]


def _in(ids: list[int]) -> str:
    return "(" + ",".join(str(int(i)) for i in ids) + ")" if ids else "(NULL)"


def find_dependents(ws: Workspace, con: duckdb.DuckDBPyConnection, pool_id: int, name: str) -> Dependents:
    """Everything derived from pool `pool_id`, read on `con` (inside the caller's transaction)."""
    d = Dependents(pool_id, name)
    d.feature_runs = _ids(con, "SELECT run_id FROM feature_runs WHERE pool_id = ? ORDER BY 1", [pool_id])
    runs = _in(d.feature_runs)
    d.caches = _ids(
        con,
        f"SELECT cache_id FROM scoring_caches WHERE pool_run_id IN {runs} OR eval_run_id IN {runs} "
        "ORDER BY 1",
        [],
    )
    d.score_runs = _ids(
        con,
        f"SELECT score_run_id FROM score_runs WHERE pool_id = ? OR cache_id IN {_in(d.caches)} ORDER BY 1",
        [pool_id],
    )
    rows = con.execute(
        "SELECT selection_id, name, version FROM selections WHERE pool_id = ? "
        f"OR score_run_id IN {_in(d.score_runs)} ORDER BY 1",
        [pool_id],
    ).fetchall()
    d.selection_ids = [int(r[0]) for r in rows]
    d.selections = [f"{r[1]}@{r[2]}" for r in rows]
    sels = _in(d.selection_ids)
    d.exports = _ids(con, f"SELECT export_id FROM exports WHERE selection_id IN {sels} ORDER BY 1", [])
    d.cpt_runs = _ids(con, f"SELECT cpt_run_id FROM cpt_runs WHERE selection_id IN {sels} ORDER BY 1", [])
    d.decisions = int(
        con.execute("SELECT count(*) FROM decisions WHERE pool_id = ?", [pool_id]).fetchone()[0]
    )
    d.eval_results = int(
        con.execute("SELECT count(*) FROM eval_results WHERE eval_pool_id = ?", [pool_id]).fetchone()[0]
    )
    files = [r[0] for r in con.execute(f"SELECT dir FROM feature_runs WHERE run_id IN {runs}").fetchall()]
    files += [str(ws.root / "maps" / f"run-{r}") for r in d.feature_runs]
    files += [
        r[0]
        for r in con.execute(f"SELECT dir FROM scoring_caches WHERE cache_id IN {_in(d.caches)}").fetchall()
    ]
    files += [
        r[0]
        for r in con.execute(
            f"SELECT result_path FROM score_runs WHERE score_run_id IN {_in(d.score_runs)}"
        ).fetchall()
    ]
    for (path,) in con.execute(f"SELECT path FROM exports WHERE export_id IN {_in(d.exports)}").fetchall():
        if path:
            p = Path(path)
            files += [str(p), f"{p}.manifest.json", str(p.with_name(f"{p.stem}_images"))]
    d.files = [f for f in files if f]
    return d


def delete_rows(con: duckdb.DuckDBPyConnection, d: Dependents) -> None:
    """Delete the pool's rows and every dependent's (inside the caller's transaction)."""
    runs, caches, scores, sels = _in(d.feature_runs), _in(d.caches), _in(d.score_runs), _in(d.selection_ids)
    con.execute(f"UPDATE cpt_runs SET selection_id = NULL WHERE selection_id IN {sels}")
    for sql in (
        f"DELETE FROM exports WHERE selection_id IN {sels}",
        f"DELETE FROM selection_members WHERE selection_id IN {sels}",
        f"DELETE FROM selections WHERE selection_id IN {sels}",
        f"DELETE FROM score_runs WHERE score_run_id IN {scores}",
        f"DELETE FROM scoring_caches WHERE cache_id IN {caches}",
        f"DELETE FROM feature_shards WHERE run_id IN {runs}",
        f"DELETE FROM feature_runs WHERE run_id IN {runs}",
    ):
        con.execute(sql)
    for table, col in (("decisions", "pool_id"), ("eval_results", "eval_pool_id"), ("rejects", "pool_id"),
                       ("pairs", "pool_id"), ("pools", "pool_id")):  # fmt: skip
        con.execute(f"DELETE FROM {table} WHERE {col} = ?", [d.pool_id])


def _active_jobs_using(ws: Workspace, name: str) -> list[int]:
    from chips_core.workspace import jobs

    return [j.job_id for j in jobs.list_jobs(ws, active_only=True) if name in j.args[2:]]


def remove_pool(ws: Workspace, name: str, force: bool = False) -> Removed:
    """Remove pool `name`; refused (PoolError listing them) while something depends on it, unless `force`.

    Refused in any case while a background job that names the pool is running.
    """
    ws.check()
    busy = _active_jobs_using(ws, name)
    if busy:
        raise PoolError(
            f"pool {name!r} is used by running job(s) {', '.join(map(str, busy))}; "
            "wait for them or cancel them (`chips jobs WS --cancel ID`) first"
        )
    with ws.connect() as con:
        con.execute("BEGIN TRANSACTION")
        try:
            row = con.execute("SELECT pool_id FROM pools WHERE name = ?", [name]).fetchone()
            if row is None:
                raise PoolError(f"no pool named {name!r} in workspace {ws.root}")
            pool_id = int(row[0])
            deps = find_dependents(ws, con, pool_id, name)
            if not deps.empty() and not force:
                raise PoolError(
                    f"pool {name!r} has dependents: {deps.describe()}; "
                    f"`chips rm {ws.root} {name} --force` removes them too"
                )
            n_pairs = int(
                con.execute("SELECT count(*) FROM pairs WHERE pool_id = ?", [pool_id]).fetchone()[0]
            )
            n_rej = int(
                con.execute("SELECT count(*) FROM rejects WHERE pool_id = ?", [pool_id]).fetchone()[0]
            )
            delete_rows(con, deps)
            con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise
    removed, left = remove_files(ws, deps.files)
    return Removed(deps, n_pairs, n_rej, removed, left)


def remove_files(ws: Workspace, paths: list[str]) -> tuple[list[str], list[str]]:
    """Remove files and folders under the workspace folder; (removed, left in place with why)."""
    removed, left = [], []
    root = ws.root.resolve()
    for text in dict.fromkeys(paths):
        path = Path(text)
        if not path.exists() and not path.is_symlink():
            continue
        if not path.resolve().is_relative_to(root):
            left.append(f"{path} (outside the workspace)")
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(str(path))
        except OSError as exc:
            left.append(f"{path} ({exc})")
    return removed, left

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
from chips_core.workspace import catalog, store
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


def find_dependents(ws: Workspace, con: duckdb.DuckDBPyConnection, pool_id: int, name: str) -> Dependents:
    """Everything derived from pool `pool_id`, read on `con` (inside the caller's transaction)."""
    d = Dependents(pool_id, name)
    for key, value in catalog.pool_dependents(ws, con, pool_id).items():
        setattr(d, key, value)
    return d


def delete_rows(con: duckdb.DuckDBPyConnection, d: Dependents) -> None:
    """Delete the pool's rows and every dependent's (inside the caller's transaction)."""
    catalog.delete_pool_rows(con, d.pool_id, d.feature_runs, d.caches, d.score_runs, d.selection_ids)


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
        store.begin(con)
        try:
            pool_id = catalog.find_pool_id(con, name)
            if pool_id is None:
                raise PoolError(f"no pool named {name!r} in workspace {ws.root}")
            deps = find_dependents(ws, con, pool_id, name)
            if not deps.empty() and not force:
                raise PoolError(
                    f"pool {name!r} has dependents: {deps.describe()}; "
                    f"`chips rm {ws.root} {name} --force` removes them too"
                )
            n_pairs = catalog.count_pairs(con, pool_id)
            n_rej = catalog.count_rejects(con, pool_id)
            delete_rows(con, deps)
            store.commit(con)
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                store.rollback(con)
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

"""Background jobs and the workspace overview of `chips status`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from chips_core.workspace.catalog._db import Db, first, reading, writing

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "finish_job",
    "insert_job",
    "job_ids",
    "job_row",
    "set_job_pid",
    "set_job_progress",
    "set_job_running",
    "status_overview",
]


def insert_job(db: Db, job_id: int, kind: str, args: str, log_path: str) -> None:
    """Add a queued `jobs` row (`args`: JSON text)."""
    with writing(db) as con:
        con.execute(
            "INSERT INTO jobs (job_id, kind, args, status, progress, message, log_path, updated_at) "
            "VALUES (?, ?, ?, 'queued', 0, 'starting', ?, current_timestamp)",
            [job_id, kind, args, log_path],
        )


def set_job_pid(db: Db, job_id: int, pid: int) -> None:
    """Record a job's process id."""
    with writing(db) as con:
        con.execute("UPDATE jobs SET pid = ? WHERE job_id = ?", [pid, job_id])


def job_row(db: Db, job_id: int) -> tuple | None:
    """(job_id, kind, args JSON, status, pid, progress, message, log_path, started_at, updated_at,
    finished_at) of a job, or None."""
    with reading(db) as con:
        return first(
            con.execute(
                "SELECT job_id, kind, args, status, pid, progress, message, log_path, started_at, "
                "updated_at, finished_at FROM jobs WHERE job_id = ?",
                [int(job_id)],
            )
        )


def job_ids(db: Db) -> list[int]:
    """Every job id, newest first."""
    with reading(db) as con:
        return [r[0] for r in con.execute("SELECT job_id FROM jobs ORDER BY job_id DESC").fetchall()]


def finish_job(db: Db, job_id: int, status: str, message: str | None, only_if_active: bool) -> None:
    """Record a job's final status and message (`only_if_active`: unless it has ended already)."""
    cond = " AND status IN ('queued', 'running')" if only_if_active else ""
    progress = ", progress = 1" if status == "done" else ""
    with writing(db) as con:
        con.execute(
            f"UPDATE jobs SET status = ?, message = ?, updated_at = current_timestamp, "
            f"finished_at = current_timestamp{progress} WHERE job_id = ?{cond}",
            [status, message, int(job_id)],
        )


def set_job_running(db: Db, job_id: int, pid: int) -> None:
    """Mark a queued job running in process `pid`."""
    with writing(db) as con:
        con.execute(
            "UPDATE jobs SET status = 'running', pid = ?, message = 'running', "
            "updated_at = current_timestamp WHERE job_id = ? AND status = 'queued'",
            [pid, job_id],
        )


def set_job_progress(db: Db, job_id: int, fraction: float | None, message: str) -> None:
    """Record a running job's progress (None keeps the last fraction) and message."""
    with writing(db) as con:
        con.execute(
            "UPDATE jobs SET progress = coalesce(?, progress), message = ?, "
            "updated_at = current_timestamp WHERE job_id = ? AND status = 'running'",
            [fraction, message, job_id],
        )


_STATUS = {
    "feature runs": "SELECT f.run_id, p.name AS pool, m.name AS model, m.pretrained, f.status, f.n_pairs "
    "FROM feature_runs f LEFT JOIN pools p USING (pool_id) LEFT JOIN models m USING (model_id) "
    "ORDER BY 1",
    "scoring caches": "SELECT cache_id, pool_run_id, eval_run_id, status, dir FROM scoring_caches ORDER BY 1",
    "score runs": "SELECT s.score_run_id, p.name AS pool, s.method, s.cache_id, s.created_at "
    "FROM score_runs s LEFT JOIN pools p USING (pool_id) ORDER BY 1",
    "selections": "SELECT s.selection_id, s.name, s.version, p.name AS pool, s.ratio, s.n_selected, "
    "s.score_run_id FROM selections s LEFT JOIN pools p USING (pool_id) ORDER BY 1",
    "decisions": "SELECT p.name AS pool, d.action, count(*) AS n FROM decisions d "
    "LEFT JOIN pools p USING (pool_id) GROUP BY ALL ORDER BY 1, 2",
    "exports": "SELECT export_id, selection_id, format, path FROM exports ORDER BY 1",
    "cpt runs": "SELECT cpt_run_id, selection_id, status, checkpoint FROM cpt_runs ORDER BY 1",
    "jobs": "SELECT job_id, kind, status, round(progress, 3) AS progress, message FROM jobs ORDER BY 1",
}


def status_overview(db: Db) -> dict[str, pd.DataFrame]:
    """The tables `chips status` shows (besides pools, see `pools_overview`): feature runs, scoring
    caches, score runs, selections, decisions (counts), exports, cpt runs, jobs."""
    with reading(db) as con:
        return {title: con.execute(sql).df() for title, sql in _STATUS.items()}

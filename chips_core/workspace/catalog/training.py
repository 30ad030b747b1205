"""CPT runs and their progress, evaluation results."""

from __future__ import annotations

from typing import TYPE_CHECKING

from chips_core.workspace.catalog._db import Con, Db, first, reading, writing
from chips_core.workspace.store import Workspace

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "cpt_progress",
    "cpt_run_row",
    "cpt_run_status",
    "cpt_runs_overview",
    "delete_cpt_run",
    "eval_results_of_run",
    "insert_cpt_progress",
    "insert_cpt_run",
    "insert_eval_results",
    "latest_finished_cpt_run",
    "mean_lr",
    "set_cpt_checkpoint",
    "set_cpt_config",
    "set_cpt_status",
]


def insert_cpt_run(con: Con, cpt_run_id: int, selection_id: int | None, status: str, log_dir: str) -> None:
    """Add a `cpt_runs` row with an empty config."""
    con.execute(
        "INSERT INTO cpt_runs (cpt_run_id, selection_id, config, status, log_dir) VALUES (?, ?, '{}', ?, ?)",
        [cpt_run_id, selection_id, status, log_dir],
    )


def delete_cpt_run(db: Db, cpt_run_id: int) -> None:
    """Remove a CPT run's row."""
    with writing(db) as con:
        con.execute("DELETE FROM cpt_runs WHERE cpt_run_id = ?", [int(cpt_run_id)])


def set_cpt_config(db: Db, cpt_run_id: int, config: str, status: str) -> None:
    """Record a CPT run's config (JSON text) and status."""
    with writing(db) as con:
        con.execute(
            "UPDATE cpt_runs SET config = ?, status = ? WHERE cpt_run_id = ?", [config, status, cpt_run_id]
        )


def cpt_run_row(db: Db, cpt_run_id: int) -> tuple | None:
    """(config JSON, status, checkpoint, log_dir, selection_id) of a CPT run, or None."""
    with reading(db) as con:
        return first(
            con.execute(
                "SELECT config, status, checkpoint, log_dir, selection_id FROM cpt_runs WHERE cpt_run_id = ?",
                [int(cpt_run_id)],
            )
        )


def set_cpt_status(
    db: Db,
    cpt_run_id: int,
    status: str,
    finished_at: object = None,
    checkpoint: str | None = None,
    active: bool = False,
) -> None:
    """Set a CPT run's status: an active one gets no finish time; otherwise `finished_at` and the
    checkpoint (kept when None)."""
    with writing(db) as con:
        if active:
            con.execute(
                "UPDATE cpt_runs SET status = ?, finished_at = NULL WHERE cpt_run_id = ?",
                [status, cpt_run_id],
            )
        else:
            con.execute(
                "UPDATE cpt_runs SET status = ?, finished_at = ?, checkpoint = coalesce(?, checkpoint) "
                "WHERE cpt_run_id = ?",
                [status, finished_at, checkpoint, cpt_run_id],
            )


def set_cpt_checkpoint(db: Db, cpt_run_id: int, checkpoint: str) -> None:
    """Record a CPT run's newest checkpoint."""
    with writing(db) as con:
        con.execute("UPDATE cpt_runs SET checkpoint = ? WHERE cpt_run_id = ?", [checkpoint, cpt_run_id])


def cpt_run_status(db: Db, cpt_run_id: int) -> str:
    """A CPT run's recorded status."""
    with reading(db) as con:
        return first(con.execute("SELECT status FROM cpt_runs WHERE cpt_run_id = ?", [cpt_run_id]))[0]


def insert_cpt_progress(db: Db, rows: list[list]) -> None:
    """Store progress rows [cpt_run_id, step, epoch, loss, lr, samples_per_s, logged_at] (a step logged
    again replaces the earlier row)."""
    with writing(db) as con:
        con.executemany(
            "INSERT OR REPLACE INTO cpt_progress "
            "(cpt_run_id, step, epoch, loss, lr, samples_per_s, logged_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


def cpt_progress(db: Db, cpt_run_id: int) -> pd.DataFrame:
    """A CPT run's progress rows, by step."""
    with reading(db) as con:
        return con.execute("SELECT * FROM cpt_progress WHERE cpt_run_id = ? ORDER BY step", [cpt_run_id]).df()


def mean_lr(db: Db, cpt_run_id: int, start_step: int, end_step: int) -> float | None:
    """The mean learning rate of a CPT run's steps [start_step, end_step)."""
    with reading(db) as con:
        return first(
            con.execute(
                "SELECT avg(lr) FROM cpt_progress WHERE cpt_run_id = ? AND step >= ? AND step < ?",
                [cpt_run_id, start_step, end_step],
            )
        )[0]


def latest_finished_cpt_run(db: Db, selection_id: int) -> int | None:
    """The newest finished CPT run of a selection, or None."""
    with reading(db) as con:
        row = first(
            con.execute(
                "SELECT max(cpt_run_id) FROM cpt_runs WHERE selection_id = ? AND status = 'finished'",
                [selection_id],
            )
        )
    return None if row[0] is None else int(row[0])


def cpt_runs_overview(db: Db) -> pd.DataFrame:
    """CPT runs, newest first: cpt_run_id, selection (name), version, status, checkpoint, created_at,
    finished_at."""
    with reading(db) as con:
        return con.execute(
            "SELECT r.cpt_run_id, s.name AS selection, s.version, r.status, r.checkpoint, r.created_at, "
            "r.finished_at FROM cpt_runs r LEFT JOIN selections s USING (selection_id) "
            "ORDER BY r.cpt_run_id DESC"
        ).df()


def insert_eval_results(
    ws: Workspace, checkpoint: str, eval_pool_id: int, cpt_run_id: int | None, metrics: dict
) -> None:
    """Store one `eval_results` row per metric of an evaluation."""
    with ws.connect() as con:
        rows = [[ws.next_id(con), checkpoint, eval_pool_id, cpt_run_id, k, v] for k, v in metrics.items()]
        con.executemany(
            "INSERT INTO eval_results (result_id, checkpoint, eval_pool_id, cpt_run_id, metric, value) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )


def eval_results_of_run(db: Db, cpt_run_id: int) -> pd.DataFrame:
    """metric, value, eval_set, checkpoint of a CPT run's evaluation results, in order (an eval CSV, not
    a pool, has eval_set NULL)."""
    with reading(db) as con:
        return con.execute(
            "SELECT e.metric, e.value, p.name AS eval_set, e.checkpoint FROM eval_results e "
            "LEFT JOIN pools p ON p.pool_id = e.eval_pool_id WHERE e.cpt_run_id = ? ORDER BY e.result_id",
            [int(cpt_run_id)],
        ).df()

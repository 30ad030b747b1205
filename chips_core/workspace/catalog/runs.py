"""Models, feature runs and their shards (and frozen pool-order manifests), scoring caches, score runs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np

from chips_core.workspace.catalog._db import Con, Db, first, reading, writing

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ModelSpec",
    "cache_id_by_dir",
    "cache_manifest_info",
    "done_shard_indexes",
    "feature_run_row",
    "feature_runs_of_pool",
    "feature_shards",
    "find_feature_run",
    "find_model_id",
    "find_scoring_cache",
    "finish_feature_run",
    "finish_scoring_cache",
    "finished_caches",
    "insert_feature_run",
    "insert_feature_shard",
    "insert_model",
    "insert_score_run",
    "insert_scoring_cache",
    "latest_score_run",
    "manifest_rows",
    "model_spec",
    "models_overview",
    "run_model_id",
    "run_model_spec",
    "running_feature_run_dirs",
    "score_run_pool",
    "score_run_pool_id",
    "score_run_pool_names",
    "score_run_result_path",
    "score_run_row",
    "scoring_cache",
    "scoring_cache_origin",
    "shard_rows_done",
    "write_manifest",
]


# --- models ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A `models` row: how a model was loaded (open_clip name, pretrained tag, checkpoint file)."""

    model_id: int
    name: str
    pretrained: str | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None

    @property
    def random_init(self) -> bool:
        """Unpretrained weights (`random-init:seed=N` tag)."""
        return bool(self.pretrained) and self.pretrained.startswith("random-init:")

    def load_args(self) -> tuple[str, str | None, int | None]:
        """(name, pretrained, seed) that rebuild the model with `models.load_model(name, pretrained,
        seed=seed)`: the checkpoint file when there is one (a `local-dir:` bundle holds its own), the tag
        otherwise, and the seed instead for random-init weights."""
        if self.pretrained and self.pretrained.startswith("random-init:seed="):
            return self.name, None, int(self.pretrained.split("=", 1)[1])
        if self.checkpoint and not self.name.startswith("local-dir:"):
            return self.name, self.checkpoint, None
        return self.name, self.pretrained, None


def _spec(row: tuple | None) -> ModelSpec | None:
    if row is None:
        return None
    return ModelSpec(int(row[0]), *(None if v is None else str(v) for v in row[1:]))


def model_spec(db: Db, model_id: int) -> ModelSpec | None:
    """The ModelSpec of `models` row `model_id`, or None."""
    with reading(db) as con:
        return _spec(
            first(
                con.execute(
                    "SELECT model_id, name, pretrained, checkpoint, checkpoint_sha256 FROM models "
                    "WHERE model_id = ?",
                    [int(model_id)],
                )
            )
        )


def run_model_spec(db: Db, run_id: int) -> ModelSpec | None:
    """The ModelSpec of the model feature run `run_id` was made with, or None (no such run)."""
    with reading(db) as con:
        return _spec(
            first(
                con.execute(
                    "SELECT m.model_id, m.name, m.pretrained, m.checkpoint, m.checkpoint_sha256 "
                    "FROM feature_runs f JOIN models m USING (model_id) WHERE f.run_id = ?",
                    [int(run_id)],
                )
            )
        )


def find_model_id(db: Db, name: str, pretrained: str | None, checkpoint_sha256: str | None) -> int | None:
    """The first `models` row with this name, tag and checkpoint hash, or None."""
    with reading(db) as con:
        row = first(
            con.execute(
                "SELECT model_id FROM models WHERE name = ? AND pretrained IS NOT DISTINCT FROM ? "
                "AND checkpoint_sha256 IS NOT DISTINCT FROM ? ORDER BY model_id LIMIT 1",
                [name, pretrained, checkpoint_sha256],
            )
        )
    return None if row is None else int(row[0])


def insert_model(con: Con, spec: ModelSpec) -> None:
    """Add a `models` row."""
    con.execute(
        "INSERT INTO models (model_id, name, pretrained, checkpoint, checkpoint_sha256) "
        "VALUES (?, ?, ?, ?, ?)",
        [spec.model_id, spec.name, spec.pretrained, spec.checkpoint, spec.checkpoint_sha256],
    )


def models_overview(db: Db) -> pd.DataFrame:
    """name, pretrained, checkpoint of every distinct model, by name."""
    with reading(db) as con:
        return con.execute("SELECT DISTINCT name, pretrained, checkpoint FROM models ORDER BY name").df()


# --- feature runs and shards ----------------------------------------------------------------------------


def feature_runs_of_pool(db: Db, pool_name: str) -> list[tuple]:
    """(run_id, model_id, model name, pretrained, checkpoint) of the finished feature runs of pool
    `pool_name`, oldest first."""
    with reading(db) as con:
        return con.execute(
            "SELECT r.run_id, r.model_id, m.name, m.pretrained, m.checkpoint FROM feature_runs r "
            "JOIN pools p USING (pool_id) JOIN models m USING (model_id) "
            "WHERE p.name = ? AND r.status = 'done' ORDER BY r.run_id",
            [pool_name],
        ).fetchall()


def find_feature_run(db: Db, pool_id: int, model_id: int) -> tuple[int, str] | None:
    """(run_id, dir) of the newest feature run of (pool, model), finished or not, or None."""
    with reading(db) as con:
        row = first(
            con.execute(
                "SELECT run_id, dir FROM feature_runs WHERE pool_id = ? AND model_id = ? "
                "ORDER BY run_id DESC LIMIT 1",
                [int(pool_id), int(model_id)],
            )
        )
    return None if row is None else (int(row[0]), str(row[1]))


def insert_feature_run(
    con: Con, run_id: int, pool_id: int, model_id: int, run_dir: str, d_v: int, d_t: int
) -> None:
    """Add a running `feature_runs` row."""
    con.execute(
        "INSERT INTO feature_runs (run_id, pool_id, model_id, status, dir, d_v, d_t) "
        "VALUES (?, ?, ?, 'running', ?, ?, ?)",
        [run_id, pool_id, model_id, run_dir, d_v, d_t],
    )


def feature_run_row(db: Db, run_id: int) -> tuple | None:
    """(pool_id, model_id, status, dir, d_v, d_t) of feature run `run_id`, or None."""
    with reading(db) as con:
        return first(
            con.execute(
                "SELECT pool_id, model_id, status, dir, d_v, d_t FROM feature_runs WHERE run_id = ?",
                [int(run_id)],
            )
        )


def run_model_id(db: Db, run_id: int) -> int:
    """The model_id of feature run `run_id`."""
    with reading(db) as con:
        return first(con.execute("SELECT model_id FROM feature_runs WHERE run_id = ?", [int(run_id)]))[0]


def running_feature_run_dirs(db: Db) -> dict[int, str]:
    """run_id → dir of the feature runs recorded as running."""
    with reading(db) as con:
        return dict(con.execute("SELECT run_id, dir FROM feature_runs WHERE status = 'running'").fetchall())


def finish_feature_run(db: Db, run_id: int) -> None:
    """Mark a feature run done, with its number of pairs from its shards' completion rows."""
    with writing(db) as con:
        con.execute(
            "UPDATE feature_runs SET status = 'done', finished_at = current_timestamp, n_pairs = "
            "(SELECT coalesce(sum(n_rows), 0) FROM feature_shards WHERE run_id = ?) "
            "WHERE run_id = ? AND status <> 'done'",
            [int(run_id), int(run_id)],
        )


def feature_shards(db: Db, run_id: int) -> list[tuple[int, int]]:
    """(shard_index, n_rows) of the non-empty completed shards of a feature run, in order."""
    with reading(db) as con:
        return con.execute(
            "SELECT shard_index, n_rows FROM feature_shards WHERE run_id = ? AND n_rows > 0 "
            "ORDER BY shard_index",
            [int(run_id)],
        ).fetchall()


def done_shard_indexes(db: Db, run_id: int) -> set[int]:
    """Indices of a feature run's shards with a completion record."""
    with reading(db) as con:
        rows = con.execute(
            "SELECT shard_index FROM feature_shards WHERE run_id = ?", [int(run_id)]
        ).fetchall()
    return {int(r[0]) for r in rows}


def shard_rows_done(db: Db, run_id: int) -> int:
    """The number of rows in a feature run's completed shards."""
    with reading(db) as con:
        row = first(
            con.execute("SELECT coalesce(sum(n_rows), 0) FROM feature_shards WHERE run_id = ?", [int(run_id)])
        )
    return int(row[0])


def insert_feature_shard(con: Con, run_id: int, shard_index: int, n_rows: int, first_row: int) -> None:
    """A shard's completion record (kept when it exists already)."""
    con.execute(
        "INSERT INTO feature_shards (run_id, shard_index, n_rows, first_row) VALUES (?, ?, ?, ?) "
        "ON CONFLICT DO NOTHING",
        [run_id, shard_index, n_rows, first_row],
    )


def _sql_str(path: Path) -> str:
    return str(path).replace("'", "''")


def write_manifest(db: Db, pool_id: int, path: Path) -> None:
    """Write the pool's frozen order (pos, pair_id, filepath, caption by row_index) to parquet `path`."""
    with writing(db) as con:
        con.execute(
            f"COPY (SELECT (row_number() OVER (ORDER BY row_index, pair_id) - 1)::BIGINT AS pos, pair_id, "
            f"filepath, caption FROM pairs WHERE pool_id = {int(pool_id)} ORDER BY pos) "
            f"TO '{_sql_str(path)}' (FORMAT parquet, ROW_GROUP_SIZE 16384)"
        )


def manifest_rows(
    manifest: Path, start: int, end: int, con: Con | None = None
) -> tuple[np.ndarray, list[str], list[str]]:
    """(pair_ids, filepaths, captions) of positions [start, end) of a frozen pool-order manifest.

    Pass an open in-memory connection (`duckdb.connect()`) when reading many batches: opening one
    costs more than the read.
    """
    with contextlib.ExitStack() as stack:
        if con is None:
            con = stack.enter_context(duckdb.connect())
        rows = con.execute(
            "SELECT pair_id, filepath, caption FROM read_parquet(?) WHERE pos >= ? AND pos < ? ORDER BY pos",
            [str(manifest), start, end],
        ).fetchall()
    return np.asarray([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows], [r[2] for r in rows]


# --- scoring caches -------------------------------------------------------------------------------------


def scoring_cache(db: Db, cache_id: int) -> tuple[str, str, int, int] | None:
    """(dir, status, pool_run_id, eval_run_id) of scoring cache `cache_id`, or None."""
    with reading(db) as con:
        row = first(
            con.execute(
                "SELECT dir, status, pool_run_id, eval_run_id FROM scoring_caches WHERE cache_id = ?",
                [int(cache_id)],
            )
        )
    return None if row is None else tuple(row)


def find_scoring_cache(db: Db, pool_run: int, eval_run: int, config: str) -> tuple[int, str, str] | None:
    """(cache_id, dir, status) of the newest scoring cache of these feature runs and config JSON, or None."""
    with reading(db) as con:
        return first(
            con.execute(
                "SELECT cache_id, dir, status FROM scoring_caches WHERE pool_run_id = ? AND eval_run_id = ? "
                "AND config::VARCHAR = ? ORDER BY cache_id DESC LIMIT 1",
                [pool_run, eval_run, config],
            )
        )


def insert_scoring_cache(
    con: Con, cache_id: int, pool_run: int, eval_run: int, config: str, cache_dir: str
) -> None:
    """Add a running `scoring_caches` row."""
    con.execute(
        "INSERT INTO scoring_caches (cache_id, pool_run_id, eval_run_id, config, dir, status) "
        "VALUES (?, ?, ?, ?, ?, 'running')",
        [cache_id, pool_run, eval_run, config, cache_dir],
    )


def finish_scoring_cache(db: Db, cache_id: int) -> None:
    """Mark a scoring cache done."""
    with writing(db) as con:
        con.execute(
            "UPDATE scoring_caches SET status = 'done', finished_at = current_timestamp WHERE cache_id = ?",
            [int(cache_id)],
        )


def cache_id_by_dir(db: Db, cache_dir: str) -> int | None:
    """The cache_id of the scoring cache in folder `cache_dir`, or None."""
    with reading(db) as con:
        row = first(con.execute("SELECT cache_id FROM scoring_caches WHERE dir = ?", [str(cache_dir)]))
    return None if row is None else int(row[0])


def scoring_cache_origin(db: Db, cache_id: int) -> tuple[str, str, str, int] | None:
    """(config JSON, pool name, eval set name, pool run's model_id) of a scoring cache, or None."""
    with reading(db) as con:
        return first(
            con.execute(
                "SELECT c.config, pp.name, pe.name, fp.model_id FROM scoring_caches c "
                "JOIN feature_runs fp ON fp.run_id = c.pool_run_id JOIN pools pp ON pp.pool_id = fp.pool_id "
                "JOIN feature_runs fe ON fe.run_id = c.eval_run_id JOIN pools pe ON pe.pool_id = fe.pool_id "
                "WHERE c.cache_id = ?",
                [int(cache_id)],
            )
        )


def cache_manifest_info(db: Db, cache_id: int) -> tuple | None:
    """(cache_id, config JSON, dir, model name, pretrained, checkpoint, checkpoint_sha256, pool feature
    run_id) of a scoring cache, for export manifests; None when there is no such cache."""
    with reading(db) as con:
        return first(
            con.execute(
                "SELECT c.cache_id, c.config, c.dir, m.name, m.pretrained, m.checkpoint, "
                "m.checkpoint_sha256, f.run_id FROM scoring_caches c "
                "LEFT JOIN feature_runs f ON f.run_id = c.pool_run_id "
                "LEFT JOIN models m ON m.model_id = f.model_id WHERE c.cache_id = ?",
                [int(cache_id)],
            )
        )


def finished_caches(db: Db) -> pd.DataFrame:
    """Finished scoring caches with their pool and eval set names: those of the model each pool was first
    featurized with (`base_model`) first, then newest first."""
    with reading(db) as con:
        return con.execute(
            "SELECT c.cache_id, c.dir, c.status, c.pool_run_id, c.eval_run_id, fp.pool_id, "
            "pp.name AS pool_name, "
            "fe.pool_id AS eval_id, pe.name AS eval_name, c.created_at, c.config::VARCHAR AS config, "
            "fp.model_id = (SELECT f2.model_id FROM feature_runs f2 WHERE f2.pool_id = fp.pool_id "
            "AND f2.status = 'done' ORDER BY f2.run_id LIMIT 1) AS base_model "
            "FROM scoring_caches c JOIN feature_runs fp ON fp.run_id = c.pool_run_id "
            "JOIN pools pp ON pp.pool_id = fp.pool_id JOIN feature_runs fe ON fe.run_id = c.eval_run_id "
            "JOIN pools pe ON pe.pool_id = fe.pool_id WHERE c.status = 'done' "
            "ORDER BY base_model DESC, c.cache_id DESC"
        ).df()


# --- score runs -----------------------------------------------------------------------------------------


def insert_score_run(
    db: Db, score_run_id: int, cache_id: int | None, pool_id: int, method: str, params: str, result_path: str
) -> None:
    """Add a `score_runs` row (`params`: JSON text)."""
    with writing(db) as con:
        con.execute(
            "INSERT INTO score_runs (score_run_id, cache_id, pool_id, method, params, result_path) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [score_run_id, cache_id, pool_id, method, params, result_path],
        )


def score_run_row(db: Db, score_run_id: int) -> pd.DataFrame:
    """The `score_runs` row of `score_run_id` (an empty frame when there is none)."""
    with reading(db) as con:
        return con.execute("SELECT * FROM score_runs WHERE score_run_id = ?", [int(score_run_id)]).df()


def score_run_result_path(db: Db, score_run_id: int) -> tuple[str | None] | None:
    """(result_path,) of a score run, or None when there is no such score run."""
    with reading(db) as con:
        row = first(
            con.execute("SELECT result_path FROM score_runs WHERE score_run_id = ?", [int(score_run_id)])
        )
    return None if row is None else (row[0],)


def score_run_pool_id(db: Db, score_run_id: int) -> int | None:
    """The pool_id of a score run, or None when there is no such score run."""
    with reading(db) as con:
        row = first(con.execute("SELECT pool_id FROM score_runs WHERE score_run_id = ?", [int(score_run_id)]))
    return None if row is None else int(row[0])


def score_run_pool(db: Db, score_run_id: int) -> str | None:
    """The name of a score run's pool, or None when there is no such score run."""
    with reading(db) as con:
        row = first(
            con.execute(
                "SELECT p.name FROM score_runs s JOIN pools p USING (pool_id) WHERE s.score_run_id = ?",
                [int(score_run_id)],
            )
        )
    return None if row is None else str(row[0])


def score_run_pool_names(db: Db) -> list[str]:
    """The names of the pools that have a score run, sorted."""
    with reading(db) as con:
        return [
            r[0]
            for r in con.execute(
                "SELECT DISTINCT p.name FROM score_runs s JOIN pools p USING (pool_id) ORDER BY 1"
            ).fetchall()
        ]


def latest_score_run(db: Db, pool_id: int) -> int | None:
    """The newest score run of pool `pool_id`, or None."""
    with reading(db) as con:
        row = first(con.execute("SELECT max(score_run_id) FROM score_runs WHERE pool_id = ?", [int(pool_id)]))
    return None if row[0] is None else int(row[0])

"""The workspace: one folder holding a DuckDB file (versioned schema) and memory-mapped arrays.

DuckDB allows one writing process at a time. Every process (CLI, background job, dashboard) opens
short-lived connections through `Workspace.connect()`, which retries while another process holds the
file lock, so a dashboard can read while a job writes between its short transactions. Within one process
(the dashboard serving several browsers) DuckDB refuses a read-only and a writing connection at the same
time; `connect()` waits for that too.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb

from chips_core.errors import ChipsError

SCHEMA_VERSION = 2  # 2: team curation (members, audit_log, selection_decisions, decision identity)
DB_NAME = "chips.duckdb"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE SEQUENCE IF NOT EXISTS id_seq START 1;
CREATE TABLE IF NOT EXISTS pools (
    pool_id INTEGER PRIMARY KEY, name VARCHAR UNIQUE NOT NULL, kind VARCHAR NOT NULL,  -- 'pool' | 'eval'
    source VARCHAR NOT NULL, format VARCHAR NOT NULL, options JSON, status VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS pairs (
    pool_id INTEGER NOT NULL, pair_id BIGINT NOT NULL, row_index BIGINT NOT NULL,
    filepath VARCHAR NOT NULL,       -- absolute path, or 'absolute/shard.tar::member' for WebDataset
    caption VARCHAR NOT NULL, label VARCHAR, width INTEGER, height INTEGER,
    PRIMARY KEY (pool_id, pair_id));
CREATE TABLE IF NOT EXISTS rejects (
    pool_id INTEGER NOT NULL, source_ref VARCHAR NOT NULL, reason VARCHAR NOT NULL, detail VARCHAR,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp, PRIMARY KEY (pool_id, source_ref));
CREATE TABLE IF NOT EXISTS models (
    model_id INTEGER PRIMARY KEY, name VARCHAR NOT NULL, pretrained VARCHAR, checkpoint VARCHAR,
    checkpoint_sha256 VARCHAR, created_at TIMESTAMP NOT NULL DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS feature_runs (
    run_id INTEGER PRIMARY KEY, pool_id INTEGER NOT NULL, model_id INTEGER NOT NULL,
    status VARCHAR NOT NULL, dir VARCHAR NOT NULL, n_pairs BIGINT, d_v INTEGER, d_t INTEGER,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp, finished_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS feature_shards (   -- completion records: a shard exists iff its row is here
    run_id INTEGER NOT NULL, shard_index INTEGER NOT NULL, n_rows BIGINT NOT NULL,
    first_row BIGINT NOT NULL, completed_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (run_id, shard_index));
CREATE TABLE IF NOT EXISTS scoring_caches (
    cache_id INTEGER PRIMARY KEY, pool_run_id INTEGER NOT NULL, eval_run_id INTEGER NOT NULL,
    config JSON NOT NULL, dir VARCHAR NOT NULL, status VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp, finished_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS score_runs (
    score_run_id INTEGER PRIMARY KEY, cache_id INTEGER, pool_id INTEGER NOT NULL, method VARCHAR NOT NULL,
    params JSON NOT NULL, result_path VARCHAR, created_at TIMESTAMP NOT NULL DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS decisions (   -- append-only; the latest row per (pool_id, pair_id) wins
    decision_id INTEGER PRIMARY KEY, pool_id INTEGER NOT NULL, pair_id BIGINT NOT NULL,
    action VARCHAR NOT NULL,             -- 'include' | 'exclude' | 'clear' | 'note'
    note VARCHAR, author VARCHAR, score_run_id INTEGER,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    subject VARCHAR, email VARCHAR);      -- who decided: the ID token's subject and e-mail
CREATE TABLE IF NOT EXISTS selections (
    selection_id INTEGER PRIMARY KEY, name VARCHAR NOT NULL, version INTEGER NOT NULL,
    pool_id INTEGER NOT NULL, score_run_id INTEGER, ratio DOUBLE NOT NULL, params JSON NOT NULL,
    n_selected BIGINT NOT NULL, created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    UNIQUE (name, version));
CREATE TABLE IF NOT EXISTS selection_members (
    selection_id INTEGER NOT NULL, pair_id BIGINT NOT NULL, rank BIGINT, source VARCHAR NOT NULL,
    PRIMARY KEY (selection_id, pair_id));   -- source: 'score' | 'include'
CREATE TABLE IF NOT EXISTS selection_decisions (   -- exactly which decision rows a selection applied
    selection_id INTEGER NOT NULL, decision_id INTEGER NOT NULL, PRIMARY KEY (selection_id, decision_id));
CREATE TABLE IF NOT EXISTS exports (
    export_id INTEGER PRIMARY KEY, selection_id INTEGER NOT NULL, format VARCHAR NOT NULL,
    path VARCHAR NOT NULL, manifest JSON, created_at TIMESTAMP NOT NULL DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS cpt_runs (
    cpt_run_id INTEGER PRIMARY KEY, selection_id INTEGER, config JSON NOT NULL, status VARCHAR NOT NULL,
    log_dir VARCHAR NOT NULL, checkpoint VARCHAR, created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    finished_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS cpt_progress (
    cpt_run_id INTEGER NOT NULL, step BIGINT NOT NULL, epoch DOUBLE, loss DOUBLE, lr DOUBLE,
    samples_per_s DOUBLE, logged_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (cpt_run_id, step));
CREATE TABLE IF NOT EXISTS eval_results (
    result_id INTEGER PRIMARY KEY, checkpoint VARCHAR NOT NULL, eval_pool_id INTEGER NOT NULL,
    cpt_run_id INTEGER, metric VARCHAR NOT NULL, value DOUBLE NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY, kind VARCHAR NOT NULL, args JSON NOT NULL, status VARCHAR NOT NULL,
    pid INTEGER, progress DOUBLE, message VARCHAR, log_path VARCHAR,
    started_at TIMESTAMP NOT NULL DEFAULT current_timestamp, updated_at TIMESTAMP, finished_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS members (   -- append-only; the latest row per member is the role in force
    member_row INTEGER PRIMARY KEY,
    member VARCHAR NOT NULL,             -- lower-case e-mail, or the ID token's subject when it has none
    role VARCHAR NOT NULL,               -- 'viewer' | 'curator' | 'lead'
    granted_by VARCHAR NOT NULL, granted_at TIMESTAMP NOT NULL DEFAULT current_timestamp);
CREATE TABLE IF NOT EXISTS audit_log (   -- append-only: selections, exports, training, grants, refusals
    event_id INTEGER PRIMARY KEY, created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    subject VARCHAR NOT NULL, email VARCHAR, kind VARCHAR NOT NULL, action VARCHAR,
    outcome VARCHAR NOT NULL,            -- 'ok' | 'refused'
    pool_id INTEGER, pair_id BIGINT, object_id INTEGER, score_run_id INTEGER, params JSON, detail VARCHAR);
"""

# upgrades an older workspace in place: each step is idempotent, run by `Workspace.init` and on first use
_UPGRADES = """
ALTER TABLE decisions ADD COLUMN IF NOT EXISTS subject VARCHAR;
ALTER TABLE decisions ADD COLUMN IF NOT EXISTS email VARCHAR;
"""
_current: set[Path] = set()  # workspaces this process has seen at SCHEMA_VERSION
# DuckDB (2.0) shares one database instance among a process's connections and races when threads open
# and close them at once (seen as "Table Function with name pandas_scan does not exist" while two dashboard
# sessions decide at the same moment): opening and closing take turns; the work in between does not
_OPEN_CLOSE = threading.Lock()


class WorkspaceError(ChipsError):
    """A workspace problem with a message meant for the user."""


class Workspace:
    """A CHIPS workspace folder. Cheap to construct; opens DuckDB only inside `connect()`."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.db_path = self.root / DB_NAME

    @classmethod
    def init(cls, root: str | os.PathLike) -> Workspace:
        """Create the folder and schema (idempotent)."""
        ws = cls(root)
        ws.root.mkdir(parents=True, exist_ok=True)
        for sub in ("features", "caches", "scores", "exports", "cpt", "thumbs", "logs"):
            (ws.root / sub).mkdir(exist_ok=True)
        with ws._open(read_only=False) as con:
            _create_or_upgrade(con)
        _current.add(ws.db_path)
        return ws

    def check(self) -> None:
        """Raise a WorkspaceError naming the folder when it is not an initialised workspace; bring an
        older workspace's schema up to date the first time this process sees it."""
        if not self.db_path.exists():
            raise WorkspaceError(
                f"{self.root} is not a CHIPS workspace (no {DB_NAME}); run `chips init {self.root}`"
            )
        if self.db_path in _current:
            return
        with self._open(read_only=True) as con:
            version = con.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        if version is None or version < SCHEMA_VERSION:
            try:
                with self._open(read_only=False) as con:
                    _create_or_upgrade(con)
            except WorkspaceError as exc:
                if "is busy" in str(exc):
                    raise
                raise WorkspaceError(
                    f"workspace {self.root} has schema version {version} and needs a one-time upgrade to "
                    f"version {SCHEMA_VERSION}, which needs write access: run `chips status {self.root}` "
                    f"once as a user who can write to it ({exc})"
                ) from exc
        _current.add(self.db_path)

    @contextlib.contextmanager
    def connect(
        self, read_only: bool = False, timeout_s: float = 60.0
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection to an initialised, up-to-date workspace; retries while another process
        holds the write lock.

        Keep the `with` block short: the lock is held for its whole duration.
        """
        self.check()
        with self._open(read_only, timeout_s) as con:
            yield con

    @contextlib.contextmanager
    def _open(self, read_only: bool, timeout_s: float = 60.0) -> Iterator[duckdb.DuckDBPyConnection]:
        deadline = time.monotonic() + timeout_s
        delay = 0.02
        while True:
            try:
                with _OPEN_CLOSE:
                    con = duckdb.connect(str(self.db_path), read_only=read_only)
                break
            # another process holds the file lock ("Could not set lock on file"), or another thread of this
            # process has a connection open in the other mode ("... with a different configuration"): both
            # are short-lived, so wait for them
            except (duckdb.IOException, duckdb.ConnectionException) as exc:
                text = str(exc).lower()
                busy = "lock" in text or "different configuration" in text
                if not busy:
                    raise WorkspaceError(f"cannot open workspace {self.db_path}: {exc}") from exc
                if time.monotonic() > deadline:
                    raise WorkspaceError(f"workspace {self.db_path} is busy: {exc}") from exc
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.5)
        try:
            yield con
        finally:
            with _OPEN_CLOSE:
                con.close()

    def next_id(self, con: duckdb.DuckDBPyConnection) -> int:
        """A fresh id from the workspace-wide sequence, for a row inserted on the same connection.

        DuckDB persists the sequence step only with a write: a bare autocommit `nextval` followed by
        closing the connection hands the same id out again. Without an insert to follow, use `new_id`.
        """
        return int(con.execute("SELECT nextval('id_seq')").fetchone()[0])

    def new_id(self) -> int:
        """A fresh workspace-wide id that stays used even if nothing else is written with it."""
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            value = self.next_id(con)
            con.execute("COMMIT")
        return value


def _create_or_upgrade(con: duckdb.DuckDBPyConnection) -> None:
    """Create every table (idempotent), apply the upgrades and record SCHEMA_VERSION, in one transaction."""
    con.execute("BEGIN TRANSACTION")
    con.execute(_SCHEMA)
    con.execute(_UPGRADES)
    con.execute("DELETE FROM schema_version")
    con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])
    con.execute("COMMIT")


def begin(con: duckdb.DuckDBPyConnection) -> None:
    """Start a transaction on `con` (several catalog calls then commit or roll back together)."""
    con.execute("BEGIN TRANSACTION")


def commit(con: duckdb.DuckDBPyConnection) -> None:
    """Commit the transaction open on `con`."""
    con.execute("COMMIT")


def rollback(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back the transaction open on `con`."""
    con.execute("ROLLBACK")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see either the old or the whole new content, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path` (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise

"""Connection plumbing shared by the catalog modules: a function takes a Workspace (it opens a short-lived
connection itself) or an open connection (it runs inside the caller's transaction)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Union

import duckdb

from chips_core.workspace.store import Workspace

Con = duckdb.DuckDBPyConnection
Db = Union[Workspace, Con]  # noqa: UP007


@contextlib.contextmanager
def _connection(db: Db, read_only: bool) -> Iterator[Con]:
    """`db` itself when it is a connection, else a short-lived connection of the workspace."""
    if isinstance(db, Workspace):
        with db.connect(read_only=read_only) as con:
            yield con
    else:
        yield db


def reading(db: Db) -> contextlib.AbstractContextManager[Con]:
    """`db` itself when it is a connection, else a short-lived read-only connection of the workspace."""
    return _connection(db, read_only=True)


def writing(db: Db) -> contextlib.AbstractContextManager[Con]:
    """`db` itself when it is a connection, else a short-lived writing connection of the workspace."""
    return _connection(db, read_only=False)


def in_list(ids: list[int]) -> str:
    """An SQL `IN` list of integers (`(NULL)` when empty, which matches nothing)."""
    return "(" + ",".join(str(int(i)) for i in ids) + ")" if ids else "(NULL)"


def first(result: Con) -> tuple | None:
    """The first row of a query result, or None, reading the result to its end (DuckDB refuses some work
    on a connection, e.g. `register`, while a result is unfinished)."""
    rows = result.fetchall()
    return rows[0] if rows else None

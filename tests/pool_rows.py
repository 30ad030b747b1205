"""A pool written straight into a workspace's tables, for tests that need pairs but no images."""

from __future__ import annotations

import pandas as pd

from chips_core.workspace.store import Workspace


def add_pool(ws: Workspace, pairs: pd.DataFrame, name: str = "pool") -> int:
    """Insert pool `name` and its `pairs` (pair_id, row_index, filepath, caption[, label]); its pool_id."""
    cols = [c for c in ("pair_id", "row_index", "filepath", "caption", "label") if c in pairs.columns]
    with ws.connect() as con:
        pool_id = ws.next_id(con)
        con.execute(
            "INSERT INTO pools (pool_id, name, kind, source, format, status) "
            "VALUES (?, ?, 'pool', 'x', 'csv', 'ready')",
            [pool_id, name],
        )
        con.register("_p", pairs[cols])
        con.execute(
            f"INSERT INTO pairs (pool_id, {', '.join(cols)}) SELECT ?, {', '.join(cols)} FROM _p", [pool_id]
        )
        con.unregister("_p")
    return pool_id

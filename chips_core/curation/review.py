"""The review queue: the pairs nearest the selection cut-off, one after another, closest first.

The cut-off lies between the last selected rank and the next one. A pair's distance is 1 for the two pairs
beside it (the last one in, the first one out), 2 for the next two, and so on; at equal distance the selected
pair comes first, so the queue reads rank c, c+1, c−1, c+2, ... for a cut-off after rank c.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import pandas as pd


def cutoff_rank(ranking: pd.DataFrame) -> int:
    """The rank of the last selected pair (column `selected`), 0 when none is selected."""
    chosen = ranking.loc[ranking["selected"].astype(bool), "rank"]
    return int(chosen.max()) if len(chosen) else 0


def queue(ranking: pd.DataFrame, cutoff: int) -> pd.DataFrame:
    """Every ranked pair, nearest the cut-off after rank `cutoff` first.

    Columns: pair_id, rank, above (ranked above the cut-off, i.e. inside the selection by rank) and
    distance (how many ranks from the cut-off, 1 = next to it).
    """
    rank = ranking["rank"].to_numpy(dtype=np.int64)
    above = rank <= cutoff
    distance = np.where(above, cutoff - rank + 1, rank - cutoff)
    order = np.lexsort((~above, distance))  # by distance, then the selected side first
    return pd.DataFrame(
        {
            "pair_id": ranking["pair_id"].to_numpy(dtype=np.int64)[order],
            "rank": rank[order],
            "above": above[order],
            "distance": distance[order],
        }
    )


def step(
    pair_ids: Sequence[int], pos: int, direction: int = 1, skip: Collection[int] = frozenset()
) -> int | None:
    """The queue position after `pos` (0-based) going `direction` (+1 or −1), passing over pairs in
    `skip` (e.g. the pairs already decided); None past either end."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    i = pos + direction
    while 0 <= i < len(pair_ids):
        if int(pair_ids[i]) not in skip:
            return i
        i += direction
    return None

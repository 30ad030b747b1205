"""Batch membership as a function of (seed, pair_id) (METHOD.md §2, "Batches").

A pair's InfoNCE gradient depends on its in-batch negatives, so every run that scores the same pool
(streamed, resumed after a kill, split over workers, or fed the ids in another order) must form the
same batches. Pairs are ordered by a 64-bit mix of (seed, pair_id), ties broken by pair_id, and that
order is cut into ceil(N/B) near-equal batches (sizes differ by at most one; never a batch of one).
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(pair_ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 finaliser of pair_id ⊕ f(seed): a well-spread uint64 key per pair, identical everywhere."""
    x = np.asarray(pair_ids, dtype=np.int64).view(np.uint64).copy()
    with np.errstate(over="ignore"):
        s = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + _GOLDEN
        x ^= s
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def n_batches(n: int, batch_size: int) -> int:
    """ceil(n/B), lowered when needed so that no batch holds a single pair."""
    if batch_size < 2:
        raise ValueError(
            f"batch_size must be at least 2 (a batch of one has zero gradient), got {batch_size}"
        )
    if n < 2:
        raise ValueError(f"need at least 2 pairs to form an InfoNCE batch, got {n}")
    return max(1, min(-(-n // batch_size), n // 2))


def hashed_order(pair_ids: np.ndarray, seed: int) -> np.ndarray:
    """Row indices of `pair_ids` sorted by (mix64(seed, id), id); refuses duplicate ids."""
    pair_ids = np.asarray(pair_ids, dtype=np.int64)
    if len(np.unique(pair_ids)) != len(pair_ids):
        raise ValueError("pair_ids contain duplicates; batch membership needs unique ids")
    return np.lexsort((pair_ids, mix64(pair_ids, seed)))


def assign_batches(pair_ids: np.ndarray, batch_size: int, seed: int) -> list[np.ndarray]:
    """Row indices (into `pair_ids`) of each batch: the hashed order cut into near-equal pieces."""
    nb = n_batches(len(pair_ids), batch_size)
    return np.array_split(hashed_order(pair_ids, seed), nb)


def batch_index(pair_ids: np.ndarray, batch_size: int, seed: int) -> np.ndarray:
    """(N,) batch number of each row of `pair_ids` (any order of the same id set gives the same mapping)."""
    out = np.empty(len(pair_ids), dtype=np.int64)
    for b, rows in enumerate(assign_batches(pair_ids, batch_size, seed)):
        out[rows] = b
    return out

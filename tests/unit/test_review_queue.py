"""The review queue's order (chips_core.curation.review) against an order computed independently."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from chips_core.curation import review

pytestmark = pytest.mark.unit


def _ranking(n: int, ratio: float, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**6, size=n, replace=False).astype(np.int64) - 500_000
    rank = np.arange(1, n + 1)
    frame = pd.DataFrame({"pair_id": ids, "rank": rank, "selected": rank <= math.ceil(ratio * n)})
    return frame.sample(frac=1.0, random_state=seed)  # the queue must not rely on the row order


def _expected(frame: pd.DataFrame, cutoff: int) -> list[int]:
    """Walk outwards from the cut-off by hand: last in, first out, second last in, second out, ..."""
    by_rank = dict(zip(frame["rank"], frame["pair_id"], strict=True))
    out = []
    for d in range(1, len(frame) + 1):
        for r in (cutoff - d + 1, cutoff + d):
            if r in by_rank:
                out.append(int(by_rank[r]))
    return out


@pytest.mark.parametrize(("n", "ratio"), [(48, 0.3), (10, 0.05), (10, 1.0), (7, 0.5), (1, 1.0)])
def test_queue_walks_outwards_from_the_cut_off(n, ratio):
    frame = _ranking(n, ratio)
    cutoff = review.cutoff_rank(frame)
    assert cutoff == math.ceil(ratio * n)
    q = review.queue(frame, cutoff)
    assert q["pair_id"].tolist() == _expected(frame, cutoff)
    assert sorted(q["pair_id"]) == sorted(frame["pair_id"])
    ranks = q["rank"].to_numpy()
    assert (q["above"] == (ranks <= cutoff)).all()
    assert (q["distance"] == np.where(ranks <= cutoff, cutoff + 1 - ranks, ranks - cutoff)).all()


def test_queue_of_48_at_ratio_0_3_starts_at_ranks_15_16_14():
    frame = _ranking(48, 0.3)
    q = review.queue(frame, review.cutoff_rank(frame))
    assert q["rank"].head(6).tolist() == [15, 16, 14, 17, 13, 18]
    assert q["distance"].head(4).tolist() == [1, 1, 2, 2] and q["above"].head(2).tolist() == [True, False]


def test_nothing_selected_starts_at_the_top():
    frame = _ranking(5, 0.5).assign(selected=False)
    assert review.cutoff_rank(frame) == 0
    assert review.queue(frame, 0)["rank"].tolist() == [1, 2, 3, 4, 5]


def test_step_passes_over_skipped_pairs_and_stops_at_the_ends():
    ids = [10, 11, 12, 13, 14]
    assert review.step(ids, 0) == 1
    assert review.step(ids, 0, skip={11, 12}) == 3
    assert review.step(ids, 3, skip={14}) is None
    assert review.step(ids, 4) is None
    assert review.step(ids, 3, -1, skip={12, 11}) == 0
    assert review.step(ids, 0, -1) is None
    with pytest.raises(ValueError):
        review.step(ids, 0, 2)

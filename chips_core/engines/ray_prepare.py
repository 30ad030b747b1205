"""The Ray engine for prepare (`--engine ray`): the pool's chunks computed by actors, same cache on disk.

The eval pass, the cache's config and its completion record come from `prepare.prepare` itself; the
pool's chunks (whole hashed batches, `batches.py`) are computed by actors with prepare's own chunk
function, and the driver writes each chunk's files (completion record last). Φ̃_pos/Φ̃_neg stay per-chunk
sums that `ScoringCache` reduces, exactly as for the local prepare. Imported only for the Ray engine.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from chips_core.engines.ray_featurize import actor_count, ray, ray_session  # ray: imported as it needs


class _RowsRequestedError(Exception):
    """Raised by _StopAtRows: prepare reached the pool chunks (config, eval pass and checks are done)."""


class _StopAtRows:
    """A FeatureSource that lets prepare do its bookkeeping and eval pass, and stops it at the first pool
    read, so the chunks can be computed on the cluster."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def pair_ids(self) -> np.ndarray:
        return self.pool.pair_ids()

    def __len__(self) -> int:
        return len(self.pool)

    def rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise _RowsRequestedError

    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        raise _RowsRequestedError


class _ChunkWorker:
    """An actor that computes whole chunks of a scoring cache with prepare's own chunk function."""

    def __init__(self, params: Any, config: Any, mu_x: np.ndarray, mu_y: np.ndarray, n_curv: int) -> None:
        from chips_core.scoring import prepare as prep
        from chips_core.scoring.endpoint import parse_blocks
        from chips_core.scoring.sketch import make_sketch

        self.prep, self.config, self.n_curv = prep, config, n_curv
        self.dp = prep._dev_params(params, config)
        self.sk = make_sketch(config.sketch, self.dp, config.k_max, config.seed, parse_blocks(config.blocks))
        self.mu_x, self.mu_y = prep._tensor(mu_x, self.dp.W_v), prep._tensor(mu_y, self.dp.W_v)

    def chunk(self, c: int, bs: list[int], sizes: list[int], ids: np.ndarray, h: np.ndarray, t: np.ndarray):
        """Files (name, bytes) of chunk c, whose batches bs hold the rows given, in batch order."""
        local = [None] * (max(bs) + 1)
        start = 0
        for b, n in zip(bs, sizes, strict=True):
            local[b], start = np.arange(start, start + n), start + n
        src = self.prep.ArrayFeatures(ids, h, t)
        with tempfile.TemporaryDirectory(prefix="chips-chunk-") as tmp:
            self.prep._write_chunk(Path(tmp), c, src, bs, local, self.sk, self.dp, self.config,
                                   self.mu_x, self.mu_y, ids, self.n_curv)  # fmt: skip
            d = Path(tmp) / f"chunk-{c:05d}"
            names = sorted(os.listdir(d), key=lambda x: x == "done.json")  # completion record last
            return c, [(x, (d / x).read_bytes()) for x in names]


def prepare_ray(
    pool: Any,
    eval_set: Any,
    params: Any,
    config: Any,
    out_dir: str | Path,
    progress: Any = None,
    *,
    address: str | None = None,
    num_workers: int | None = None,
    num_gpus_per_worker: float = 0.0,
    num_cpus: int | None = None,
) -> Any:
    """`prepare.prepare` with the pool's chunks computed by `num_workers` Ray actors; same cache on disk.

    `num_workers` defaults to one per `num_gpus_per_worker` GPUs of the cluster (1 for CPU actors).

    The driver reads each chunk's feature rows and ships them to a worker (no shared filesystem needed),
    and writes the returned chunk files atomically, completion record last, so a killed run resumes.
    """
    from chips_core.scoring.prepare import PrepareProgress, pool_batches, prepare
    from chips_core.workspace.store import atomic_write_bytes

    if (num_workers is not None and num_workers < 1) or num_gpus_per_worker < 0:
        raise ValueError(f"num_workers ({num_workers}) must be >= 1, num_gpus_per_worker >= 0")
    if num_gpus_per_worker > 0 and config.device != "cuda":
        raise ValueError(f"num_gpus_per_worker={num_gpus_per_worker} needs config.device 'cuda'")
    out = Path(out_dir)
    try:
        return prepare(_StopAtRows(pool), eval_set, params, config, out, progress)
    except _RowsRequestedError:
        pass
    batches = pool_batches(pool, config)
    n_curv = -(-min(config.curvature_pairs, len(pool)) // len(batches[0]))
    step = config.chunk_batches
    chunks = [list(range(s, min(s + step, len(batches)))) for s in range(0, len(batches), step)]
    todo = [c for c in range(len(chunks)) if not (out / f"chunk-{c:05d}" / "done.json").exists()]
    ids_all = np.asarray(pool.pair_ids(), dtype=np.int64)
    ev = np.load(out / "eval.npz")
    t0, n_rows = time.monotonic(), 0
    with ray_session(address, num_cpus):
        num_workers = actor_count(num_workers, num_gpus_per_worker, "prepare")
        opts = {"num_cpus": 1, "num_gpus": num_gpus_per_worker, "max_restarts": 2, "max_task_retries": 2}
        args = (params.to(device="cpu"), config, ev["mu_x"], ev["mu_y"], n_curv)
        pool_ = ray.util.ActorPool(
            [ray.remote(**opts)(_ChunkWorker).remote(*args) for _ in range(num_workers)]
        )

        def submit(actor: Any, c: int) -> Any:
            rows = np.concatenate([batches[b] for b in chunks[c]])
            h, t = pool.rows(rows)
            return actor.chunk.remote(c, chunks[c], [len(batches[b]) for b in chunks[c]], ids_all[rows], h, t)

        for c, files in pool_.map_unordered(submit, todo):
            for name, data in files:
                atomic_write_bytes(out / f"chunk-{c:05d}" / name, data)
            n_rows += sum(len(batches[b]) for b in chunks[c])
            if progress:
                rate = n_rows / max(time.monotonic() - t0, 1e-9)
                progress(PrepareProgress("pool", n_rows, len(pool), rate, None))
    return prepare(pool, eval_set, params, config, out, progress)

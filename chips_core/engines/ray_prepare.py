"""The Ray engine for prepare (`--engine ray`): the pool's chunks computed by actors, same cache on disk.

The driver runs prepare's public steps as the local `prepare.prepare` does (`open_cache`, `write_eval`,
`plan_chunks`, `write_chunk`, `finish`); only the chunks are computed elsewhere, by actors that each hold a
`prepare.Scorer` built from the same arguments (so the same sketch) and return `ChunkData`, which the driver
writes (completion record last). Φ̃_pos/Φ̃_neg stay per-chunk sums that `ScoringCache` reduces, exactly as
for the local prepare. Imported only for the Ray engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from chips_core.engines.ray_featurize import actor_count, ray, ray_session  # ray: imported as it needs


class _ChunkWorker:
    """An actor that computes whole chunks of a scoring cache with prepare's `Scorer.chunk`."""

    def __init__(self, params: Any, config: Any, mu_x: np.ndarray, mu_y: np.ndarray, n_curv: int) -> None:
        from chips_core.scoring.prepare import Scorer

        self.scorer = Scorer(params, config)
        self.mu_x, self.mu_y, self.n_curv = mu_x, mu_y, n_curv

    def chunk(self, c: int, bs: list[int], sizes: list[int], ids: np.ndarray, h: np.ndarray, t: np.ndarray):
        """The ChunkData of chunk c, whose batches bs hold the rows given (ids, h, t), in batch order."""
        from chips_core.scoring.prepare import ArrayFeatures

        bounds = np.cumsum([0, *sizes])
        rows = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(bs))]
        src = ArrayFeatures(ids, h, t)
        return self.scorer.chunk(c, src, ids, bs, rows, self.mu_x, self.mu_y, self.n_curv)


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
    from chips_core.scoring.cache import write_chunk
    from chips_core.scoring.prepare import start

    if (num_workers is not None and num_workers < 1) or num_gpus_per_worker < 0:
        raise ValueError(f"num_workers ({num_workers}) must be >= 1, num_gpus_per_worker >= 0")
    if num_gpus_per_worker > 0 and config.device != "cuda":
        raise ValueError(f"num_gpus_per_worker={num_gpus_per_worker} needs config.device 'cuda'")
    run = start(pool, eval_set, params, config, out_dir, progress)
    plan = run.plan
    if run.todo:
        with ray_session(address, num_cpus):
            num_workers = actor_count(num_workers, num_gpus_per_worker, "prepare")
            opts = {"num_cpus": 1, "num_gpus": num_gpus_per_worker, "max_restarts": 2, "max_task_retries": 2}
            args = (params.to(device="cpu"), config, run.mu_x, run.mu_y, plan.n_curv)
            actors = ray.util.ActorPool(
                [ray.remote(**opts)(_ChunkWorker).remote(*args) for _ in range(num_workers)]
            )

            def submit(actor: Any, c: int) -> Any:
                rows = plan.rows(c)
                h, t = pool.rows(rows)
                sizes = [len(plan.batches[b]) for b in plan.chunks[c]]
                return actor.chunk.remote(c, plan.chunks[c], sizes, run.ids[rows], h, t)

            for data in actors.map_unordered(submit, run.todo):
                write_chunk(run.out, data)
                run.chunk_written(data.chunk)
    return run.finish()

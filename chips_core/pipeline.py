"""The workspace-level pipeline steps shared by the CLI, background jobs, the demo builder and experiments.

Each step finds its inputs in the workspace tables (feature runs, models, scoring caches) and records its
outputs there, so every caller runs the same code path.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chips_core.store import Workspace, WorkspaceError


class PipelineError(WorkspaceError):
    """A missing or inconsistent pipeline input, with a message naming it and the command that makes it."""


def feature_runs_for(
    ws: Workspace, pool: str, eval_name: str, model_id: int | None = None
) -> tuple[int, int]:
    """(pool run, eval run): the latest finished feature runs of both with the same model."""
    from chips_core.features import find_run

    pool_run = find_run(ws, pool, model_id)
    if pool_run is None:
        raise PipelineError(
            f"pool {pool!r} has no finished feature run; run `chips featurize {ws.root} {pool} --model M`"
        )
    with ws.connect(read_only=True) as con:
        model_id, model = con.execute(
            "SELECT f.model_id, m.name FROM feature_runs f JOIN models m USING (model_id) WHERE f.run_id = ?",
            [pool_run],
        ).fetchone()
    eval_run = find_run(ws, eval_name, model_id)
    if eval_run is None:
        raise PipelineError(
            f"eval set {eval_name!r} has no finished feature run with model {model} (model_id {model_id}); "
            f"run `chips featurize {ws.root} {eval_name} --model ...` with the pool's model"
        )
    return pool_run, eval_run


def load_run_model(ws: Workspace, run_id: int, device: str = "cpu") -> Any:
    """The LoadedModel a feature run was made with, rebuilt from its `models` row (hash checked)."""
    from chips_core.models import load_model

    with ws.connect(read_only=True) as con:
        name, tag, ckpt, sha = con.execute(
            "SELECT m.name, m.pretrained, m.checkpoint, m.checkpoint_sha256 FROM feature_runs f "
            "JOIN models m USING (model_id) WHERE f.run_id = ?",
            [run_id],
        ).fetchone()
    if tag and tag.startswith("random-init:seed="):
        loaded = load_model(name, None, device=device, seed=int(tag.split("=", 1)[1]))
    elif ckpt and not name.startswith("local-dir:"):
        loaded = load_model(name, ckpt, device=device)
    else:
        loaded = load_model(name, tag, device=device)
    if loaded.identity.checkpoint_sha256 != sha:
        raise PipelineError(
            f"the weights of model {name} changed since feature run {run_id} (checkpoint {ckpt})"
        )
    return loaded


def prepare_workspace(
    ws: Workspace,
    pool: str,
    eval_name: str,
    config: Any,
    model_id: int | None = None,
    progress: Any = None,
    engine: dict | None = None,
    notice: Callable[[str], None] | None = None,
) -> int:
    """The scoring cache of (pool, eval set, config) in ws/caches/<id>: reused when finished, resumed when
    interrupted, else built with `chips_core.scoring.prepare` (or on Ray when `engine` gives its
    keyword arguments: address, num_gpus_per_worker); returns its cache_id (`scoring_caches`).

    k_max is capped to the rank the pool's curvature can have (`curvature.rank_bound`); `notice` gets a
    line saying so."""
    from dataclasses import asdict, replace

    from chips_core.curvature import rank_bound
    from chips_core.features import FeatureStore

    pool_run, eval_run = feature_runs_for(ws, pool, eval_name, model_id)
    pool_src = FeatureStore(ws, pool_run)
    if len(pool_src) >= 2:
        bound = rank_bound(len(pool_src), config.batch_size, config.curvature_pairs, config.negatives_per_row)
        if config.k_max > max(bound, 2):
            if notice is not None:
                notice(
                    f"k_max capped from {config.k_max} to {max(bound, 2)}: the curvature of {len(pool_src)} "
                    f"pairs (batch size {config.batch_size}, {config.negatives_per_row} negatives per row) "
                    f"has rank at most {bound}, so a larger sketch has no curvature to solve with"
                )
            config = replace(config, k_max=max(bound, 2))
    key = json.dumps(asdict(config), sort_keys=True)
    with ws.connect() as con:
        row = con.execute(
            "SELECT cache_id, dir, status FROM scoring_caches WHERE pool_run_id = ? AND eval_run_id = ? "
            "AND config::VARCHAR = ? ORDER BY cache_id DESC LIMIT 1",
            [pool_run, eval_run, key],
        ).fetchone()
        if row is not None and row[2] == "done":
            return int(row[0])
        if row is None:
            cache_id = ws.next_id(con)
            cache_dir = ws.root / "caches" / str(cache_id)
            con.execute(
                "INSERT INTO scoring_caches (cache_id, pool_run_id, eval_run_id, config, dir, status) "
                "VALUES (?, ?, ?, ?, ?, 'running')",
                [cache_id, pool_run, eval_run, key, str(cache_dir)],
            )
        else:
            cache_id, cache_dir = int(row[0]), Path(row[1])
    params = load_run_model(ws, pool_run).adapter.endpoint_params()
    if engine is None:
        from chips_core.scoring import prepare
    else:
        from chips_core.distributed_prepare import prepare_ray

        prepare = functools.partial(prepare_ray, **engine)
    prepare(pool_src, FeatureStore(ws, eval_run), params, config, cache_dir, progress=progress)
    with ws.connect() as con:
        con.execute(
            "UPDATE scoring_caches SET status = 'done', finished_at = current_timestamp WHERE cache_id = ?",
            [cache_id],
        )
    return cache_id

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

from chips_core.workspace import catalog
from chips_core.workspace.store import Workspace, WorkspaceError


class PipelineError(WorkspaceError):
    """A missing or inconsistent pipeline input, with a message naming it and the command that makes it."""


def check_name(ws: Workspace, name: str, kind: str) -> None:
    """Raise PipelineError when the workspace has no pool / eval set `name`, listing the ones it has."""
    what = "eval set" if kind == "eval" else "pool"
    rows = catalog.pool_names(ws)
    if any(n == name for n, _ in rows):
        return
    same = [n for n, k in rows if k == kind]
    hint = f"{what}s: {', '.join(same)}" if same else f"it has no {what}s yet; add one with `chips ingest`"
    raise PipelineError(f"no {what} named {name!r} in {ws.root} ({hint})")


def _runs(ws: Workspace, name: str) -> list[tuple]:
    """(run_id, model_id, model name, pretrained, checkpoint) of the finished feature runs of `name`."""
    return catalog.feature_runs_of_pool(ws, name)


def _describe(runs: list[tuple]) -> str:
    return "; ".join(
        f"run {r[0]}: model_id {r[1]} {r[2]}"
        + (f" ({r[3]})" if r[3] else "")
        + (f" @ {r[4]}" if r[4] else "")
        for r in runs
    )


def _model_matches(run: tuple, model: str) -> bool:
    _, model_id, name, pretrained, checkpoint = run
    if model in (name, str(model_id), f"{name}:{pretrained}"):
        return True
    return bool(checkpoint) and str(Path(model).expanduser().resolve()) == checkpoint


def feature_runs_for(
    ws: Workspace,
    pool: str,
    eval_name: str,
    model_id: int | None = None,
    model: str | None = None,
    notice: Callable[[str], None] | None = None,
) -> tuple[int, int]:
    """(pool run, eval run): the latest finished feature runs of both with the same model.

    The model is `model_id`, else the one `model` names (open_clip name, `NAME:PRETRAINED`, model id or
    checkpoint file; naming several models is an error listing their runs), else the model the pool was
    first featurized with, never just the newest run (a CPT checkpoint's features, featurized later for
    TracIn, must not replace the base model's silently). `notice` gets a line naming the runs chosen.
    """
    check_name(ws, pool, "pool")
    check_name(ws, eval_name, "eval")
    runs, chosen = _pool_runs(ws, pool, model_id, model)
    pool_run, mid, name = chosen[-1][0], chosen[-1][1], chosen[-1][2]
    eval_run = next((r[0] for r in reversed(_runs(ws, eval_name)) if r[1] == mid), None)
    if eval_run is None:
        others = _describe(_runs(ws, eval_name)) or "none"
        raise PipelineError(
            f"eval set {eval_name!r} has no finished feature run with model {name} (model_id {mid}; its "
            f"runs: {others}); run `chips featurize {ws.root} {eval_name} --model ...` with the pool's model"
        )
    if notice is not None:
        label = _describe([chosen[-1]]).split(": ", 1)[1]
        extra = f" ({len({r[1] for r in runs})} models featurized)" if len({r[1] for r in runs}) > 1 else ""
        notice(f"using feature run {pool_run} of {pool} and {eval_run} of {eval_name}: {label}{extra}")
    return pool_run, eval_run


def _pool_runs(
    ws: Workspace, pool: str, model_id: int | None, model: str | None
) -> tuple[list[tuple], list[tuple]]:
    """(every finished feature run of `pool`, those of the chosen model: see `feature_runs_for`)."""
    runs = _runs(ws, pool)
    if not runs:
        raise PipelineError(
            f"pool {pool!r} has no finished feature run; run `chips featurize {ws.root} {pool} --model M`"
        )
    if model_id is not None or model is not None:
        chosen = [r for r in runs if (r[1] == model_id if model_id is not None else _model_matches(r, model))]
        asked = f"model_id {model_id}" if model_id is not None else f"model {model!r}"
        if not chosen:
            raise PipelineError(
                f"pool {pool!r} has no finished feature run of {asked} (runs: {_describe(runs)})"
            )
        if len({r[1] for r in chosen}) > 1:
            raise PipelineError(
                f"{asked} matches feature runs of several models of pool {pool!r}: {_describe(chosen)}; "
                "choose one with --model-id"
            )
    else:
        chosen = [r for r in runs if r[1] == runs[0][1]]
    return runs, chosen


def pool_feature_run(ws: Workspace, pool: str, model_id: int | None = None, model: str | None = None) -> int:
    """The latest finished feature run of `pool` with the model chosen as in `feature_runs_for` (without an
    eval set: for steps of the pool alone, e.g. its map)."""
    check_name(ws, pool, "pool")
    return int(_pool_runs(ws, pool, model_id, model)[1][-1][0])


def load_run_model(ws: Workspace, run_id: int, device: str = "cpu") -> Any:
    """The LoadedModel a feature run was made with, rebuilt from its `models` row (hash checked)."""
    from chips_core.features.models import load_model

    spec = catalog.run_model_spec(ws, run_id)
    if spec is None:
        raise PipelineError(f"no feature run {run_id} in workspace {ws.root}")
    name, pretrained, seed = spec.load_args()
    if seed is not None:
        loaded = load_model(name, None, device=device, seed=seed)
    else:
        loaded = load_model(name, pretrained, device=device)
    if loaded.identity.checkpoint_sha256 != spec.checkpoint_sha256:
        raise PipelineError(
            f"the weights of model {name} changed since feature run {run_id} (checkpoint {spec.checkpoint})"
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
    model: str | None = None,
) -> int:
    """The scoring cache of (pool, eval set, config) in ws/caches/<id>: reused when finished, resumed when
    interrupted, else built with `chips_core.scoring.prepare.prepare` (or on Ray when `engine` gives its
    keyword arguments: address, num_gpus_per_worker), with the default ranking's solves stored in it
    (`ranking.store_rankings`); returns its cache_id (`scoring_caches`).

    k_max is capped to the rank the pool's curvature can have (`curvature.rank_bound`); `notice` gets a
    line saying so, and one naming the feature runs used (`feature_runs_for`: `model_id` or `model`)."""
    from dataclasses import asdict, replace

    from chips_core.features.featurize import FeatureStore
    from chips_core.scoring.curvature import rank_bound
    from chips_core.scoring.ranking import store_rankings

    pool_run, eval_run = feature_runs_for(ws, pool, eval_name, model_id, model, notice)
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
        row = catalog.find_scoring_cache(con, pool_run, eval_run, key)
        if row is not None and row[2] == "done":
            return int(row[0])
        if row is None:
            cache_id = ws.next_id(con)
            cache_dir = ws.root / "caches" / str(cache_id)
            catalog.insert_scoring_cache(con, cache_id, pool_run, eval_run, key, str(cache_dir))
        else:
            cache_id, cache_dir = int(row[0]), Path(row[1])
    params = load_run_model(ws, pool_run).adapter.endpoint_params()
    if engine is None:
        from chips_core.scoring.prepare import prepare
    else:
        from chips_core.engines.ray_prepare import prepare_ray

        prepare = functools.partial(prepare_ray, **engine)
    cache = prepare(pool_src, FeatureStore(ws, eval_run), params, config, cache_dir, progress=progress)
    catalog.finish_scoring_cache(ws, cache_id)
    try:  # the default ranking's solves, so that a first dashboard page reads them: a speed-up, not a need
        store_rankings(cache)
    except Exception as e:  # noqa: BLE001 - the cache is finished and usable; rank() will say what fails
        if notice is not None:
            notice(f"scoring cache {cache_id} is ready, but storing its default ranking failed: {e}")
    return cache_id


def cache_with_blocks(ws: Workspace, cache_id: int, blocks: str) -> int:
    """The scoring cache of the same pool and eval feature runs and config as `cache_id`, but scoring the
    endpoint `blocks` (prepared now if it does not exist yet): how a preset with other blocks is compared
    on the same features, batches and sketch seed."""
    from chips_core.scoring.params import BLOCKS, PrepareConfig

    row = catalog.scoring_cache_origin(ws, cache_id)
    if row is None:
        raise PipelineError(f"no scoring cache {cache_id} in workspace {ws.root}")
    config = {"blocks": ",".join(BLOCKS), **json.loads(row[0])}
    wanted = PrepareConfig(**{**config, "blocks": blocks})
    if wanted.blocks == PrepareConfig(**config).blocks:
        return int(cache_id)
    return prepare_workspace(ws, row[1], row[2], wanted, model_id=int(row[3]))


def load_cache(ws: Workspace, cache: int | str | Path | Any) -> Any:
    """The ScoringCache named by `cache`: a finished cache's id in `ws`, its folder, or a ScoringCache."""
    from chips_core.scoring.cache import ScoringCache

    if isinstance(cache, ScoringCache):
        return cache
    if isinstance(cache, int):
        row = catalog.scoring_cache(ws, cache)
        if row is None or row[1] != "done":
            raise PipelineError(f"no finished scoring cache {cache} in workspace {ws.root}")
        cache = row[0]
    return ScoringCache.load(cache)
